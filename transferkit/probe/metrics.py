"""Scores of a classifier on labelled codes: accuracy, balanced accuracy, macro-F1, confusion matrix and per-class
report, in one Evaluation; which score chooses C and ranks the sweep (`cv_metric`); and how well probabilities
are calibrated (`expected_calibration_error`, the one definition every report and benchmark uses)."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
)

from transferkit.errors import DataError
from transferkit.probe.params import AUTO_BALANCED_RATIO

if TYPE_CHECKING:
    from transferkit.probe.linear import LinearProbe

SCORERS = {"accuracy": "accuracy", "balanced_accuracy": "balanced_accuracy"}  # metric -> sklearn scoring name
ECE_BINS = 15  # equal-width confidence bins, as in Guo et al. 2017 ("On Calibration of Modern Neural Networks")


def expected_calibration_error(y: Any, proba: Any, classes: Any = None, *, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top class: the share-weighted mean, over `n_bins` equal-width bins of
    top-class probability ((0, 1/n], ..., ((n-1)/n, 1]), of |accuracy - mean probability| in the bin.

    Why one definition: ECE moves with its binning, so a figure means something only if every report and
    benchmark bins the same way. `proba` (n, n_classes) has columns in `classes` order (default 0..n_classes-1).
    """
    proba = np.asarray(proba, dtype=np.float64)
    y = np.asarray(y)
    if proba.ndim != 2 or len(proba) != len(y) or not len(y):
        raise DataError(f"proba must be (n, n_classes) with one row per label; got {proba.shape} for {len(y)} labels")
    classes = np.arange(proba.shape[1]) if classes is None else np.asarray(classes)
    confidence = proba.max(1)
    correct = classes[proba.argmax(1)] == y
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    # per bin: |sum of correct - sum of probability| / n = (its share) x |accuracy - mean probability|
    gap = np.abs(np.bincount(bins, correct, n_bins) - np.bincount(bins, confidence, n_bins))
    return float(gap.sum() / len(y))


def imbalance_ratio(y: Any) -> float:
    """Largest class count / smallest class count of labels `y` (1.0 when balanced)."""
    counts = np.unique(np.asarray(y), return_counts=True)[1]
    return float(counts.max() / counts.min())


def cv_metric(metric: str, y: Any) -> str:
    """The score that chooses C and ranks views: `metric`, or for 'auto' balanced accuracy when the classes of `y`
    are imbalanced (ratio > AUTO_BALANCED_RATIO), else accuracy."""
    if metric != "auto":
        return metric
    return "balanced_accuracy" if imbalance_ratio(y) > AUTO_BALANCED_RATIO else "accuracy"


@dataclass(frozen=True, eq=False)  # eq=False: ndarray fields make == ambiguous
class Evaluation:
    """Held-out performance of a probe: what a report or a plot needs."""

    accuracy: float
    balanced_accuracy: float  # mean recall over the labels: a majority-class guesser scores 1 / n_classes
    macro_f1: float  # unweighted mean of the per-class F1
    labels: list[str]
    confusion: np.ndarray  # (n_labels, n_labels): rows are true labels, columns predictions
    report: str  # sklearn classification_report text
    per_class: dict[str, dict[str, float]]  # label -> precision, recall, f1, support

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {**dataclasses.asdict(self), "confusion": self.confusion.tolist()}

    def summary(self) -> str:
        """One line for every report: accuracy with balanced accuracy and macro-F1 beside it (imbalance shows)."""
        return (f"accuracy: {100 * self.accuracy:.2f}%, balanced accuracy: {100 * self.balanced_accuracy:.2f}%, "
                f"macro-F1: {100 * self.macro_f1:.2f}% ({int(self.confusion.sum())} images)")


def evaluate(probe: LinearProbe, X: Any, y: Any, *, names: Sequence[str] | None = None) -> Evaluation:
    """Accuracy, confusion matrix and per-class scores of `probe` on held-out X, y.

    `names`: class names for integer labels (label i is names[i]), used in the report and plots.
    """
    return evaluate_predictions(probe, probe.predict(X), y, names=names)


def evaluate_predictions(probe: LinearProbe, pred: Any, y: Any, *,
                         names: Sequence[str] | None = None) -> Evaluation:
    """`evaluate` from predictions already made (`predict_from_scores` of flip-averaged scores, say)."""
    y = np.asarray(y)
    if len(y) != len(pred):
        raise DataError(f"X has {len(pred)} rows but y has {len(y)} labels.")
    try:  # labels absent from training still count, as rows the probe always gets wrong
        label_values = np.union1d(probe.classes_, np.unique(y))
    except TypeError as err:
        raise DataError(f"Labels in y are not comparable with the probe's classes: {err}") from err
    return score_predictions(y, pred, label_values, names)


def score_predictions(y: Any, pred: Any, label_values: Any, names: Sequence[str] | None = None) -> Evaluation:
    """Evaluation of any classifier's predictions (probe or fine-tuned net) over `label_values`."""
    labels = [str(names[int(v)]) if names is not None else str(v) for v in label_values]
    kwargs = {"labels": label_values, "target_names": labels, "zero_division": 0}
    raw = classification_report(y, pred, output_dict=True, **kwargs)
    keys = {"precision": "precision", "recall": "recall", "f1": "f1-score", "support": "support"}
    per_class = {name: {ours: float(raw[name][theirs]) for ours, theirs in keys.items()} for name in labels}
    present = np.unique(np.asarray(y))  # balanced accuracy: recall over the classes the data has
    with warnings.catch_warnings():  # predictions of a class y lacks: sklearn warns, and counts them as wrong
        warnings.simplefilter("ignore", UserWarning)
        balanced = float(balanced_accuracy_score(y, pred))
    macro_f1 = float(f1_score(y, pred, labels=present, average="macro", zero_division=0))
    return Evaluation(float(accuracy_score(y, pred)), balanced, macro_f1, labels,
                      confusion_matrix(y, pred, labels=label_values), classification_report(y, pred, **kwargs),
                      per_class)


@dataclass(frozen=True)
class MultiLabelEvaluation:
    """Held-out performance on multi-label data: mAP (the mean over labels of average precision, which needs no
    threshold), and micro/macro F1 and per-label scores at the chosen per-label thresholds."""

    mAP: float
    micro_f1: float
    macro_f1: float
    labels: list[str]
    per_label: dict[str, dict[str, float]]  # label -> ap, f1, precision, recall, support, threshold
    report: str
    n: int  # images scored

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """One line for every report, as Evaluation.summary."""
        return f"mAP: {self.mAP:.4f}, micro-F1: {self.micro_f1:.4f}, macro-F1: {self.macro_f1:.4f} ({self.n} images)"


def score_multilabel(Y: Any, scores: Any, thresholds: Any, names: Sequence[str]) -> MultiLabelEvaluation:
    """Evaluation of per-label `scores` (n, L) against 0/1 targets `Y` (n, L), predicting label j where
    scores[:, j] >= thresholds[j]. Labels with no positive image are left out of mAP (AP is undefined there)."""
    from sklearn.metrics import average_precision_score, f1_score, precision_recall_fscore_support

    Y, scores = np.asarray(Y), np.asarray(scores, dtype=np.float64).reshape(len(Y), -1)
    if Y.shape != scores.shape:
        raise DataError(f"targets have shape {Y.shape} but the scores {scores.shape}")
    pred = (scores >= np.asarray(thresholds)).astype(np.int64)
    precision, recall, f1, support = precision_recall_fscore_support(Y, pred, average=None, zero_division=0)
    has_positives = Y.sum(0) > 0
    ap = np.array([average_precision_score(Y[:, j], scores[:, j]) if has_positives[j] else np.nan
                   for j in range(Y.shape[1])])
    per_label = {str(name): {"ap": None if np.isnan(ap[j]) else float(ap[j]), "f1": float(f1[j]),
                             "precision": float(precision[j]), "recall": float(recall[j]),
                             "support": int(support[j]),
                             "threshold": float(t) if np.isfinite(t := np.asarray(thresholds)[j]) else None}
                 for j, name in enumerate(names)}
    lines = [f"{'label':>20} {'AP':>6} {'F1':>6} {'prec':>6} {'recall':>6} {'support':>8}"]
    lines += [f"{name[:20]:>20} {'-' if s['ap'] is None else format(s['ap'], '.3f'):>6} {s['f1']:6.3f} "
              f"{s['precision']:6.3f} {s['recall']:6.3f} {s['support']:8d}" for name, s in per_label.items()]
    mAP = float(np.nanmean(ap)) if has_positives.any() else float("nan")
    micro = float(f1_score(Y, pred, average="micro", zero_division=0))
    macro = float(f1_score(Y, pred, average="macro", zero_division=0))
    lines.append(f"\nmAP {mAP:.4f}  micro-F1 {micro:.4f}  macro-F1 {macro:.4f}  ({len(Y)} images)")
    return MultiLabelEvaluation(mAP, micro, macro, [str(n) for n in names], per_label, "\n".join(lines) + "\n",
                                len(Y))
