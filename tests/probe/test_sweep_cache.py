"""Remembered sweeps (probe.sweep_cache), on sklearn's real 8x8 digits as stand-in views of CNN codes: the same
inputs give the stored result without fitting; any change of codes, labels or settings sweeps again; a damaged or
foreign file is never trusted."""

import json
import logging

import numpy as np
import pytest
from sklearn.datasets import load_digits

from transferkit.probe import sweep as sweeping
from transferkit.probe.sweep_cache import cached_sweep, sweep_key


@pytest.fixture(scope="module")
def views():
    X, y = load_digits(return_X_y=True)
    X, y = X[:400], y[:400]
    return {("full", "raw"): X, ("first16", "raw"): X[:, :16]}, y


def _count_sweeps(monkeypatch) -> list:
    calls = []
    real = sweeping.sweep

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sweeping, "sweep", counting)
    return calls


def test_the_same_sweep_is_read_back_without_fitting(views, tmp_path, monkeypatch, caplog):
    codes, y = views
    calls = _count_sweeps(monkeypatch)
    first = cached_sweep(codes, y, root=tmp_path, Cs=(0.01, 0.1), cv=2, progress=False)
    with caplog.at_level(logging.INFO, logger="transferkit.probe.sweep_cache"):
        again = cached_sweep(codes, y, root=tmp_path, Cs=(0.01, 0.1), cv=2, progress=True)  # progress: not a key
    assert len(calls) == 1 and "reusing" in caplog.text
    assert again.to_dict() == first.to_dict() and again.best is again.rows[again.rows.index(first.best)]
    assert first.best["layer"] == "full"
    key = sweep_key(codes, y, {"Cs": (0.01, 0.1), "cv": 2})
    assert [p.name for p in (tmp_path / "sweeps").iterdir()] == [f"{key}.json"]


@pytest.mark.parametrize("change", ["codes", "labels", "settings"])
def test_other_codes_labels_or_settings_sweep_again(views, tmp_path, monkeypatch, change):
    codes, y = views
    cached_sweep(codes, y, root=tmp_path, Cs=(0.1,), cv=2, progress=False)
    calls = _count_sweeps(monkeypatch)
    other_codes = {**codes, ("first16", "raw"): codes[("first16", "raw")] + 1e-3} if change == "codes" else codes
    other_y = np.roll(y, 1) if change == "labels" else y
    cv = 3 if change == "settings" else 2
    cached_sweep(other_codes, other_y, root=tmp_path, Cs=(0.1,), cv=cv, progress=False)
    assert len(calls) == 1
    assert len(list((tmp_path / "sweeps").glob("*.json"))) == 2


@pytest.mark.parametrize("damage", ["truncated", "other key", "best not a row"])
def test_a_damaged_or_foreign_file_is_swept_again_and_replaced(views, tmp_path, monkeypatch, caplog, damage):
    codes, y = views
    first = cached_sweep(codes, y, root=tmp_path, Cs=(0.1,), cv=2, progress=False)
    (path,) = (tmp_path / "sweeps").glob("*.json")
    text = path.read_text()
    data = json.loads(text)
    if damage == "truncated":
        path.write_text(text[: len(text) // 2])
    elif damage == "other key":
        path.write_text(json.dumps({**data, "key": "0" * 64}))
    else:
        data["result"]["best"] = {**data["result"]["best"], "layer": "made-up"}
        path.write_text(json.dumps(data))
    calls = _count_sweeps(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="transferkit.probe.sweep_cache"):
        again = cached_sweep(codes, y, root=tmp_path, Cs=(0.1,), cv=2, progress=False)
    assert len(calls) == 1 and "sweeping again" in caplog.text
    assert again.best["layer"] == first.best["layer"] == "full"
    assert json.loads(path.read_text())["key"] == path.stem  # rewritten whole


def test_an_unwritable_cache_only_warns(views, tmp_path, caplog):
    codes, y = views
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="transferkit.probe.sweep_cache"):
        result = cached_sweep(codes, y, root=blocked, Cs=(0.1,), cv=2, progress=False)
    assert result.best["layer"] == "full" and "cannot write" in caplog.text
    assert blocked.read_text() == "not a folder"
