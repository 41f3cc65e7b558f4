"""Imbalanced classes: class_weight, the CV metric ('auto' by imbalance), balanced accuracy and macro-F1 everywhere."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.datasets import make_classification
from sklearn.metrics import balanced_accuracy_score, f1_score

from transferkit.errors import ParameterError
from transferkit.probe.linear import LinearProbe
from transferkit.probe.metrics import AUTO_BALANCED_RATIO, cv_metric, imbalance_ratio, score_predictions
from transferkit.probe.sweep import sweep


@pytest.fixture(scope="module")
def long_tail():
    """A 3-class problem, 90% / 8% / 2% for training, scored on a balanced held-out set from the same draw."""
    X, y = make_classification(n_samples=12_000, n_features=20, n_informative=6, n_classes=3, class_sep=0.7,
                               flip_y=0, random_state=0)
    rng = np.random.default_rng(0)
    train = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:n] for c, n in enumerate((900, 80, 20))])
    rest = np.setdiff1d(np.arange(len(y)), train)
    test = np.concatenate([rest[y[rest] == c][:1000] for c in range(3)])
    return X[train], y[train], X[test], y[test]


def test_class_weight_changes_the_svm_and_raises_balanced_accuracy(long_tail):
    X, y, X_test, y_test = long_tail
    plain, weighted = (LinearProbe(C=0.1, class_weight=w).fit(X, y) for w in (None, "balanced"))
    assert not np.allclose(plain.arrays()["coef"], weighted.arrays()["coef"])
    scores = [balanced_accuracy_score(y_test, p.predict(X_test)) for p in (plain, weighted)]
    assert scores[1] > scores[0] + 0.05, scores  # measured: 0.37 -> 0.47
    assert weighted.get_params()["class_weight"] == "balanced"


def test_auto_metric_follows_the_imbalance(long_tail):
    X, y, _, _ = long_tail
    assert imbalance_ratio(y) == 45.0 and cv_metric("auto", y) == "balanced_accuracy"
    assert cv_metric("auto", np.repeat([0, 1], [3, 2])) == "accuracy"  # 1.5: not above AUTO_BALANCED_RATIO
    assert AUTO_BALANCED_RATIO == 1.5 and cv_metric("accuracy", y) == "accuracy"
    probe = LinearProbe(Cs=(0.01, 0.1), cv=3).fit(X, y)
    assert probe.metric_ == "balanced_accuracy"
    forced = LinearProbe(Cs=(0.01, 0.1), cv=3, metric="accuracy").fit(X, y)
    assert forced.metric_ == "accuracy"
    assert forced.cv_results_[0]["mean"] > probe.cv_results_[0]["mean"]  # plain accuracy rewards the big class


def test_bad_class_weight_and_metric_name_the_parameter(long_tail):
    X, y, _, _ = long_tail
    for param, value in (("class_weight", "auto"), ("metric", "f1")):
        with pytest.raises(ParameterError, match=f"The '{param}' parameter of LinearProbe must be") as err:
            LinearProbe(**{param: value}).fit(X, y)
        assert err.value.param == param


def test_saved_probe_records_weighting_and_old_probes_load(long_tail, tmp_path):
    X, y, X_test, _ = long_tail
    probe = LinearProbe(Cs=(0.01,), cv=2, class_weight="balanced").fit(X, y)
    probe.save(tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert meta["params"]["class_weight"] == "balanced" and meta["metric"] == "balanced_accuracy"
    again = LinearProbe.load(tmp_path / "p")
    assert again.class_weight == "balanced" and again.metric_ == "balanced_accuracy"
    # a probe written before class_weight and metric existed (format 1): unweighted, C chosen by accuracy
    for key in ("class_weight", "metric"):
        del meta["params"][key]
    del meta["metric"]
    meta["version"] = 1
    (tmp_path / "p" / "probe.json").write_text(json.dumps(meta))
    old = LinearProbe.load(tmp_path / "p")
    assert old.class_weight is None and old.metric_ == "accuracy"
    np.testing.assert_array_equal(old.predict(X_test), probe.predict(X_test))


def test_evaluation_has_balanced_accuracy_macro_f1_and_per_class():
    y = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 0, 0, 0, 0, 0, 1, 0, 2])
    ev = score_predictions(y, pred, np.arange(3), ["a", "b", "c"])
    assert ev.accuracy == 0.8
    assert ev.balanced_accuracy == pytest.approx(balanced_accuracy_score(y, pred)) == pytest.approx(2 / 3)
    assert ev.macro_f1 == pytest.approx(f1_score(y, pred, average="macro"))
    d = ev.to_dict()
    assert {"balanced_accuracy", "macro_f1", "per_class"} <= d.keys()
    assert d["per_class"]["b"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2.0}
    assert "balanced accuracy: 66.67%" in ev.summary() and "macro-F1: " in ev.summary()


def test_sweep_ranks_by_balanced_accuracy_when_imbalanced(long_tail):
    X, y, _, _ = long_tail
    views = {("a", "avg"): X[:, :10], ("b", "avg"): X}
    auto = sweep(views, y, Cs=(0.1,), cv=2, progress=False)
    assert auto.metric == "balanced_accuracy" and auto.to_dict()["metric"] == "balanced_accuracy"
    assert "cv bal acc %" in auto.table()
    plain = sweep(views, y, Cs=(0.1,), cv=2, progress=False, metric="accuracy")
    assert plain.metric == "accuracy" and "cv acc %" in plain.table()
    assert plain.rows[1]["cv_accuracy"] > auto.rows[1]["cv_accuracy"]
    balanced = sweep(views, np.arange(len(y)) % 3, Cs=(0.1,), cv=2, progress=False)
    assert balanced.metric == "accuracy"


def test_cli_probe_class_weight_and_metrics_json(photo_folder, tmp_path, cli_run):
    for extra in sorted((photo_folder / "flower").iterdir())[3:]:  # 8 temples, 3 flowers: imbalance 2.7
        extra.unlink()
    codes = tmp_path / "codes"
    cli_run("extract", photo_folder, "-o", codes, "--image-size", "32")
    out = cli_run("probe", codes, "--test", codes, "-o", tmp_path / "p", "--cv", "2", "--class-weight",
                  "balanced").output
    assert "CV balanced accuracy" in out and "balanced accuracy: " in out and "macro-F1: " in out
    metrics = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert metrics["class_weight"] == "balanced" and metrics["cv_metric"] == "balanced_accuracy"
    assert {"balanced_accuracy", "macro_f1", "per_class"} <= metrics["test"].keys()
    assert metrics["test"]["per_class"]["flower"]["support"] == 3
    bad = cli_run("probe", codes, "-o", tmp_path / "q", "--class-weight", "auto", ok=False)
    assert bad.exit_code == 2 and "Invalid value for '--class-weight'" in bad.output
    bad = cli_run("sweep", codes, "--metric", "f1", ok=False)
    assert bad.exit_code == 2 and "Invalid value for '--metric'" in bad.output


def test_a_class_weight_dict_round_trips(long_tail, tmp_path):
    X, y, X_test, _ = long_tail
    probe = LinearProbe(C=0.1, class_weight={0: 1.0, 1: 5.0, 2: 20.0}).fit(X, y)
    probe.save(tmp_path / "p")
    again = LinearProbe.load(tmp_path / "p")
    assert again.class_weight == {0: 1.0, 1: 5.0, 2: 20.0}
    np.testing.assert_array_equal(again.predict(X_test), probe.predict(X_test))
