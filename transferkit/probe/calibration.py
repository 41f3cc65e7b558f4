"""Probabilities from probe scores, fitted on out-of-fold scores: one temperature for a LinearProbe's SVM scores
(softmax(scores / T)), and Platt's sigmoid per label for a MultiLabelProbe.

Why out-of-fold: an SVM's scores on its own training rows are overconfident; the folds that already chose C give
scores on rows each fold did not train on, as a test set will, so calibration costs no extra fit.
Why one temperature (not scikit-learn's CalibratedClassifierCV with per-class sigmoids or isotonic regression):
on Fashion-MNIST codes it reached the same or a lower expected calibration error, it keeps the SVM's ranking (the
argmax of predict_proba is predict's), and it is one number to fit and save (docs/benchmarks.md, 'calibration').
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_softmax, logit, softmax

_LOG_T_BOUNDS = (-10.0, 10.0)  # as scikit-learn's temperature scaling: T in e^-10 .. e^10


def as_logits(scores: Any) -> np.ndarray:
    """(n, n_classes) logits from decision scores; a binary SVM's one column s becomes (-s, s), as in scikit-learn."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1 or scores.shape[1] == 1:
        s = scores.reshape(-1, 1)
        return np.hstack([-s, s])
    return scores


def temperature_proba(scores: Any, temperature: float) -> np.ndarray:
    """softmax(scores / temperature) over the classes: rows sum to 1, argmax is the scores' argmax."""
    return softmax(as_logits(scores) / temperature, axis=1)


def fit_temperature(scores: Any, y_index: Any) -> float:
    """The temperature T that minimises the log loss of softmax(scores / T) for class indices `y_index`
    (columns of `scores`); fitted over log T, so T stays positive."""
    logits, y_index = as_logits(scores), np.asarray(y_index)
    rows = np.arange(len(y_index))

    def nll(log_t: float) -> float:
        return -float(log_softmax(logits / np.exp(log_t), axis=1)[rows, y_index].mean())

    return float(np.exp(minimize_scalar(nll, bounds=_LOG_T_BOUNDS, method="bounded").x))


def fit_platt(scores: Any, Y: Any) -> np.ndarray:
    """(n_labels, 2) Platt parameters (a, b), one pair per label: P(label | score s) = sigmoid(a s + b), fitted by
    scikit-learn's LogisticRegression on that label's (out-of-fold) scores. A label always or never present gets
    a = 0 and b = logit((positives + 1) / (n + 2)), Platt's smoothed base rate."""
    from sklearn.linear_model import LogisticRegression

    scores, Y = np.asarray(scores, dtype=np.float64), np.asarray(Y)
    out = np.zeros((Y.shape[1], 2))
    for j in range(Y.shape[1]):
        if Y[:, j].min() == Y[:, j].max():
            out[j] = 0.0, logit((Y[:, j].sum() + 1) / (len(Y) + 2))
            continue
        lr = LogisticRegression().fit(scores[:, j:j + 1], Y[:, j])  # default C=1: finite a on separable labels
        out[j] = lr.coef_[0, 0], lr.intercept_[0]
    return out


def platt_proba(scores: Any, platt: np.ndarray) -> np.ndarray:
    """(n, n_labels) per-label probabilities sigmoid(a s + b); each label on its own, so rows need not sum to 1."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1, len(platt))
    return expit(scores * platt[:, 0] + platt[:, 1])
