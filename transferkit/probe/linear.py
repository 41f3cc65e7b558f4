"""Linear classifier on CNN codes (LinearProbe): scale, fit, and choose C (and the head) by cross-validation.

The probe is the classic "CNN features off-the-shelf" recipe: standardise the codes, fit a
one-vs-rest linear SVM, and choose C by stratified cross-validation on the training set only. Other heads
(`heads`: multinomial logistic regression, cosine nearest-class-mean) and scalings (L2-normalised codes) are
parameters; head='auto' lets the same CV choose the head with its C.
On imbalanced classes, `class_weight='balanced'` weights the SVM's errors by inverse class frequency, and
`metric` (default 'auto') chooses C by balanced accuracy, so a C that ignores the rare classes does not win.
`predict_proba` is softmax(scores / T), with one temperature T fitted on the out-of-fold scores of the folds that
chose C (`calibration`), so the probabilities are calibrated at no extra fit.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import StratifiedKFold, cross_validate
from sklearn.pipeline import Pipeline
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_is_fitted, check_X_y

from transferkit.errors import DataError, ParameterError, TransferkitError
from transferkit.probe.calibration import fit_temperature, temperature_proba
from transferkit.probe.fileformat import ARRAYS_FILE, META_FILE, read_probe, write_probe
from transferkit.probe.heads import make_head, make_scaler, n_iter, restore_head, restore_scaler, scaler_arrays
from transferkit.probe.metrics import SCORERS, cv_metric, expected_calibration_error
from transferkit.probe.params import AUTO_HEADS, PROBE, SCALINGS  # noqa: F401  (SCALINGS: re-exported)
from transferkit.runtime.params import sklearn_constraints, validate

logger = logging.getLogger(__name__)

DEFAULT_CS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 0.1, 1.0)  # tried upwards, stopping past the peak


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Linear classifier on CNN codes (`head`), C (and with head='auto' the head) chosen by stratified CV on the
    training set only."""

    _parameter_constraints: dict = sklearn_constraints(PROBE)  # the limits live in transferkit.probe.params

    def __init__(
        self,
        C: float | str = "auto",
        *,
        Cs: Sequence[float] = DEFAULT_CS,
        scaling: str = "standard",
        cv: int = 5,
        max_iter: int = 5000,
        tol: float = 1e-3,
        n_jobs: int | None = None,
        random_state: int = 0,
        cv_max_samples: int | None = 10_000,
        class_weight: str | Mapping[Any, float] | None = None,
        metric: str = "auto",
        calibrate: bool = True,
        head: str = "svm",
    ) -> None:
        self.C = C  # no logic in __init__: clone()/set_params() must round-trip
        self.Cs = Cs
        self.scaling = scaling
        self.cv = cv
        self.max_iter = max_iter
        self.tol = tol
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.cv_max_samples = cv_max_samples
        self.class_weight = class_weight  # None, 'balanced' or {class: weight} (LinearSVC's class_weight)
        self.metric = metric  # what chooses C: 'accuracy', 'balanced_accuracy', or 'auto' (by imbalance)
        self.calibrate = calibrate  # fit predict_proba's temperature on out-of-fold scores (fixed C: `cv` more fits)
        self.head = head  # 'svm', 'logistic', 'ncm' or 'auto' (CV chooses among AUTO_HEADS, each with its C)

    def fit(self, X: Any, y: Any) -> LinearProbe:
        """Choose C by stratified CV on X, y if C='auto' (smallest C first, stopping once the CV score drops;
        the score is `metric`, resolved to `metric_`), and the head if head='auto' (`head_`; 'ncm' has no C:
        best_C_ None), fit on all of X, y, and (`calibrate`) fit predict_proba's temperature on the out-of-fold
        scores at the chosen C."""
        self._check_params()
        choose = self.C == "auto" or self.head == "auto"
        X, y = check_xy(X, y, for_cv=choose)
        self.classes_ = np.unique(y)
        self.n_features_in_ = X.shape[1]
        self.metric_ = cv_metric(self.metric, y)
        self.cv_results_, n_bad, n_fits, oof = [], 0, 0, None
        X_cv, y_cv = self._cv_sample(X, y) if choose or self.calibrate else (X, y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            if choose:
                self.n_cv_samples_ = len(y_cv)
                self.cv_results_, oof, n_bad, n_fits = self._cv_heads(X_cv, y_cv)
                best = max(self.cv_results_, key=lambda r: r["mean"])  # ties: the first, i.e. smaller C
                self.head_, self.best_C_, self.cv_score_ = best["head"], best["C"], best["mean"]
                if self.C == "auto" and self.best_C_ == max(self.Cs):
                    logger.info("best C=%g is the largest in Cs; a larger C may do better", self.best_C_)
            else:
                self.head_, self.best_C_, self.cv_score_ = self.head, _head_C(self.head, self.C), float("nan")
                if self.calibrate and np.unique(y_cv, return_counts=True)[1].min() >= 2:
                    _, oof, n_bad, n_fits = self._cv_path(X_cv, y_cv, Cs=[self.best_C_], log_each=False)
            self.pipeline_ = self._make_pipeline(self.best_C_, X.shape).fit(X, y)
        self.n_iter_ = n_iter(self.pipeline_.named_steps["svm"])
        self.converged_ = self.n_iter_ < self.max_iter
        warn_unconverged(n_bad + (not self.converged_), n_fits + 1, self.max_iter)
        self.temperature_ = self._fit_temperature(oof, y_cv) if self.calibrate else None
        return self

    def _fit_temperature(self, oof: np.ndarray | None, y: np.ndarray) -> float | None:
        """predict_proba's temperature, from out-of-fold scores `oof` of labels `y` (None: too few rows to fold)."""
        if oof is None:
            logger.warning("no probabilities: calibration needs 2 samples of every class (predict_proba will refuse)")
            return None
        y_index = np.searchsorted(self.classes_, y)
        temperature = fit_temperature(oof, y_index)
        logger.info("probabilities: temperature %.3g, out-of-fold expected calibration error %.4f (T=1: %.4f)",
                    temperature, expected_calibration_error(y_index, temperature_proba(oof, temperature)),
                    expected_calibration_error(y_index, temperature_proba(oof, 1.0)))
        return temperature

    def refit(self, X: Any, y: Any) -> LinearProbe:
        """Fit the chosen head at the chosen C again, on other rows of the same classes (a set's codes and its
        mirror images', say), keeping what `fit` chose and calibrated: C, head, CV scores and temperature.

        Why not `fit` on those rows: the mirror of a held-out image would sit in the training folds, so CV
        would choose C on rows it has all but seen.
        """
        check_is_fitted(self, "pipeline_")
        X, y = check_xy(X, y, for_cv=False)
        self._check_x(X)  # as many features as fit saw
        if not np.array_equal(np.unique(y), self.classes_):
            raise DataError(f"refit needs the classes fit saw ({self.classes_.tolist()}); got "
                            f"{np.unique(y).tolist()}.")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.pipeline_ = self._make_pipeline(self.best_C_, X.shape).fit(X, y)
        self.n_iter_ = n_iter(self.pipeline_.named_steps["svm"])
        self.converged_ = self.n_iter_ < self.max_iter
        warn_unconverged(not self.converged_, 1, self.max_iter)
        return self

    def predict(self, X: Any) -> np.ndarray:
        """Class label of each row of X."""
        X = self._check_x(X)  # before touching pipeline_: an unfitted probe raises NotFittedError
        return self.pipeline_.predict(X)

    def decision_function(self, X: Any) -> np.ndarray:
        """The head's scores, (n, n_classes); (n,) for two classes, like scikit-learn."""
        X = self._check_x(X)
        return self.pipeline_.decision_function(X)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Calibrated class probabilities, (n, n_classes) in `classes_` order, each row summing to 1; the argmax
        is `predict`'s class."""
        return self.proba_from_scores(self.decision_function(X))

    def predict_from_scores(self, scores: Any) -> np.ndarray:
        """`predict` from `decision_function` scores already computed (flip-averaged ones, say): the best column's
        class; two classes: the second where the score is > 0, as scikit-learn's linear classifiers decide."""
        check_is_fitted(self, "pipeline_")
        scores = np.asarray(scores)
        return self.classes_[(scores > 0).astype(np.int64) if scores.ndim == 1 else scores.argmax(1)]

    def proba_from_scores(self, scores: Any) -> np.ndarray:
        """predict_proba from `decision_function` scores already computed (a dense score map's cells, say):
        softmax(scores / temperature_)."""
        check_is_fitted(self, "pipeline_")
        if getattr(self, "temperature_", None) is None:
            raise TransferkitError(f"This {type(self).__name__} has no calibrated probabilities: it was fitted with "
                                   "calibrate=False or saved before probes were calibrated; fit it again, or use "
                                   "decision_function for its SVM scores.")
        return temperature_proba(scores, self.temperature_)

    @property
    def calibrated(self) -> bool:
        """Whether predict_proba works (a probe saved before calibration existed loads without it)."""
        return getattr(self, "temperature_", None) is not None

    def save(self, path: str | Path, *, extra: Mapping[str, Any] | None = None) -> Path:
        """Write the fitted probe to directory `path` as .npz arrays + JSON metadata (no pickle; see `fileformat`)."""
        check_is_fitted(self, "pipeline_")
        return write_probe(self, Path(path), extra)

    @classmethod
    def load(cls, path: str | Path) -> LinearProbe:
        """Read a probe written by `save`; predictions are bit-identical to the saved one's."""
        path = Path(path)
        meta, arrays = read_probe(path)
        try:
            probe = cls(**{**meta["params"], "Cs": tuple(meta["params"]["Cs"])})
            probe._restore(arrays, meta)
            if isinstance(probe.class_weight, dict):  # JSON keys are text: back to the classes they name
                probe.class_weight = {c.item(): probe.class_weight[str(c)] for c in probe.classes_
                                      if str(c) in probe.class_weight}
        except (KeyError, TypeError, ValueError) as err:
            raise TransferkitError(f"Probe {path} is corrupt ({META_FILE} and {ARRAYS_FILE} disagree: "
                                   f"{err}); save it again.") from err
        return probe

    # -- internals -------------------------------------------------------------------------------

    def _check_params(self) -> None:
        """Reject bad parameters (the PROBE table), naming the parameter, what it must be and what it got."""
        validate(self._parameter_constraints, self.get_params(deep=False), type(self).__name__)
        checks = [
            ("Cs", _positive_floats(self.Cs), "a non-empty sequence of floats > 0"),
            ("cv_max_samples", self.cv_max_samples is None or self.cv_max_samples >= 2 * self.cv,
             "None or an int >= 2 x cv"),
        ]
        for param, ok, allowed in checks:
            if not ok:
                raise ParameterError(f"The {param!r} parameter of {type(self).__name__} must be {allowed}. "
                                     f"Got {getattr(self, param)!r} instead.")

    def _make_pipeline(self, C: float | None, shape: tuple[int, int], head: str | None = None) -> Pipeline:
        """Scaler and head (default: the fitted `head_`); the head's step keeps the name 'svm' of older probes."""
        clf = make_head(head or self._head(), C, shape, tol=self.tol, max_iter=self.max_iter,
                        random_state=self.random_state, class_weight=self.class_weight)
        return Pipeline([("scale", make_scaler(self.scaling)), ("svm", clf)])

    def _head(self) -> str:
        """The fitted head, or before fit (the layer sweep's `_cv_path`) the head asked for ('auto': the SVM)."""
        return getattr(self, "head_", None) or ("svm" if self.head == "auto" else self.head)

    def _cv_heads(self, X: np.ndarray, y: np.ndarray) -> tuple[list[dict[str, Any]], np.ndarray, int, int]:
        """`_cv_path` of each head to choose from (`head`, or AUTO_HEADS for 'auto'), its rows marked with the
        head; the out-of-fold scores are the best row's."""
        rows, oof, n_bad, n_fits, best = [], None, 0, 0, -np.inf
        for head in AUTO_HEADS if self.head == "auto" else (self.head,):
            Cs = [_head_C(head, self.C)] if self.C != "auto" or head == "ncm" else None
            part, part_oof, bad, fits = self._cv_path(X, y, Cs=Cs, head=head)
            rows += [{"head": head, **r} for r in part]
            n_bad, n_fits = n_bad + bad, n_fits + fits
            if max(r["mean"] for r in part) > best:
                best, oof = max(r["mean"] for r in part), part_oof
        return rows, oof, n_bad, n_fits

    def _cv_sample(self, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A stratified subset of at most cv_max_samples rows to choose C and calibrate on (all rows when None or
        fewer).

        The C path costs 5 folds x several Cs; on 60,000 rows that is hours of liblinear on 2 cores, while
        the chosen C barely moves past ~10,000 rows. The final fit always uses every row.
        """
        if self.cv_max_samples is None or len(y) <= self.cv_max_samples:
            return X, y
        from sklearn.model_selection import train_test_split

        idx, _ = train_test_split(np.arange(len(y)), train_size=self.cv_max_samples, stratify=y,
                                  random_state=self.random_state)
        idx = np.sort(idx)
        logger.info("cross-validating (C, calibration) on a stratified %d of %d rows (cv_max_samples)", len(idx),
                    len(y))
        return X[idx], y[idx]

    def _cv_path(
        self, X: np.ndarray, y: np.ndarray, *, log_each: bool = True, metric: str | None = None,
        Cs: Sequence[float | None] | None = None, head: str | None = None,
    ) -> tuple[list[dict[str, float]], np.ndarray, int, int]:
        """CV score (`metric`, default `metric_`) for each C of `Cs` (default self.Cs) in ascending order,
        stopping once it falls below the best so far.

        Past the peak a larger C only fits the training folds harder, and it is the slowest fit.
        Returns the rows {"C", "mean", "std"}, the out-of-fold scores at the best C (what calibration fits on),
        the number of fold fits that hit max_iter, and of all.
        """
        n_splits = min(self.cv, int(np.unique(y, return_counts=True)[1].min()))
        folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=self.random_state)
        metric = metric or self.metric_
        rows: list[dict[str, float]] = []
        n_bad, best_oof = 0, None
        head = head or self._head()
        for C in [None] if head == "ncm" else sorted({float(c) for c in (self.Cs if Cs is None else Cs)}):
            out = cross_validate(self._make_pipeline(C, X.shape, head), X, y, cv=folds, n_jobs=self.n_jobs,
                                 return_estimator=True, return_indices=True, error_score="raise",
                                 scoring=SCORERS[metric])
            n_bad += sum(not _converged(est) for est in out["estimator"])
            scores = out["test_score"]
            rows.append({"C": C, "mean": float(scores.mean()), "std": float(scores.std())})
            seconds = out["fit_time"].sum() + out["score_time"].sum()
            logger.log(logging.INFO if log_each else logging.DEBUG, "%s C=%s: %d-fold CV %s %.2f%% (%.0f s)",
                       head, C, n_splits, metric, 100 * rows[-1]["mean"], seconds)
            if rows[-1]["mean"] < max(r["mean"] for r in rows):
                break
            if len(rows) == 1 or rows[-1]["mean"] > max(r["mean"] for r in rows[:-1]):
                best_oof = _out_of_fold(out, X)  # a tie keeps the smaller C's, as fit does
        return rows, best_oof, n_bad, len(rows) * n_splits

    def _check_x(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "pipeline_")
        try:
            X = check_array(X, dtype=(np.float64, np.float32))
        except ValueError as err:
            raise DataError(f"Bad feature array: {err}") from err
        if X.shape[1] != self.n_features_in_:
            raise DataError(f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                            f"{self.n_features_in_} features as input.")
        return X

    def arrays(self) -> dict[str, np.ndarray]:
        """The fitted model as plain arrays (coef, intercept, classes, the scaler's statistics): what `save` writes and
        network surgery turns into a convolution."""
        svm = self.pipeline_.named_steps["svm"]
        arrays = {"coef": svm.coef_, "intercept": svm.intercept_, "classes": self.classes_.astype(str)}
        if getattr(self, "temperature_", None) is not None:
            arrays["temperature"] = np.array(self.temperature_)
        return {**arrays, **scaler_arrays(self.pipeline_.named_steps["scale"])}

    def _restore(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """Rebuild the fitted pipeline from saved arrays (same objects, so the same arithmetic)."""
        n_features = int(meta["n_features_in"])
        dtype = meta["classes_dtype"]
        classes = arrays["classes"]
        self.classes_ = (classes == "True") if dtype == "|b1" else classes.astype(dtype)
        self.head_ = meta.get("head", "svm")  # probes saved before heads were chosen: the SVM
        self.best_C_ = None if meta["best_C"] is None else float(meta["best_C"])
        pipe = self._make_pipeline(self.best_C_, (0, n_features))
        restore_scaler(pipe.named_steps["scale"], arrays, n_features)
        svm = pipe.named_steps["svm"]
        restore_head(svm, arrays["coef"], arrays["intercept"], self.classes_, int(meta["n_iter"]))
        if svm.coef_.shape[1] != n_features or len(svm.intercept_) != svm.coef_.shape[0]:
            raise ValueError("coef/intercept shapes do not match n_features_in")
        self.pipeline_ = pipe
        self.n_features_in_ = n_features
        self.cv_score_ = float("nan") if meta["cv_score"] is None else float(meta["cv_score"])
        self.cv_results_ = list(meta["cv_results"])
        self.metric_ = meta.get("metric", "accuracy")  # probes saved before the metric was recorded: accuracy
        self.n_iter_ = int(meta["n_iter"])
        self.converged_ = self.n_iter_ < self.max_iter
        self.extra_ = dict(meta["extra"])
        # probes saved before calibration (format <= 2) have no temperature: no predict_proba (see `calibrated`)
        self.temperature_ = float(arrays["temperature"]) if "temperature" in arrays else None


def _positive(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _positive_floats(values: Any) -> bool:
    if isinstance(values, str | bytes) or not hasattr(values, "__len__"):
        return False
    return len(values) > 0 and all(_positive(v) for v in values)


def check_xy(X: Any, y: Any, *, for_cv: bool) -> tuple[np.ndarray, np.ndarray]:
    """Validate codes and labels; stratified CV needs two samples of every class."""
    try:
        X, y = check_X_y(X, y, dtype=(np.float64, np.float32))
        check_classification_targets(y)
    except ValueError as err:
        raise DataError(f"Bad training data: {err}") from err
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise DataError(f"Need at least 2 classes to train a probe; got 1 class: {classes.tolist()}.")
    if for_cv and counts.min() < 2:
        small = ", ".join(f"{c!s} ({n})" for c, n in zip(classes, counts, strict=True) if n < 2)
        raise DataError(f"Cross-validation needs at least 2 samples of every class; too few: class {small}.")
    return X, y


def _out_of_fold(out: Mapping[str, Any], X: np.ndarray) -> np.ndarray:
    """Each row's decision scores from the fold model that did not train on it (cross_validate's estimators)."""
    parts = [(idx, est.decision_function(X[idx])) for est, idx in zip(out["estimator"], out["indices"]["test"])]
    oof = np.zeros((len(X), *parts[0][1].shape[1:]))
    for idx, scores in parts:
        oof[idx] = scores
    return oof


def _converged(pipe: Pipeline) -> bool:
    clf = pipe.named_steps["svm"]
    return not hasattr(clf, "max_iter") or n_iter(clf) < clf.max_iter  # nearest-class-mean: no iterations


def _head_C(head: str, C: float | str) -> float | None:
    """The C a fixed-C fit of `head` uses: None for 'ncm', which has nothing to regularise."""
    return None if head == "ncm" else float(C)


def warn_unconverged(n_bad: int, n_fits: int, max_iter: int) -> None:
    if n_bad:
        logger.warning("%d of %d probe fits did not converge within max_iter=%d; accuracy may be "
                       "slightly off (raise max_iter or lower C).", n_bad, n_fits, max_iter)
