"""Calibrated probabilities: LinearProbe/MultiLabelProbe.predict_proba, the temperature and Platt fits, the one
ECE, and probes saved before calibration existed; on sklearn's real 8x8 digits as stand-in CNN codes."""

import json

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline

from transferkit.errors import DataError, TransferkitError
from transferkit.probe.calibration import fit_platt, fit_temperature, platt_proba, temperature_proba
from transferkit.probe.linear import LinearProbe
from transferkit.probe.metrics import expected_calibration_error
from transferkit.probe.multilabel import MultiLabelProbe


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return train_test_split(X, y, test_size=0.5, stratify=y, random_state=0)  # Xtr, Xte, ytr, yte


@pytest.fixture(scope="module")
def probe(digits):
    Xtr, _, ytr, _ = digits
    return LinearProbe().fit(Xtr, ytr)


def test_predict_proba_rows_sum_to_one_and_argmax_is_predict(digits, probe):
    _, Xte, _, _ = digits
    P = probe.predict_proba(Xte)
    assert P.shape == (len(Xte), 10) and (P >= 0).all() and (P <= 1).all()
    np.testing.assert_allclose(P.sum(1), 1, rtol=1e-12)
    np.testing.assert_array_equal(probe.classes_[P.argmax(1)], probe.predict(Xte))


def test_calibration_lowers_expected_calibration_error_on_held_out_digits(digits, probe):
    _, Xte, _, yte = digits
    before = expected_calibration_error(yte, softmax(probe.decision_function(Xte), axis=1), probe.classes_)
    after = expected_calibration_error(yte, probe.predict_proba(Xte), probe.classes_)
    assert after < 0.05 < 0.3 < before, (before, after)  # measured: 0.57 -> 0.016


@pytest.mark.parametrize("labels", ["binary", "strings"])
def test_binary_and_string_labels_keep_classes_order(digits, labels):
    Xtr, Xte, ytr, _ = digits
    if labels == "binary":
        ytr = ytr >= 5
    else:
        ytr = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])[ytr]
    probe = LinearProbe(Cs=(0.01,), cv=3).fit(Xtr, ytr)
    P = probe.predict_proba(Xte)
    assert P.shape == (len(Xte), len(probe.classes_))
    np.testing.assert_allclose(P.sum(1), 1, rtol=1e-12)
    np.testing.assert_array_equal(probe.classes_[P.argmax(1)], probe.predict(Xte))


def test_a_fixed_C_is_calibrated_too_and_calibrate_false_has_no_probabilities(digits):
    Xtr, Xte, ytr, _ = digits
    fixed = LinearProbe(C=0.1).fit(Xtr, ytr)
    assert fixed.cv_results_ == [] and fixed.calibrated and fixed.predict_proba(Xte).shape == (len(Xte), 10)
    off = LinearProbe(C=0.1, calibrate=False).fit(Xtr, ytr)
    assert not off.calibrated
    with pytest.raises(TransferkitError, match="no calibrated probabilities"):
        off.predict_proba(Xte)


def test_a_pipeline_ending_in_a_probe_has_predict_proba(digits):
    Xtr, Xte, ytr, _ = digits
    pipe = make_pipeline(PCA(n_components=20, random_state=0), LinearProbe(Cs=(0.01, 0.1), cv=3)).fit(Xtr, ytr)
    P = pipe.predict_proba(Xte)
    np.testing.assert_allclose(P.sum(1), 1, rtol=1e-12)
    np.testing.assert_array_equal(pipe.classes_[P.argmax(1)], pipe.predict(Xte))


def test_saved_probe_keeps_its_probabilities_and_old_probes_load_without(digits, probe, tmp_path, old_probe_format):
    _, Xte, _, _ = digits
    probe.save(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "probe.json").read_text())["calibration"] == "temperature"
    np.testing.assert_array_equal(LinearProbe.load(tmp_path / "p").predict_proba(Xte), probe.predict_proba(Xte))
    old_probe_format(tmp_path / "p")  # as transferkit wrote it before calibration: format 2, no temperature
    old = LinearProbe.load(tmp_path / "p")
    np.testing.assert_array_equal(old.decision_function(Xte), probe.decision_function(Xte))
    assert not old.calibrated
    with pytest.raises(TransferkitError, match="saved before probes were calibrated"):
        old.predict_proba(Xte)


def test_temperature_fit_recovers_the_temperature_that_made_the_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (20_000, 5))
    y = np.array([rng.choice(5, p=p) for p in softmax(logits / 2.5, axis=1)])
    assert fit_temperature(logits, y) == pytest.approx(2.5, rel=0.05)
    s = rng.normal(0, 2, 10_000)  # a binary SVM's one column s is the logits (-s, s)
    yb = (rng.random(10_000) < 1 / (1 + np.exp(-2 * s / 4.0))).astype(int)
    assert fit_temperature(s, yb) == pytest.approx(4.0, rel=0.05)
    np.testing.assert_allclose(temperature_proba(s, 4.0)[:, 1], 1 / (1 + np.exp(-s / 2)))


def test_expected_calibration_error_is_the_binned_gap_of_top_class_confidence():
    # 10 rows at confidence 0.9 of which 5 right (gap 0.4), 10 at 0.55 all right (gap 0.45): 0.5 x 0.4 + 0.5 x 0.45
    proba = np.array([[0.9, 0.1]] * 10 + [[0.45, 0.55]] * 10)
    y = np.array([0] * 5 + [1] * 5 + [1] * 10)
    assert expected_calibration_error(y, proba) == pytest.approx(0.425)
    assert expected_calibration_error(["b", "a"], [[0.2, 0.8], [0.8, 0.2]], ["a", "b"]) == pytest.approx(0.2)
    with pytest.raises(DataError, match="one row per label"):
        expected_calibration_error([0, 1], [[0.5, 0.5]])


def test_multilabel_probabilities_are_per_label_platt_sigmoids(digits, tmp_path, old_probe_format):
    Xtr, Xte, ytr, yte = digits
    loops = np.isin(np.arange(10), [0, 6, 8, 9])
    Y = np.stack([ytr % 2 == 0, ytr >= 5, loops[ytr]], 1).astype(int)  # even, large, has a loop
    probe = MultiLabelProbe(Cs=(0.01,), cv=3).fit(Xtr, Y)
    P, S = probe.predict_proba(Xte), probe.decision_function(Xte)
    assert P.shape == (len(Xte), 3) and (P > 0).all() and (P < 1).all() and probe.calibrated
    for j in range(3):  # each label's probability rises with its own score
        order = np.argsort(S[:, j])
        assert (np.diff(P[order, j]) >= 0).all()
    Yte = np.stack([yte % 2 == 0, yte >= 5, loops[yte]], 1)
    assert np.mean((P >= 0.5) == Yte) > 0.9
    probe.save(tmp_path / "m", extra={"multilabel": True})
    np.testing.assert_array_equal(MultiLabelProbe.load(tmp_path / "m").predict_proba(Xte), P)
    old_probe_format(tmp_path / "m")
    old = MultiLabelProbe.load(tmp_path / "m")
    assert not old.calibrated
    np.testing.assert_array_equal(old.predict(Xte), probe.predict(Xte))


def test_platt_of_a_label_never_present_is_its_smoothed_base_rate():
    scores = np.array([[-1.0, 0.5], [-2.0, -0.5], [-1.5, 1.0], [-0.5, -1.0]])
    platt = fit_platt(scores, np.array([[0, 1], [0, 0], [0, 1], [0, 0]]))
    np.testing.assert_allclose(platt_proba(scores, platt)[:, 0], 1 / 6)  # (0 + 1) / (4 + 2)
    assert platt[1, 0] > 0
