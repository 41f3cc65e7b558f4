"""LinearProbe, evaluate, sweep and the plots, on sklearn's real 8x8 digits as stand-in CNN codes."""

import json
import logging
import math
import re
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.exceptions import NotFittedError
from sklearn.metrics import accuracy_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline

from transferkit.errors import DataError, ModelError, TransferkitError
from transferkit.plots import plot_confusion, plot_sweep
from transferkit.probe.linear import DEFAULT_CS, LinearProbe
from transferkit.probe.metrics import Evaluation, evaluate
from transferkit.probe.sweep import SweepResult, sweep

NAMES = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return train_test_split(X, y, test_size=0.3, stratify=y, random_state=0)  # Xtr, Xte, ytr, yte


@pytest.fixture(scope="module")
def auto_probe(digits):
    Xtr, _, ytr, _ = digits
    return LinearProbe().fit(Xtr, ytr)


@pytest.fixture(scope="module")
def sweep_result():
    X, y = load_digits(return_X_y=True)
    noisy = X + np.random.default_rng(0).normal(0, 4, X.shape)
    codes = {("full", "raw"): X, ("first16", "raw"): X[:, :16], ("noisy", "raw"): noisy}
    return sweep(codes, y, progress=False)


def test_probe_clones_and_sets_params_like_an_estimator(digits):
    probe = LinearProbe(C=0.1, scaling="l2", cv=3)
    twin = clone(probe)
    assert twin is not probe
    assert twin.get_params() == probe.get_params()
    twin.set_params(C=0.5, scaling="none")
    assert (twin.C, twin.scaling, probe.C, probe.scaling) == (0.5, "none", 0.1, "l2")


def test_probe_works_inside_a_pipeline(digits):
    Xtr, Xte, ytr, yte = digits
    pipe = Pipeline([("pca", PCA(n_components=30, random_state=0)), ("probe", LinearProbe(C=0.1))])
    pipe.set_params(probe__scaling="standard").fit(Xtr, ytr)
    assert pipe.named_steps["probe"].n_features_in_ == 30
    assert pipe.score(Xte, yte) >= 0.9


def test_auto_C_is_picked_from_the_grid_and_generalises(digits, auto_probe):
    _, Xte, _, yte = digits
    assert auto_probe.best_C_ in DEFAULT_CS
    tried = [row["C"] for row in auto_probe.cv_results_]
    assert tried == sorted(tried) and set(tried) <= set(DEFAULT_CS)
    best = max(auto_probe.cv_results_, key=lambda row: row["mean"])
    assert (best["C"], best["mean"]) == (auto_probe.best_C_, auto_probe.cv_score_)
    assert 0.9 < auto_probe.cv_score_ <= 1.0
    assert auto_probe.n_features_in_ == 64
    assert auto_probe.score(Xte, yte) >= 0.93


def test_C_is_chosen_on_a_stratified_sample_of_large_sets_and_fit_on_all(digits, auto_probe, caplog):
    """cv_max_samples caps the rows the C path sees (60,000 rows x 5 folds x 5 Cs is hours on 2 cores);
    the final SVM still learns from every row."""
    Xtr, Xte, ytr, yte = digits
    assert auto_probe.n_cv_samples_ == len(ytr)  # 1,257 rows: under the default cap, all of them
    with caplog.at_level(logging.INFO, logger="transferkit.probe.linear"):
        capped = LinearProbe(cv_max_samples=400).fit(Xtr, ytr)
    assert capped.n_cv_samples_ == 400 and "stratified 400 of 1257 rows" in caplog.text
    assert capped.pipeline_.named_steps["scale"].n_samples_seen_ == len(ytr)
    assert capped.best_C_ in DEFAULT_CS and capped.score(Xte, yte) >= 0.93
    with pytest.raises(ModelError, match="'cv_max_samples'.*Got 3"):
        LinearProbe(cv_max_samples=3).fit(Xtr, ytr)


def test_fixed_C_skips_cross_validation(digits):
    Xtr, Xte, ytr, yte = digits
    probe = LinearProbe(C=0.1).fit(Xtr, ytr)
    assert probe.best_C_ == 0.1
    assert math.isnan(probe.cv_score_)
    assert probe.cv_results_ == []
    assert probe.score(Xte, yte) >= 0.93


@pytest.mark.parametrize("scaling", ["l2", "none"])
def test_other_scalings_fit(digits, scaling):
    Xtr, Xte, ytr, yte = digits
    probe = LinearProbe(scaling=scaling, cv=3).fit(Xtr, ytr)
    scale = probe.pipeline_.named_steps["scale"]
    assert type(scale).__name__ == "Normalizer" if scaling == "l2" else scale == "passthrough"
    assert probe.score(Xte, yte) >= 0.93


def test_unconverged_fits_log_one_warning(digits, caplog):
    Xtr, _, ytr, _ = digits
    with caplog.at_level("WARNING", logger="transferkit.probe.linear"):
        probe = LinearProbe(Cs=(0.1, 1.0), cv=3, max_iter=2).fit(Xtr, ytr)
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "did not converge within max_iter=2" in warnings[0].getMessage()
    assert not probe.converged_


def test_bad_scaling_is_named_with_the_allowed_values(digits):
    Xtr, _, ytr, _ = digits
    with pytest.raises(ModelError) as info:
        LinearProbe(scaling="x").fit(Xtr, ytr)
    assert str(info.value) == (
        "The 'scaling' parameter of LinearProbe must be a str among {'standard', 'l2', 'none', 'center_l2', "
        "'standard_l2'}. Got 'x' instead."
    )
    assert isinstance(info.value, ValueError)


def test_bad_C_is_rejected(digits):
    Xtr, _, ytr, _ = digits
    with pytest.raises(ModelError, match="'C' parameter of LinearProbe"):
        LinearProbe(C=-1.0).fit(Xtr, ytr)


def test_class_with_one_sample_is_named(digits):
    Xtr, _, ytr, _ = digits
    X = np.vstack([Xtr, Xtr[:1]])
    y = np.append(NAMES[ytr], "lonely")
    with pytest.raises(DataError, match=r"class lonely \(1\)"):
        LinearProbe().fit(X, y)


def test_string_labels_round_trip_through_predict(digits):
    Xtr, Xte, ytr, yte = digits
    probe = LinearProbe(cv=3).fit(Xtr, NAMES[ytr])
    assert list(probe.classes_) == sorted(NAMES)
    pred = probe.predict(Xte)
    assert set(pred) <= set(NAMES)
    assert accuracy_score(NAMES[yte], pred) >= 0.93


def test_binary_decision_function_is_one_column(digits):
    Xtr, Xte, ytr, _ = digits
    keep = ytr < 2
    probe = LinearProbe(C=0.1).fit(Xtr[keep], ytr[keep])
    assert probe.decision_function(Xte).shape == (len(Xte),)


def test_predict_checks_fitted_and_width(digits, auto_probe):
    _, Xte, _, _ = digits
    with pytest.raises(NotFittedError):
        LinearProbe().predict(Xte)
    with pytest.raises(DataError, match="X has 63 features, but LinearProbe is expecting 64"):
        auto_probe.predict(Xte[:, :63])


@pytest.mark.parametrize("labels", ["int", "str"])
def test_save_load_is_bit_exact_and_pickle_free(digits, auto_probe, tmp_path, labels):
    Xtr, Xte, ytr, _ = digits
    probe = auto_probe if labels == "int" else LinearProbe(C=0.1, scaling="l2").fit(Xtr, NAMES[ytr])
    extra = {"model": "tf_efficientnet_lite0", "layer": "pre_logits", "pool": "avg", "image_size": 224}
    out = probe.save(tmp_path / "probe", extra=extra)
    loaded = LinearProbe.load(out)
    np.testing.assert_array_equal(loaded.decision_function(Xte), probe.decision_function(Xte))
    np.testing.assert_array_equal(loaded.predict(Xte), probe.predict(Xte))
    assert loaded.classes_.dtype.kind == probe.classes_.dtype.kind
    assert loaded.extra_ == extra
    assert loaded.get_params() == probe.get_params()
    assert (loaded.best_C_, loaded.cv_results_) == (probe.best_C_, probe.cv_results_)
    with np.load(out / "arrays.npz", allow_pickle=False) as npz:
        assert npz["classes"].dtype.kind == "U"
        np.testing.assert_array_equal(npz["coef"], probe.pipeline_.named_steps["svm"].coef_)
    meta = json.loads((out / "probe.json").read_text())
    assert meta["extra"] == extra
    assert sorted(p.name for p in out.iterdir()) == ["arrays.npz", "probe.json"]  # no temp files left


def test_load_names_a_corrupt_or_missing_file(auto_probe, tmp_path):
    out = auto_probe.save(tmp_path / "probe")
    (out / "arrays.npz").write_bytes(b"not a zip file")
    with pytest.raises(TransferkitError, match=re.escape(str(out / "arrays.npz"))):
        LinearProbe.load(out)
    (out / "probe.json").write_text("{ truncated")
    with pytest.raises(TransferkitError, match=re.escape(str(out / "probe.json"))):
        LinearProbe.load(out)
    with pytest.raises(TransferkitError, match="not found"):
        LinearProbe.load(tmp_path / "nowhere")


def test_evaluate_matches_sklearn(digits, auto_probe):
    _, Xte, _, yte = digits
    result = evaluate(auto_probe, Xte, yte)
    assert isinstance(result, Evaluation)
    assert result.accuracy == accuracy_score(yte, auto_probe.predict(Xte))
    assert result.confusion.sum() == len(yte)
    assert np.trace(result.confusion) == round(result.accuracy * len(yte))
    assert result.labels == [str(c) for c in range(10)]
    for label in result.labels:
        assert re.search(rf"^\s+{label}\s+\d", result.report, flags=re.MULTILINE)
        assert result.per_class[label]["support"] == np.sum(yte == int(label))
    assert json.loads(json.dumps(result.to_dict()))["confusion"] == result.confusion.tolist()


def test_sweep_ranks_the_full_view_first(sweep_result):
    assert isinstance(sweep_result, SweepResult)
    rows = sweep_result.rows
    assert [(r["layer"], r["dim"]) for r in rows] == [("full", 64), ("first16", 16), ("noisy", 64)]
    acc = {r["layer"]: r["cv_accuracy"] for r in rows}
    assert acc["full"] > acc["noisy"] > acc["first16"]
    assert sweep_result.best["layer"] == "full"
    assert all(r["C"] in DEFAULT_CS and r["seconds"] >= 0 and 0 <= r["cv_std"] < 0.1 for r in rows)


def test_sweep_table_marks_only_the_best(sweep_result):
    lines = sweep_result.table().splitlines()
    assert len(lines) == 4
    marked = [line for line in lines if line.startswith("*")]
    assert len(marked) == 1 and "full" in marked[0]
    assert json.loads(json.dumps(sweep_result.to_dict()))["best"]["layer"] == "full"


def test_sweep_ties_go_to_the_smaller_dim():
    X, y = load_digits(return_X_y=True)
    padded = np.hstack([X, np.zeros((len(X), 3))])  # all-zero columns change no score
    result = sweep({("padded", "avg"): padded, ("plain", "avg"): X}, y, Cs=(0.1,), progress=False)
    assert result.rows[0]["cv_accuracy"] == result.rows[1]["cv_accuracy"]
    assert result.best["layer"] == "plain"


def test_sweep_subsamples_stratified(caplog):
    X, y = load_digits(return_X_y=True)
    with caplog.at_level("INFO", logger="transferkit.probe.sweep"):
        codes = {("full", "raw"): X, ("first16", "raw"): X[:, :16]}
        result = sweep(codes, y, max_samples=500, progress=False)
    assert "subset of 500 of 1797" in caplog.text
    assert result.best["layer"] == "full"


def test_sweep_shows_progress_on_stderr(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)  # bars are drawn on a terminal only
    X, y = load_digits(return_X_y=True)
    sweep({("first16", "raw"): X[:, :16]}, y, Cs=(0.1,), progress=True)
    captured = capsys.readouterr()
    assert "sweep" in captured.err and "1/1" in captured.err
    assert captured.out == ""


def test_sweep_rejects_misaligned_codes():
    X, y = load_digits(return_X_y=True)
    with pytest.raises(DataError, match="expected \\(1797, dim\\)"):
        sweep({("full", "raw"): X[:-1]}, y, progress=False)


def test_plots_write_readable_pngs(digits, auto_probe, sweep_result, tmp_path):
    _, Xte, _, yte = digits
    result = evaluate(auto_probe, Xte, yte)
    for normalize in (True, False):
        path = plot_confusion(result.confusion, result.labels, tmp_path / f"cm{normalize}.png",
                              title="digits", normalize=normalize)
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 100
    path = plot_sweep(sweep_result.rows, tmp_path / "sub" / "sweep.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 100


def test_plot_confusion_rejects_mismatched_labels(tmp_path):
    with pytest.raises(DataError, match="does not match 3 labels"):
        plot_confusion(np.eye(2), ["a", "b", "c"], tmp_path / "cm.png")


def test_evaluate_names_integer_labels():
    X, y = load_digits(return_X_y=True)
    probe = LinearProbe(C=0.01).fit(X[:1000], y[:1000])
    names = [f"digit-{i}" for i in range(10)]
    ev = evaluate(probe, X[1000:], y[1000:], names=names)
    assert ev.labels == names
    assert set(ev.per_class) == set(names)
    assert all(name in ev.report for name in names)
