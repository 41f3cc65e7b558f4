"""The probe's heads and scalings: what LinearProbe fits on codes, each a linear classifier (coef_, intercept_).

Heads: a one-vs-rest linear SVM (liblinear), a multinomial logistic regression (lbfgs) and a cosine nearest-class-
mean classifier, which cross-domain few-shot work finds strongest on L2-normalised codes. Scalings: standardise,
L2-normalise (scikit-learn's Normalizer: unit length), or centre / standardise then L2-normalise (`UnitScaler`).
Every head is linear, so a saved probe is its coef and intercept and the scaler's statistics, whatever the head.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.linear_model import LogisticRegression
from sklearn.linear_model._base import LinearClassifierMixin
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import LinearSVC
from sklearn.utils.multiclass import unique_labels
from sklearn.utils.validation import check_is_fitted, validate_data

_DUAL_RATIO = 10  # liblinear's dual solver beats the primal one until n_samples > ~10 x n_features


class UnitScaler(TransformerMixin, BaseEstimator):
    """Centre (`center`) or standardise (`standardize`) each feature, then scale each row to length sqrt(n_features).

    Length sqrt(d) rather than 1: a row then has the root-mean-square 1 per feature that a standardised row has,
    so one C grid serves every scaling (a unit-length row would need C about d times larger).
    """

    def __init__(self, center: bool = True, standardize: bool = False) -> None:
        self.center = center
        self.standardize = standardize

    def fit(self, X: Any, y: Any = None) -> UnitScaler:
        X = validate_data(self, X, dtype=(np.float64, np.float32))
        self.mean_ = X.mean(0) if self.center or self.standardize else np.zeros(X.shape[1])
        std = X.std(0) if self.standardize else np.ones(X.shape[1])
        self.scale_ = np.where(std > 0, std, 1.0)  # a constant feature stays 0, as StandardScaler keeps it
        return self

    def transform(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "mean_")
        X = validate_data(self, X, dtype=(np.float64, np.float32), reset=False)
        Z = (X - self.mean_.astype(X.dtype)) / self.scale_.astype(X.dtype)
        norms = np.linalg.norm(Z, axis=1, keepdims=True)
        return Z * (np.sqrt(Z.shape[1]) / np.where(norms > 0, norms, 1.0))


class NearestClassMean(LinearClassifierMixin, BaseEstimator):
    """Cosine nearest-class-mean: each class's score is the dot product of a row with its class's mean row scaled
    to unit length (a cosine on L2-normalised rows). No C: nothing to regularise; the temperature calibrates it."""

    def fit(self, X: Any, y: Any) -> NearestClassMean:
        X, y = validate_data(self, X, y, dtype=(np.float64, np.float32))
        self.classes_ = unique_labels(y)
        means = np.stack([X[y == c].mean(0) for c in self.classes_])  # (n_classes, d)
        means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), np.finfo(means.dtype).tiny)
        if len(self.classes_) == 2:  # one column, as scikit-learn's binary linear classifiers: s1 - s0
            self.coef_, self.intercept_ = (means[1] - means[0])[None], np.zeros(1)
        else:
            self.coef_, self.intercept_ = means, np.zeros(len(self.classes_))
        self.n_iter_ = 1
        return self


def make_scaler(scaling: str) -> Any:
    """The pipeline step of a scaling name (params.SCALINGS)."""
    return {"standard": StandardScaler(), "l2": Normalizer(), "none": "passthrough",
            "center_l2": UnitScaler(center=True), "standard_l2": UnitScaler(standardize=True)}[scaling]


def make_head(head: str, C: float, shape: tuple[int, int], *, tol: float, max_iter: int, random_state: Any,
              class_weight: Any) -> Any:
    """The classifier of a head name (params.HEADS, not 'auto') at regularisation C (unused by 'ncm')."""
    if head == "svm":
        return LinearSVC(C=C, dual=shape[0] < _DUAL_RATIO * shape[1], tol=tol, max_iter=max_iter,
                         random_state=random_state, class_weight=class_weight)
    if head == "logistic":  # multinomial (scikit-learn's default for lbfgs on several classes)
        return LogisticRegression(C=C, tol=tol, max_iter=max_iter, class_weight=class_weight)
    return NearestClassMean()


def restore_head(clf: Any, coef: np.ndarray, intercept: np.ndarray, classes: np.ndarray, n_iter: int) -> None:
    """Give an unfitted head of `make_head` the fitted state a saved probe recorded (same arithmetic)."""
    clf.coef_, clf.intercept_, clf.classes_ = coef, intercept, classes
    clf.n_features_in_ = coef.shape[1]
    clf.n_iter_ = np.array([n_iter]) if isinstance(clf, LogisticRegression) else n_iter


def restore_scaler(scaler: Any, arrays: dict[str, np.ndarray], n_features: int) -> None:
    """Give an unfitted scaler of `make_scaler` the statistics a saved probe recorded."""
    if isinstance(scaler, StandardScaler):
        scaler.mean_, scaler.var_, scaler.scale_ = arrays["scale_mean"], arrays["scale_var"], arrays["scale_scale"]
        scaler.n_features_in_, scaler.n_samples_seen_ = n_features, 0
    elif isinstance(scaler, UnitScaler):
        scaler.mean_, scaler.scale_, scaler.n_features_in_ = arrays["scale_mean"], arrays["scale_scale"], n_features
    elif isinstance(scaler, Normalizer):  # stateless: fitting only records the width
        scaler.fit(np.zeros((1, n_features)))


def scaler_arrays(scaler: Any) -> dict[str, np.ndarray]:
    """The statistics of a fitted scaler that `restore_scaler` needs."""
    if isinstance(scaler, StandardScaler):
        return {"scale_mean": scaler.mean_, "scale_var": scaler.var_, "scale_scale": scaler.scale_}
    if isinstance(scaler, UnitScaler):
        return {"scale_mean": scaler.mean_, "scale_scale": scaler.scale_}
    return {}


def n_iter(clf: Any) -> int:
    """Iterations the fit took (LogisticRegression reports an array)."""
    return int(np.max(clf.n_iter_))


def flip_average(scores: Any, mirror_scores: Any) -> np.ndarray:
    """Test-time flip averaging: the mean of the scores of the images and of their mirror images."""
    return (np.asarray(scores, dtype=np.float64) + np.asarray(mirror_scores, dtype=np.float64)) / 2
