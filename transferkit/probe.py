"""Linear SVM on CNN codes: cross-validated C, evaluation, and a layer/pooling sweep.

The probe is the classic "CNN features off-the-shelf" recipe: standardise the codes, fit a
one-vs-rest linear SVM, and choose C by stratified cross-validation on the training set only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix
from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import LinearSVC
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_is_fitted, check_X_y

from transferkit.errors import DataError, ModelError, TransferkitError

logger = logging.getLogger(__name__)

DEFAULT_CS: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)
SCALINGS: tuple[str, ...] = ("standard", "l2", "none")
SWEEP_MAX_ITER = 1000  # a sweep ranks views; a slightly unconverged large-C fit barely moves the ranking
_FORMAT = "transferkit.probe"
_FORMAT_VERSION = 1
_ARRAYS_FILE = "arrays.npz"
_META_FILE = "probe.json"


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Linear SVM on CNN codes, C chosen by stratified CV on the training set only."""

    def __init__(
        self,
        C: float | str = "auto",
        *,
        Cs: Sequence[float] = DEFAULT_CS,
        scaling: str = "standard",
        cv: int = 5,
        max_iter: int = 5000,
        n_jobs: int | None = None,
        random_state: int = 0,
    ) -> None:
        self.C = C  # no logic in __init__: clone()/set_params() must round-trip
        self.Cs = Cs
        self.scaling = scaling
        self.cv = cv
        self.max_iter = max_iter
        self.n_jobs = n_jobs
        self.random_state = random_state

    def fit(self, X: Any, y: Any) -> LinearProbe:
        """Choose C by CV (if C='auto'), then fit on all of X, y."""
        self._check_params()
        X, y = _check_xy(X, y)
        self.classes_ = np.unique(y)
        self.n_features_in_ = X.shape[1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            if self.C == "auto":
                search = self._search(X, y, refit=True)
                self.pipeline_ = search.best_estimator_
                self.best_C_ = float(search.best_params_["svm__C"])
                self.cv_results_ = _cv_rows(search)
                self.cv_score_ = float(search.best_score_)
                n_bad, n_fits = _unconverged(search), len(self.Cs) * search.n_splits_
            else:
                self.pipeline_ = self._make_pipeline(float(self.C)).fit(X, y)
                self.best_C_ = float(self.C)
                self.cv_results_ = []
                self.cv_score_ = float("nan")
                n_bad, n_fits = 0, 0
        self.converged_ = self.pipeline_.named_steps["svm"].n_iter_ < self.max_iter
        _warn_unconverged(n_bad + (not self.converged_), n_fits + 1, self.max_iter)
        return self

    def predict(self, X: Any) -> np.ndarray:
        """Class label of each row of X."""
        return self.pipeline_.predict(self._check_x(X))

    def decision_function(self, X: Any) -> np.ndarray:
        """SVM scores, (n, n_classes); (n,) for two classes, like scikit-learn."""
        return self.pipeline_.decision_function(self._check_x(X))

    def save(self, path: str | Path, *, extra: Mapping[str, Any] | None = None) -> Path:
        """Write the fitted probe to directory `path` as .npz arrays + JSON metadata (no pickle)."""
        check_is_fitted(self, "pipeline_")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        arrays = self._arrays()
        npz_bytes = _npz_bytes(arrays)
        meta = {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "params": {**self.get_params(), "Cs": [float(c) for c in self.Cs]},
            "classes_dtype": self.classes_.dtype.str if self.classes_.dtype.kind in "iufb" else "str",
            "n_features_in": int(self.n_features_in_),
            "best_C": self.best_C_,
            "cv_score": None if math.isnan(self.cv_score_) else self.cv_score_,
            "cv_results": self.cv_results_,
            "converged": bool(self.converged_),
            "arrays_sha256": hashlib.sha256(npz_bytes).hexdigest(),
            "extra": dict(extra or {}),
        }
        try:
            meta_text = json.dumps(meta, indent=2, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise TransferkitError(f"Cannot save probe to {path}: 'extra' is not JSON-able ({err}).") from err
        _write_atomic(path / _ARRAYS_FILE, npz_bytes)
        _write_atomic(path / _META_FILE, meta_text.encode())  # written last: it vouches for the arrays
        return path

    @classmethod
    def load(cls, path: str | Path) -> LinearProbe:
        """Read a probe written by `save`; predictions are bit-identical to the saved one's."""
        path = Path(path)
        meta = _read_meta(path / _META_FILE)
        arrays = _read_arrays(path / _ARRAYS_FILE, meta["arrays_sha256"])
        params = {**meta["params"], "Cs": tuple(meta["params"]["Cs"])}
        probe = cls(**params)
        try:
            probe._restore(arrays, meta)
        except (KeyError, ValueError) as err:
            raise TransferkitError(f"Probe file {path / _ARRAYS_FILE} is corrupt: {err}") from err
        return probe

    # -- internals -------------------------------------------------------------------------------

    def _check_params(self) -> None:
        name = type(self).__name__
        if self.scaling not in SCALINGS:
            allowed = ", ".join(repr(s) for s in SCALINGS)
            raise ModelError(
                f"The 'scaling' parameter of {name} must be one of {allowed}. Got {self.scaling!r} instead."
            )
        if self.C != "auto" and not (_is_real(self.C) and self.C > 0):
            raise ModelError(f"The 'C' parameter of {name} must be 'auto' or a float > 0. "
                             f"Got {self.C!r} instead.")
        if isinstance(self.Cs, str) or not self.Cs or not all(_is_real(c) and c > 0 for c in self.Cs):
            raise ModelError(f"The 'Cs' parameter of {name} must be a non-empty sequence of floats > 0. "
                             f"Got {self.Cs!r} instead.")
        for param, low in (("cv", 2), ("max_iter", 1)):
            value = getattr(self, param)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ModelError(f"The '{param}' parameter of {name} must be an int >= {low}. "
                                 f"Got {value!r} instead.")

    def _make_pipeline(self, C: float) -> Pipeline:
        scale = {"standard": StandardScaler(), "l2": Normalizer(), "none": "passthrough"}[self.scaling]
        svm = LinearSVC(C=C, dual="auto", max_iter=self.max_iter, random_state=self.random_state)
        return Pipeline([("scale", scale), ("svm", svm)])

    def _search(self, X: np.ndarray, y: np.ndarray, *, refit: bool) -> GridSearchCV:
        """Grid-search C with stratified folds; also records whether each fold's fit converged."""
        _, counts = np.unique(y, return_counts=True)
        folds = StratifiedKFold(n_splits=min(self.cv, int(counts.min())), shuffle=True,
                                random_state=self.random_state)
        search = GridSearchCV(
            self._make_pipeline(1.0),
            {"svm__C": [float(c) for c in self.Cs]},
            scoring=_score_and_convergence,
            refit="accuracy" if refit else False,
            cv=folds,
            n_jobs=self.n_jobs,
            error_score="raise",
        )
        return search.fit(X, y)

    def _check_x(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "pipeline_")
        try:
            X = check_array(X, dtype=(np.float64, np.float32))
        except ValueError as err:
            raise DataError(f"Bad feature array: {err}") from err
        if X.shape[1] != self.n_features_in_:
            raise DataError(f"X has {X.shape[1]} features, but the probe was fitted on {self.n_features_in_}")
        return X

    def _arrays(self) -> dict[str, np.ndarray]:
        svm = self.pipeline_.named_steps["svm"]
        arrays = {"coef": svm.coef_, "intercept": svm.intercept_, "classes": self.classes_.astype(str)}
        scaler = self.pipeline_.named_steps["scale"]
        if isinstance(scaler, StandardScaler):
            arrays.update(scale_mean=scaler.mean_, scale_var=scaler.var_, scale_scale=scaler.scale_)
        return arrays

    def _restore(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """Rebuild the fitted pipeline from saved arrays (same objects, so the same arithmetic)."""
        n_features = int(meta["n_features_in"])
        dtype = meta["classes_dtype"]
        classes = arrays["classes"]
        self.classes_ = (classes == "True") if dtype == "|b1" else classes.astype(dtype)
        pipe = self._make_pipeline(float(meta["best_C"]))
        scaler = pipe.named_steps["scale"]
        if isinstance(scaler, StandardScaler):
            scaler.mean_, scaler.var_, scaler.scale_ = (
                arrays["scale_mean"], arrays["scale_var"], arrays["scale_scale"])
            scaler.n_features_in_, scaler.n_samples_seen_ = n_features, 0
        elif isinstance(scaler, Normalizer):
            scaler.n_features_in_ = n_features
        svm = pipe.named_steps["svm"]
        svm.coef_, svm.intercept_, svm.classes_ = arrays["coef"], arrays["intercept"], self.classes_
        svm.n_features_in_, svm.n_iter_ = n_features, 0
        if svm.coef_.shape[1] != n_features or len(svm.intercept_) != svm.coef_.shape[0]:
            raise ValueError("coef/intercept shapes do not match n_features_in")
        self.pipeline_ = pipe
        self.n_features_in_ = n_features
        self.best_C_ = float(meta["best_C"])
        self.cv_score_ = float("nan") if meta["cv_score"] is None else float(meta["cv_score"])
        self.cv_results_ = list(meta["cv_results"])
        self.converged_ = bool(meta["converged"])
        self.extra_ = dict(meta["extra"])


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_xy(X: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate codes and labels; every class needs two samples for stratified CV."""
    try:
        X, y = check_X_y(X, y, dtype=(np.float64, np.float32))
        check_classification_targets(y)
    except ValueError as err:
        raise DataError(f"Bad training data: {err}") from err
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise DataError(f"Need at least 2 classes to train a probe; got only {classes.tolist()}.")
    if counts.min() < 2:
        small = ", ".join(f"{c!s} ({n})" for c, n in zip(classes, counts, strict=True) if n < 2)
        raise DataError(f"Every class needs at least 2 training samples; too few for class {small}.")
    return X, y


def _score_and_convergence(estimator: Pipeline, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """GridSearchCV scorer: accuracy, plus 1.0/0.0 for whether liblinear converged."""
    svm = estimator.named_steps["svm"]
    converged = float(svm.n_iter_ < svm.max_iter)
    return {"accuracy": accuracy_score(y, estimator.predict(X)), "converged": converged}


def _cv_rows(search: GridSearchCV) -> list[dict[str, float]]:
    res = search.cv_results_
    return [
        {"C": float(c), "mean": float(m), "std": float(s)}
        for c, m, s in zip(res["param_svm__C"], res["mean_test_accuracy"], res["std_test_accuracy"], strict=True)
    ]


def _unconverged(search: GridSearchCV) -> int:
    """How many of the search's fold fits hit max_iter."""
    res = search.cv_results_
    per_split = [res[f"split{i}_test_converged"] for i in range(search.n_splits_)]
    return int(np.sum(1.0 - np.asarray(per_split)))


def _warn_unconverged(n_bad: int, n_fits: int, max_iter: int) -> None:
    if n_bad:
        logger.warning("%d of %d LinearSVC fits did not converge within max_iter=%d; accuracy may be "
                       "slightly off (raise max_iter or lower C).", n_bad, n_fits, max_iter)


# -- persistence -------------------------------------------------------------------------------------


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    with tempfile.TemporaryFile() as fh:
        np.savez(fh, **arrays)
        fh.seek(0)
        return fh.read()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same directory and os.replace, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise TransferkitError(f"Probe file {path} not found (was the probe saved there?).") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TransferkitError(f"Probe file {path} is corrupt: {err}") from err
    required = {"params", "classes_dtype", "n_features_in", "best_C", "cv_score", "cv_results", "converged",
                "arrays_sha256", "extra"}
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT or not required <= meta.keys():
        raise TransferkitError(f"Probe file {path} is corrupt: not a {_FORMAT} file or fields are missing.")
    if meta["version"] > _FORMAT_VERSION:
        raise TransferkitError(f"Probe file {path} has format version {meta['version']}; this transferkit "
                               f"reads up to {_FORMAT_VERSION}. Upgrade transferkit.")
    return meta


def _read_arrays(path: Path, sha256: str) -> dict[str, np.ndarray]:
    try:
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise TransferkitError(f"Probe file {path} not found.") from err
    if hashlib.sha256(data).hexdigest() != sha256:
        raise TransferkitError(f"Probe file {path} is corrupt: its checksum does not match {_META_FILE}.")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as err:
        raise TransferkitError(f"Probe file {path} is corrupt: {err}") from err


# -- evaluation ----------------------------------------------------------------------------------------


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
        return {
            "accuracy": self.accuracy,
            "labels": list(self.labels),
            "confusion": self.confusion.tolist(),
            "report": self.report,
            "per_class": self.per_class,
        }


def evaluate(probe: LinearProbe, X: Any, y: Any) -> Evaluation:
    """Accuracy, confusion matrix and per-class scores of `probe` on held-out X, y."""
    y = np.asarray(y)
    pred = probe.predict(X)
    if len(y) != len(pred):
        raise DataError(f"X has {len(pred)} rows but y has {len(y)} labels.")
    try:  # labels absent from training still count, as rows the probe always gets wrong
        label_values = np.union1d(probe.classes_, np.unique(y))
    except TypeError as err:
        raise DataError(f"Labels in y are not comparable with the probe's classes: {err}") from err
    labels = [str(v) for v in label_values]
    raw = classification_report(y, pred, labels=label_values, target_names=labels, output_dict=True,
                                zero_division=0)
    per_class = {
        name: {"precision": float(raw[name]["precision"]), "recall": float(raw[name]["recall"]),
               "f1": float(raw[name]["f1-score"]), "support": float(raw[name]["support"])}
        for name in labels
    }
    return Evaluation(
        accuracy=float(accuracy_score(y, pred)),
        labels=labels,
        confusion=confusion_matrix(y, pred, labels=label_values),
        report=classification_report(y, pred, labels=label_values, target_names=labels, zero_division=0),
        per_class=per_class,
    )


# -- layer / pooling sweep -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepResult:
    """CV accuracy of a linear probe on each (layer, pooling) view of the same images."""

    rows: list[dict[str, Any]]  # {layer, pool, dim, cv_accuracy, cv_std, C, seconds}, in key order
    best: dict[str, Any]  # highest cv_accuracy; ties go to the smaller dim

    def table(self) -> str:
        """Aligned text table; the best row is marked with '*'."""
        header = ["", "layer", "pool", "dim", "cv acc %", "± std", "C", "seconds"]
        body = [
            ["*" if row == self.best else "", str(row["layer"]), str(row["pool"]), str(row["dim"]),
             f"{100 * row['cv_accuracy']:.2f}", f"{100 * row['cv_std']:.2f}", f"{row['C']:g}",
             f"{row['seconds']:.1f}"]
            for row in self.rows
        ]
        widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
        left = {1, 2}  # text columns align left, numbers right
        return "\n".join(
            "  ".join(cell.ljust(w) if i in left else cell.rjust(w) for i, (cell, w) in
                      enumerate(zip(line, widths, strict=True))).rstrip()
            for line in [header, *body]
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"rows": [dict(r) for r in self.rows], "best": dict(self.best)}


def sweep(
    codes: Mapping[tuple[str, str], Any],
    y: Any,
    *,
    Cs: Sequence[float] = DEFAULT_CS,
    cv: int = 3,
    max_samples: int | None = 5000,
    random_state: int = 0,
    progress: bool = True,
    n_jobs: int | None = None,
) -> SweepResult:
    """Rank (layer, pooling) views of the training images by cross-validated linear-probe accuracy.

    Every view is scored on the same rows and the same folds, so the ranking compares views, not luck.
    """
    from tqdm.auto import tqdm  # keep `import transferkit.probe` light

    if not codes:
        raise DataError("sweep() needs at least one (layer, pool) view of the codes.")
    y = np.asarray(y)
    rows_idx = _sweep_subset(y, max_samples, random_state)
    probe = LinearProbe(Cs=Cs, cv=cv, max_iter=SWEEP_MAX_ITER, n_jobs=n_jobs, random_state=random_state)
    probe._check_params()
    rows, n_bad, n_fits = [], 0, 0
    for key in tqdm(list(codes), desc="sweep", unit="view", disable=not progress, file=sys.stderr):
        start = time.perf_counter()
        X = np.asarray(codes[key])
        if X.ndim != 2 or len(X) != len(y):
            raise DataError(f"Codes for {key} have shape {X.shape}; expected ({len(y)}, dim).")
        if len(rows_idx) < len(y):
            X = X[rows_idx]
        X, y_sub = _check_xy(X, y[rows_idx])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            search = probe._search(X, y_sub, refit=False)
        n_bad += _unconverged(search)
        n_fits += len(Cs) * search.n_splits_
        best = max(_cv_rows(search), key=lambda r: r["mean"])  # ties: the first, i.e. earlier in Cs
        layer, pool = key
        rows.append({"layer": layer, "pool": pool, "dim": int(X.shape[1]), "cv_accuracy": best["mean"],
                     "cv_std": best["std"], "C": best["C"], "seconds": time.perf_counter() - start})
    _warn_unconverged(n_bad, n_fits, SWEEP_MAX_ITER)
    best_row = max(rows, key=lambda r: (r["cv_accuracy"], -r["dim"]))
    logger.info("sweep: best view %s/%s (dim %d) at %.2f%% CV accuracy", best_row["layer"], best_row["pool"],
                best_row["dim"], 100 * best_row["cv_accuracy"])
    return SweepResult(rows=rows, best=best_row)


def _sweep_subset(y: np.ndarray, max_samples: int | None, random_state: int) -> np.ndarray:
    """Row indices to score on: all rows, or a stratified random subset of `max_samples`."""
    n = len(y)
    all_rows = np.arange(n)
    if max_samples is None or n <= max_samples:
        return all_rows
    n_classes = len(np.unique(y))
    if max_samples < 2 * n_classes or n - max_samples < n_classes:
        logger.info("sweep: max_samples=%d too close to n=%d or n_classes=%d to subsample; using all rows",
                    max_samples, n, n_classes)
        return all_rows
    try:
        subset, _ = train_test_split(all_rows, train_size=max_samples, stratify=y, random_state=random_state)
    except ValueError as err:  # a class with a single sample cannot be stratified
        raise DataError(f"Cannot draw a stratified subset for the sweep: {err}") from err
    logger.info("sweep: scoring a stratified random subset of %d of %d samples", max_samples, n)
    return np.sort(subset)
