"""Scores of a classifier on labelled codes: accuracy, confusion matrix and per-class report, in one Evaluation."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix

from transferkit.errors import DataError

if TYPE_CHECKING:
    from transferkit.probe.linear import LinearProbe


@dataclass(frozen=True, eq=False)  # eq=False: ndarray fields make == ambiguous
class Evaluation:
    """Held-out performance of a probe: what a report or a plot needs."""

    accuracy: float
    labels: list[str]
    confusion: np.ndarray  # (n_labels, n_labels): rows are true labels, columns predictions
    report: str  # sklearn classification_report text
    per_class: dict[str, dict[str, float]]  # label -> precision, recall, f1, support

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {**dataclasses.asdict(self), "confusion": self.confusion.tolist()}


def evaluate(probe: LinearProbe, X: Any, y: Any, *, names: Sequence[str] | None = None) -> Evaluation:
    """Accuracy, confusion matrix and per-class scores of `probe` on held-out X, y.

    `names`: class names for integer labels (label i is names[i]), used in the report and plots.
    """
    y = np.asarray(y)
    pred = probe.predict(X)
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
    return Evaluation(float(accuracy_score(y, pred)), labels, confusion_matrix(y, pred, labels=label_values),
                      classification_report(y, pred, **kwargs), per_class)
