"""Fine-tuning under faults: damaged checkpoints, failed resumes, bad --weights, a real SIGKILL."""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import transferkit
import transferkit.finetune.loop as ft
from transferkit.data.datasets import open_dataset
from transferkit.errors import DataError
from transferkit.finetune.config import FinetuneConfig
from transferkit.finetune.loop import finetune
from transferkit.finetune.rundir import RESULTS
from transferkit.runtime.atomic import file_sha256

CONFIG = FinetuneConfig(model="test_resnet", weights="random", image_size=32, batch_size=4, num_workers=0, epochs=2)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run faster on one thread


@pytest.fixture(scope="module")
def finished(tmp_path_factory, shared_photo_folder) -> Path:
    """A finished two-epoch run: config.json with its results, checkpoint of epoch 2."""
    out = tmp_path_factory.mktemp("finished") / "run"
    finetune(open_dataset(shared_photo_folder), out, CONFIG, progress=False)
    return out


@pytest.fixture()
def run(tmp_path, finished) -> Path:
    """A copy of the finished run to damage."""
    return Path(shutil.copytree(finished, tmp_path / "run"))


def _resume_fails(run: Path, shared_photo_folder: Path) -> str:
    """Resume `run`: a one-line DataError, and config.json byte for byte as it was."""
    before = (run / "config.json").read_bytes()
    with pytest.raises(DataError) as err:
        finetune(open_dataset(shared_photo_folder), run, CONFIG, progress=False, resume=True)
    assert (run / "config.json").read_bytes() == before
    message = str(err.value)
    assert "\n" not in message
    return message


def _edit_json(run: Path, edit) -> None:
    meta = json.loads((run / "checkpoint.json").read_text())
    edit(meta)
    (run / "checkpoint.json").write_text(json.dumps(meta))


def _at(meta: dict, path: str) -> tuple[dict, str | int]:
    """The container of a dotted field ('a.b.0.c': list indices are numbers) and the last key."""
    *parents, last = path.split(".")
    for part in parents:
        meta = meta[int(part)] if isinstance(meta, list) else meta[part]
    return meta, int(last) if isinstance(meta, list) else last


def _drop(path: str):
    def edit(meta):
        parent, key = _at(meta, path)
        del parent[key]
    return edit


def _set(path: str, value):
    def edit(meta):
        parent, key = _at(meta, path)
        parent[key] = copy.deepcopy(value)
    return edit


SCHEMA_CASES = {  # id: (edit of checkpoint.json, what the message must name)
    **{f"no-{key}": (_drop(key), f"'{key}'") for key in ("tensors", "sha256", "loop", "optimizer", "scheduler",
                                                          "rng")},
    "no-format": (_drop("format"), "format None"),
    **{f"no-{path}": (_drop(path), f"'{path}'") for path in (
        "loop.epoch", "loop.step", "loop.history", "loop.best_key", "loop.best", "rng.python", "rng.numpy",
        "optimizer.param_groups", "optimizer.state", "scheduler.last_epoch", "scheduler.base_lrs")},
    "no-param_groups[0].lr": (_drop("optimizer.param_groups.0.lr"), "'optimizer.param_groups[0].lr'"),
    "no-history[1].train_loss": (_drop("loop.history.1.train_loss"), "'loop.history[1].train_loss'"),
    "epoch-str": (_set("loop.epoch", "2"), "'loop.epoch' must be int, not str"),
    "epoch-bool": (_set("loop.epoch", True), "'loop.epoch' must be int, not bool"),
    "epoch-negative": (_set("loop.epoch", -1), "'loop.epoch' must be >= 0"),
    "loop-list": (_set("loop", []), "'loop' must be dict, not list"),
    "history-short": (_set("loop.history", []), "'loop.history' has 0 rows for 2 epochs"),
    "best-str": (_set("loop.best", "epoch 1"), "'loop.best' must be list"),
    "python-str": (_set("rng.python", "seed"), "'rng.python' must be list, not str"),
    "python-short": (_set("rng.python.1", [1, 2, 3]), "'rng.python[1]' must be 625 integers"),
    "python-bad-index": (_set("rng.python.1.624", 10**6), "'rng.python' is not a Python random state"),
    "numpy-short": (_set("rng.numpy", ["MT19937", [0] * 624]), "'rng.numpy' must have 5 entries"),
    "numpy-name": (_set("rng.numpy.0", "PCG64"), "'rng.numpy' is not a NumPy random state"),
    "numpy-keys-float": (_set("rng.numpy.1.0", 0.5), "'rng.numpy[1]' must be 624 integers"),
    "groups-dict": (_set("optimizer.param_groups", {}), "'optimizer.param_groups' must be list, not dict"),
    "groups-none": (_set("optimizer.param_groups", []), "'optimizer.param_groups' has 0 groups"),
    "group-lr-str": (_set("optimizer.param_groups.0.lr", "fast"), "'optimizer.param_groups[0].lr' must be int or"),
    "group-params-short": (_set("optimizer.param_groups.0.params", []), "'optimizer.param_groups[0].params'"),
    "state-foreign-id": (_set("optimizer.state.99999", {}), "'optimizer.state.99999' is not a parameter id"),
    "scheduler-str": (_set("scheduler", "cosine"), "'scheduler' must be dict"),
    "tensors-path": (_set("tensors", "../checkpoint-0002.safetensors"), "'tensors' must name a .safetensors file"),
    "sha256-short": (_set("sha256", "abc"), "'sha256' must be 64 hex digits"),
}


@pytest.mark.parametrize("case", SCHEMA_CASES, ids=list(SCHEMA_CASES))
def test_resume_with_a_damaged_checkpoint_json_names_the_field(run, shared_photo_folder, case):
    edit, expected = SCHEMA_CASES[case]
    _edit_json(run, edit)
    message = _resume_fails(run, shared_photo_folder)
    assert expected in message and str(run / "checkpoint.json") in message


def test_checkpoint_json_that_is_no_object_or_no_json(run, shared_photo_folder):
    (run / "checkpoint.json").write_text("[1, 2]")
    assert "is not a transferkit checkpoint (format 'list')" in _resume_fails(run, shared_photo_folder)
    (run / "checkpoint.json").write_bytes(b"\xff\xfe{")
    assert "checkpoint.json' is not valid JSON" in _resume_fails(run, shared_photo_folder)


def _rewrite_tensors(run: Path, edit) -> Path:
    """Change the checkpoint's tensors and update its sha256, as a consistent but wrong checkpoint."""
    meta = json.loads((run / "checkpoint.json").read_text())
    path = run / meta["tensors"]
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    meta["sha256"] = file_sha256(path)
    (run / "checkpoint.json").write_text(json.dumps(meta))
    return path


def _first_moment(tensors: dict) -> str:
    """The name of an optimizer state tensor shaped like its parameter (AdamW's exp_avg, say)."""
    return next(k for k in sorted(tensors) if k.startswith("optimizer.") and tensors[k].ndim > 0)


def _shrink_first_moment(tensors: dict) -> None:
    name = _first_moment(tensors)
    tensors[name] = tensors[name].flatten()[:1]


TENSOR_CASES = {  # id: (edit of the tensor dict, what the message must say)
    "model-tensor-missing": (lambda t: t.pop("model.fc.weight"), "tensor 'model.fc.weight' is missing"),
    "optimizer-tensor-missing": (lambda t: t.pop(_first_moment(t)), "tensor 'optimizer."),
    "rng-missing": (lambda t: t.pop("rng.torch"), "tensor 'rng.torch' is missing"),
    "model-shape": (lambda t: t.update({"model.fc.weight": t["model.fc.weight"][:1]}), "'model.fc.weight' has shape"),
    "optimizer-shape": (_shrink_first_moment, "has shape (1,), needs"),
    "extra-tensor": (lambda t: t.update({"model.extra": torch.zeros(1)}), "'model.extra' belongs to no parameter"),
    "rng-dtype": (lambda t: t.update({"rng.torch": t["rng.torch"].float()}), "'rng.torch' must be uint8"),
}


@pytest.mark.parametrize("case", TENSOR_CASES, ids=list(TENSOR_CASES))
def test_resume_with_tensors_that_do_not_fit_names_the_tensor(run, shared_photo_folder, case):
    edit, expected = TENSOR_CASES[case]
    path = _rewrite_tensors(run, edit)
    message = _resume_fails(run, shared_photo_folder)
    assert expected in message and str(path) in message


@pytest.mark.parametrize("damage", ["deleted", "corrupted", "truncated", "not-safetensors"])
def test_resume_with_a_missing_or_corrupt_tensor_file_changes_nothing(run, shared_photo_folder, damage):
    meta = json.loads((run / "checkpoint.json").read_text())
    path = run / meta["tensors"]
    data = path.read_bytes()
    if damage == "deleted":
        path.unlink()
    elif damage == "corrupted":
        path.write_bytes(data[:-100] + bytes(b ^ 0xFF for b in data[-100:]))
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # garbage whose hash is recorded: the file itself must be refused
        path.write_bytes(b"not a safetensors file")
        _edit_json(run, _set("sha256", file_sha256(path)))
    message = _resume_fails(run, shared_photo_folder)
    expected = "not a readable safetensors file" if damage == "not-safetensors" else "does not match the sha256"
    assert expected in message and str(path) in message


def test_resume_without_model_best_changes_nothing(run, shared_photo_folder):
    (run / "model-best.safetensors").unlink()
    assert "model-best.safetensors" in _resume_fails(run, shared_photo_folder)


def test_resume_keeps_the_results_of_the_run_until_it_has_new_ones(run, shared_photo_folder, monkeypatch):
    """A resume that dies after rewriting config.json still has the old run's best epoch and val scores."""
    before = json.loads((run / "config.json").read_text())
    assert all(key in before for key in RESULTS)

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(ft, "_fit", killed)
    with pytest.raises(KeyboardInterrupt):
        finetune(open_dataset(shared_photo_folder), run, CONFIG, progress=False, resume=True)
    after = json.loads((run / "config.json").read_text())
    assert {k: after[k] for k in RESULTS} == {k: before[k] for k in RESULTS}
    monkeypatch.undo()
    # nothing left to train
    result = finetune(open_dataset(shared_photo_folder), run, CONFIG, progress=False, resume=True)
    assert result.best_epoch == before["best_epoch"]
    assert json.loads((run / "config.json").read_text()) == before


def test_cli_resume_with_a_damaged_checkpoint_is_one_line_and_exit_1(run, shared_photo_folder, cli_run):
    _edit_json(run, _drop("loop.epoch"))
    before = (run / "config.json").read_bytes()
    result = cli_run("-q", "finetune", "--resume", run, shared_photo_folder, ok=False, catch=True)
    assert result.exit_code == 1, result.output
    (line,) = result.output.strip().splitlines()  # -q: the error alone, on one line
    assert line.startswith("Error: ") and "checkpoint.json': field 'loop.epoch' is missing" in line
    assert (run / "config.json").read_bytes() == before


@pytest.mark.parametrize("weights", ["missing", "garbage.safetensors", "garbage.pth", "other-model", "text"])
def test_cli_bad_weights_leave_no_output_directory(tmp_path, shared_photo_folder, weights, cli_run):
    path = {"missing": Path("/nonexistent.safetensors"), "text": tmp_path / "notes.txt",
            "other-model": tmp_path / "other.safetensors"}.get(weights, tmp_path / weights)
    if weights.startswith("garbage"):
        path.write_bytes(os.urandom(256))
    elif weights == "other-model":
        save_file({"conv.weight": torch.zeros(4, 3, 3, 3)}, str(path))
    elif weights == "text":
        path.write_text("not weights")
    out = tmp_path / "new" / "run"
    result = cli_run("-q", "finetune", shared_photo_folder, "-o", out, "--model", "test_resnet", "--weights", path,
                     "--image-size", "32", "--epochs", "1", ok=False, catch=True)
    assert result.exit_code == 1, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("Error: ") and "weights" in line and str(path) in line
    assert not (tmp_path / "new").exists()


def test_sigkill_then_resume_gives_bit_identical_weights(tmp_path, digits_folder):
    """A real `transferkit finetune` process killed with SIGKILL in epoch 2 resumes to the uninterrupted weights."""
    root = str(Path(transferkit.__file__).parents[1])
    env = {**os.environ, "TRANSFERKIT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    options = ["--model", "test_resnet", "--weights", "random", "--image-size", "32", "--batch-size", "8",
               "--epochs", "3", "--head", "mlp"]  # augmentation and dropout on: every RNG state matters
    base = [sys.executable, "-m", "transferkit", "-q", "finetune", str(digits_folder)]

    def start(out: Path) -> subprocess.Popen:
        return subprocess.Popen([*base, "-o", str(out), *options], env=env, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    whole, victim = start(tmp_path / "whole"), start(tmp_path / "killed")  # side by side: one core each
    checkpoint = tmp_path / "killed" / "checkpoint.json"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert victim.poll() is None, victim.communicate()[1][-2000:]
    os.killpg(victim.pid, signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    epoch = json.loads(checkpoint.read_text())["loop"]["epoch"]
    assert 1 <= epoch < 3  # really interrupted
    assert "best_epoch" not in json.loads((tmp_path / "killed" / "config.json").read_text())

    _, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err[-2000:]
    resumed = subprocess.run([*base, "--resume", str(tmp_path / "killed")], env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    for name in ("model-last.safetensors", "model-best.safetensors"):
        a, b = load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "killed" / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    rows = [list(csv.DictReader((tmp_path / run / "metrics.csv").open())) for run in ("whole", "killed")]
    assert [r["train_loss"] for r in rows[0]] == [r["train_loss"] for r in rows[1]] and len(rows[0]) == 3
    done = [json.loads((tmp_path / run / "config.json").read_text()) for run in ("whole", "killed")]
    assert {k: done[0][k] for k in RESULTS} == {k: done[1][k] for k in RESULTS}


def test_finetune_leaves_the_process_able_to_hold_denormal_floats(tmp_path, shared_photo_folder):
    """Training flushes denormals for speed; after it, numpy (and hypothesis) must see IEEE floats again."""
    tiny = np.float32(1e-38)
    finetune(open_dataset(shared_photo_folder), tmp_path / "run", dataclasses.replace(CONFIG, epochs=1), progress=False)
    assert tiny * np.float32(1e-3) != 0  # a denormal result survives
