"""Multi-label linear probe (MultiLabelProbe): one linear SVM per label, C chosen by cross-validated mAP, and a
decision threshold per label chosen on out-of-fold scores to maximise that label's F1.

Why: in multi-label data each label is its own yes/no question with its own base rate, so a label is scored
by average precision (no threshold needed) and decided by a threshold of its own; the SVM margin (0) would
favour frequent labels. The thresholds come from folds the SVMs did not train on, as the test set will, and so
does `predict_proba`'s Platt sigmoid per label (probe.calibration).
The fitted SVMs are stored as one (n_labels, n_features) coefficient matrix, the same arrays a LinearProbe
saves, so saving, loading and network surgery work alike.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import average_precision_score, precision_recall_curve
from sklearn.model_selection import KFold
from sklearn.utils.validation import check_X_y

from transferkit.errors import DataError, ParameterError
from transferkit.probe.calibration import fit_platt, platt_proba
from transferkit.probe.linear import LinearProbe, warn_unconverged
from transferkit.probe.params import MULTILABEL_HEADS

logger = logging.getLogger(__name__)


class MultiLabelProbe(LinearProbe):
    """One linear SVM per label on CNN codes; `predict` gives (n, n_labels) 0/1, `score` the mAP.

    Same parameters as LinearProbe; C='auto' picks the C of best out-of-fold mAP (smallest first, stopping
    once it drops); `thresholds_` are the per-label decision thresholds.
    """

    def fit(self, X: Any, Y: Any) -> MultiLabelProbe:
        """Choose C (if 'auto') and the thresholds by K-fold CV on X, Y, then fit every label on all rows."""
        self._check_params()
        if isinstance(self.class_weight, Mapping):
            raise ParameterError("The 'class_weight' parameter of MultiLabelProbe must be None or 'balanced' (each "
                                 "label's SVM weighs its own positives and negatives). Got a dict instead.",
                                 param="class_weight")
        if self.head not in MULTILABEL_HEADS:
            raise ParameterError(f"The 'head' parameter of MultiLabelProbe must be 'svm' (one SVM per label). "
                                 f"Got {self.head!r} instead.", param="head")
        self.head_ = "svm"
        if self.metric != "auto":
            raise ParameterError(f"The 'metric' parameter of MultiLabelProbe must be 'auto' (C is chosen by mAP). "
                                 f"Got {self.metric!r} instead.", param="metric")
        self.metric_ = "mAP"
        X, Y = check_multilabel(X, Y)
        self.classes_ = np.arange(Y.shape[1])
        self.n_features_in_ = X.shape[1]
        rows = self._cv_rows(len(Y))
        self.cv_results_, oof, n_bad, n_fits = self._cv_path(X[rows], Y[rows])
        best = max(self.cv_results_, key=lambda r: r["mean"])  # ties: the first, i.e. the smaller C
        self.best_C_, self.cv_score_ = best["C"], best["mean"]
        self.thresholds_ = best_thresholds(Y[rows], oof)
        self.temperature_ = None  # one softmax over labels means nothing here: each label has its own sigmoid
        self.platt_ = fit_platt(oof, Y[rows]) if self.calibrate else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.pipeline_, bad = self._fit_labels(X, Y, self.best_C_)
        self.n_iter_ = int(self.pipeline_.named_steps["svm"].n_iter_)
        self.converged_ = bad == 0
        warn_unconverged(n_bad + bad, n_fits + Y.shape[1], self.max_iter)
        return self

    def _cv_path(self, X: np.ndarray, Y: np.ndarray, *, log_each: bool = True,
                 metric: str | None = None) -> tuple[list[dict[str, float]], np.ndarray, int, int]:
        """Out-of-fold mAP for each C in ascending order (only C unless it is 'auto'), stopping once it drops.

        Returns the rows {"C", "mean" (mAP over all out-of-fold scores), "std" (over the folds' own mAPs)},
        the out-of-fold scores at the best C, the number of label fits that hit max_iter, and of all. The layer
        sweep calls this too (`metric` is accepted for its sake: a multi-label probe is always scored by mAP).
        """
        folds = KFold(n_splits=min(self.cv, len(Y)), shuffle=True, random_state=self.random_state)
        Cs = sorted({float(c) for c in self.Cs}) if self.C == "auto" else [float(self.C)]
        rows: list[dict[str, float]] = []
        best_oof, best_score, n_bad, n_fits = None, -1.0, 0, 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            for C in Cs:
                oof, per_fold = np.zeros(Y.shape), []
                for fit_idx, val_idx in folds.split(X):
                    pipe, bad = self._fit_labels(X[fit_idx], Y[fit_idx], C)
                    oof[val_idx] = _scores(pipe, X[val_idx])
                    per_fold.append(mean_average_precision(Y[val_idx], oof[val_idx]))
                    n_bad, n_fits = n_bad + bad, n_fits + Y.shape[1]
                score = mean_average_precision(Y, oof)
                rows.append({"C": C, "mean": score, "std": float(np.std(per_fold))})
                logger.log(logging.INFO if log_each else logging.DEBUG, "C=%g: %d-fold CV mAP %.4f", C,
                           folds.n_splits, score)
                if best_oof is None or score > best_score:
                    best_oof, best_score = oof, score
                elif score < best_score:
                    break
        return rows, best_oof, n_bad, n_fits

    def decision_function(self, X: Any) -> np.ndarray:
        """Per-label SVM scores, (n, n_labels)."""
        return _scores(self.pipeline_, self._check_x(X))

    def proba_from_scores(self, scores: Any) -> np.ndarray:
        """(n, n_labels) probability of each label on its own (Platt: sigmoid(a s + b), fitted on out-of-fold
        scores), so a row need not sum to 1; the order is `classes_`'s."""
        if getattr(self, "platt_", None) is None:
            return super().proba_from_scores(scores)  # the error: no calibration
        return platt_proba(scores, self.platt_)

    @property
    def calibrated(self) -> bool:
        return getattr(self, "platt_", None) is not None

    def predict(self, X: Any) -> np.ndarray:
        """(n, n_labels) 0/1: label j where its score reaches thresholds_[j]."""
        return self.predict_from_scores(self.decision_function(X))

    def predict_from_scores(self, scores: Any) -> np.ndarray:
        return (np.asarray(scores) >= self.thresholds_).astype(np.int64)

    def refit(self, X: Any, Y: Any) -> MultiLabelProbe:
        """Not for multi-label probes: their thresholds are chosen on the scores of the rows `fit` saw, so rows
        added later (flip's mirror images) would leave them stale."""
        raise DataError("refit is for single-label probes: a multi-label probe's thresholds are chosen on the rows "
                        "fit saw; fit it again instead.")

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """Mean average precision over the labels present in `y` (a multi-label probe has no single accuracy)."""
        return mean_average_precision(np.asarray(y), self.decision_function(X))

    def arrays(self) -> dict[str, np.ndarray]:
        platt = {} if getattr(self, "platt_", None) is None else {"platt": self.platt_}
        return {**super().arrays(), "thresholds": self.thresholds_, **platt}

    def _restore(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        super()._restore(arrays, meta)
        self.thresholds_ = np.asarray(arrays["thresholds"], dtype=np.float64)
        if self.thresholds_.shape != (len(self.classes_),):
            raise ValueError("thresholds do not match the labels")
        self.platt_ = np.asarray(arrays["platt"], dtype=np.float64) if "platt" in arrays else None  # format <= 2
        if self.platt_ is not None and self.platt_.shape != (len(self.classes_), 2):
            raise ValueError("platt does not match the labels")

    def _cv_rows(self, n: int) -> np.ndarray:
        """At most cv_max_samples rows (a seeded random subset) to choose C and thresholds on."""
        if self.cv_max_samples is None or n <= self.cv_max_samples:
            return np.arange(n)
        rng = np.random.default_rng(self.random_state if isinstance(self.random_state, int) else 0)
        return np.sort(rng.choice(n, self.cv_max_samples, replace=False))

    def _fit_labels(self, X: np.ndarray, Y: np.ndarray, C: float):
        """The scaler fitted on X and one SVM per label, stacked into the pipeline's svm (coef_ (L, D));
        returns it and the number of label fits that hit max_iter. A label that is always (or never) present
        in Y gets a constant score of +1 (or -1)."""
        pipe = self._make_pipeline(C, X.shape)
        scaled = pipe.named_steps["scale"].fit_transform(X) if pipe.named_steps["scale"] != "passthrough" else X
        svm = pipe.named_steps["svm"]
        coef, intercept, iters = np.zeros((Y.shape[1], X.shape[1])), np.zeros(Y.shape[1]), [0]
        for j in range(Y.shape[1]):
            if Y[:, j].min() == Y[:, j].max():
                intercept[j] = 1.0 if Y[0, j] else -1.0
                continue
            one = self._make_pipeline(C, X.shape).named_steps["svm"].fit(scaled, Y[:, j])
            coef[j], intercept[j] = one.coef_[0], one.intercept_[0]
            iters.append(int(one.n_iter_))
        svm.coef_, svm.intercept_, svm.classes_ = coef, intercept, np.arange(Y.shape[1])
        svm.n_features_in_, svm.n_iter_ = X.shape[1], max(iters)
        return pipe, sum(i >= self.max_iter for i in iters)


def _scores(pipe, X: np.ndarray) -> np.ndarray:
    return np.asarray(pipe.decision_function(X), dtype=np.float64).reshape(len(X), -1)


def check_multilabel(X: Any, Y: Any) -> tuple[np.ndarray, np.ndarray]:
    """Codes (n, D) and 0/1 targets (n, L) with L >= 1, at least 2 rows, some label present somewhere."""
    try:
        X, Y = check_X_y(X, Y, dtype=(np.float64, np.float32), multi_output=True)
    except ValueError as err:
        raise DataError(f"Bad training data: {err}") from err
    Y = np.asarray(Y)
    if Y.ndim != 2 or not np.isin(Y, (0, 1)).all():
        raise DataError(f"Multi-label targets must be a 0/1 array (n_images, n_labels); got shape {Y.shape} with "
                        f"values {np.unique(Y)[:5].tolist()}")
    if len(Y) < 2 or not Y.any():
        raise DataError("Need at least 2 images and at least one label present to train a multi-label probe")
    return X, Y.astype(np.int64)


def mean_average_precision(Y: np.ndarray, scores: np.ndarray) -> float:
    """The mean over labels with at least one positive of average precision (macro AP, 'mAP')."""
    present = [j for j in range(Y.shape[1]) if Y[:, j].any()]
    return float(np.mean([average_precision_score(Y[:, j], scores[:, j]) for j in present])) if present else 0.0


def best_thresholds(Y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per label, the score threshold that maximises F1 on (out-of-fold) `scores`; +inf for a label never
    present (never predicted), -inf for one always present."""
    out = np.empty(Y.shape[1])
    for j in range(Y.shape[1]):
        if Y[:, j].min() == Y[:, j].max():
            out[j] = -np.inf if Y[0, j] else np.inf
            continue
        precision, recall, thresholds = precision_recall_curve(Y[:, j], scores[:, j])
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        out[j] = thresholds[int(np.argmax(f1))]
    return out
