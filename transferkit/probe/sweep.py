"""The layer/pooling sweep: rank views of the same images by cross-validated linear-probe accuracy (balanced
accuracy when the classes are imbalanced: `metric`; mAP for multi-label targets)."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split

from transferkit.errors import DataError, ParameterError
from transferkit.probe.linear import DEFAULT_CS, LinearProbe, check_xy, warn_unconverged
from transferkit.probe.metrics import cv_metric
from transferkit.probe.multilabel import MultiLabelProbe, check_multilabel
from transferkit.probe.params import SELECT_CANDIDATES
from transferkit.runtime.progress import progress_bar

logger = logging.getLogger(__name__)

_SWEEP_MAX_ITER = 1000  # a sweep only ranks views: a looser fit barely moves the ranking
_SWEEP_TOL = 1e-2  # measured: same accuracy to 0.1-0.4 points as 1e-4, 2-3x faster


@dataclass(frozen=True)
class SweepResult:
    """CV score (`metric`) of a linear probe on each (layer, pooling) view of the same images."""

    rows: list[dict[str, Any]]  # {layer, pool, dim, cv_accuracy, cv_std, C, seconds}, in key order
    best: dict[str, Any]  # highest cv_accuracy; ties go to the smaller dim
    metric: str = "accuracy"  # what 'cv_accuracy' holds: 'accuracy', 'balanced_accuracy' or (multi-label) 'mAP'

    def table(self) -> str:
        """Aligned text table; the best row is marked with '*'."""
        score = {"balanced_accuracy": "cv bal acc %", "mAP": "cv mAP %"}.get(self.metric, "cv acc %")
        header = ["", "layer", "pool", "dim", score, "± std", "C", "seconds"]
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
        return {"rows": [dict(r) for r in self.rows], "best": dict(self.best), "metric": self.metric}

    def candidates(self, n: int = SELECT_CANDIDATES) -> list[dict[str, Any]]:
        """The `n` best rows, best first (ties: the smaller dim): the views greedy selection may join."""
        return sorted(self.rows, key=lambda r: (-r["cv_accuracy"], r["dim"]))[:n]


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
    metric: str = "auto",
) -> SweepResult:
    """Rank (layer, pooling) views of the training images by cross-validated linear-probe accuracy.

    Every view is scored on the same rows and the same folds, so the ranking compares views, not luck.
    `metric` 'auto' ranks by balanced accuracy when the classes are imbalanced (probe.metrics.cv_metric).
    Multi-label `y` (n, n_labels) of 0/1: MultiLabelProbe's out-of-fold mAP ranks the views.
    """

    if not codes:
        raise DataError("sweep() needs at least one (layer, pool) view of the codes.")
    y = np.asarray(y)
    rows_idx = _sweep_subset(y, max_samples, random_state)
    kind = MultiLabelProbe if y.ndim == 2 else LinearProbe
    probe = kind(Cs=Cs, cv=cv, max_iter=_SWEEP_MAX_ITER, tol=_SWEEP_TOL, n_jobs=n_jobs, random_state=random_state,
                 metric=metric)
    probe._check_params()
    if y.ndim == 2 and metric != "auto":
        raise ParameterError(f"The 'metric' parameter must be 'auto' for multi-label targets (views are ranked by "
                             f"mAP). Got {metric!r} instead.", param="metric")
    metric = "mAP" if y.ndim == 2 else cv_metric(metric, y[rows_idx])
    rows, n_bad, n_fits = [], 0, 0
    for key in progress_bar(list(codes), desc="sweep", unit="view", enabled=progress):
        start = time.perf_counter()
        X = np.asarray(codes[key])
        if X.ndim != 2 or len(X) != len(y):
            raise DataError(f"Codes for {key} have shape {X.shape}; expected ({len(y)}, dim).")
        X = X[rows_idx] if len(rows_idx) < len(y) else X
        X, y_sub = check_multilabel(X, y[rows_idx]) if y.ndim == 2 else check_xy(X, y[rows_idx], for_cv=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            path, *_, bad, fits = probe._cv_path(X, y_sub, log_each=False, metric=metric)
        n_bad, n_fits = n_bad + bad, n_fits + fits
        best = max(path, key=lambda r: r["mean"])  # ties: the first, i.e. smaller C
        layer, pool = key
        rows.append({"layer": layer, "pool": pool, "dim": int(X.shape[1]), "cv_accuracy": best["mean"],
                     "cv_std": best["std"], "C": best["C"], "seconds": time.perf_counter() - start})
        logger.debug("sweep: %s/%s %s", layer, pool, rows[-1])
    warn_unconverged(n_bad, n_fits, _SWEEP_MAX_ITER)
    best_row = max(rows, key=lambda r: (r["cv_accuracy"], -r["dim"]))
    logger.info("sweep: best view %s/%s (dim %d) at %.2f%% CV %s", best_row["layer"], best_row["pool"],
                best_row["dim"], 100 * best_row["cv_accuracy"], metric)
    return SweepResult(rows=rows, best=best_row, metric=metric)


@dataclass(frozen=True)
class Selection:
    """Greedy forward selection of views to concatenate (`select_views`)."""

    views: list[tuple[str, str]]  # the chosen (layer, pool) views, in the order they were added
    steps: list[dict[str, Any]]  # per round: {views, cv_accuracy, cv_std, C, added, candidates: {key: score}}
    metric: str = "accuracy"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"views": [list(v) for v in self.views], "steps": [dict(s) for s in self.steps], "metric": self.metric}


def concat_views(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Views side by side (codes.spec scaling 'concat': the probe standardises every column)."""
    return np.concatenate(parts, axis=1)


def select_views(
    codes: Mapping[tuple[str, str], Any],
    y: Any,
    *,
    combine: Callable[[list[np.ndarray]], np.ndarray] = concat_views,
    scaling: str = "standard",
    first: tuple[str, str] | None = None,
    max_views: int = 3,
    min_gain: float = 0.002,
    cv: int = 3,
    max_samples: int | None = 2000,
    random_state: int = 0,
    progress: bool = True,
    metric: str = "auto",
) -> Selection:
    """Greedy forward selection (as Head2Toe selects features, by view): start from `first` (the sweep's best
    view, else the best by CV here), then add the view whose combination most raises the CV score, while it
    rises by more than `min_gain` and fewer than `max_views` are chosen.

    `combine(list of (n, d) arrays) -> (n, D)` joins views (with any per-view scaling); `scaling` is the
    probe's own. Every candidate is scored on the same rows and folds, as in `sweep`.
    """
    if not codes:
        raise DataError("select_views() needs at least one (layer, pool) view of the codes.")
    if isinstance(max_views, bool) or not isinstance(max_views, int) or max_views < 1:
        raise ParameterError(f"The 'max_views' parameter must be an int >= 1. Got {max_views!r} instead.",
                             param="max_views")
    score, metric = _view_scorer(codes, np.asarray(y), combine, scaling, cv, max_samples, random_state, metric)
    if first is None:
        firsts = {key: score([key]) for key in progress_bar(list(codes), desc="select", unit="view",
                                                               enabled=progress)}
        first = max(firsts, key=lambda k: (firsts[k]["cv_accuracy"], -firsts[k]["dim"]))
    chosen = [first]
    steps = [{"views": [list(first)], "added": list(first), **score(chosen)}]
    while len(chosen) < max_views and (rest := [k for k in codes if k not in chosen]):
        scores = {k: score([*chosen, k]) for k in progress_bar(rest, desc=f"select {len(chosen) + 1}",
                                                              unit="view", enabled=progress)}
        best = max(scores, key=lambda k: (scores[k]["cv_accuracy"], -scores[k]["dim"]))
        gain = scores[best]["cv_accuracy"] - steps[-1]["cv_accuracy"]
        logger.info("select: + %s|%s -> %.2f%% CV %s (%+.2f points)", *best, 100 * scores[best]["cv_accuracy"],
                    metric, 100 * gain)
        steps[-1]["candidates"] = {f"{k[0]}|{k[1]}": v["cv_accuracy"] for k, v in scores.items()}
        if gain <= min_gain:
            break
        chosen.append(best)
        steps.append({"views": [list(k) for k in chosen], "added": list(best), **scores[best]})
    return Selection(views=chosen, steps=steps, metric=metric)


def _view_scorer(codes: Mapping[tuple[str, str], Any], y: np.ndarray, combine: Callable, scaling: str, cv: int,
                 max_samples: int | None, random_state: int, metric: str) -> tuple[Callable, str]:
    """score(list of view keys) -> {cv_accuracy, cv_std, C, dim} of the sweep's probe on their combination, on the
    sweep's rows and folds; and the metric it scores."""
    rows_idx = _sweep_subset(y, max_samples, random_state)
    probe = LinearProbe(cv=cv, max_iter=_SWEEP_MAX_ITER, tol=_SWEEP_TOL, random_state=random_state, metric=metric,
                        scaling=scaling)
    probe._check_params()
    metric = cv_metric(metric, y[rows_idx])
    views = {key: np.asarray(X)[rows_idx] for key, X in codes.items()}

    def score(keys: list[tuple[str, str]]) -> dict[str, float]:
        X, y_sub = check_xy(combine([views[k] for k in keys]), y[rows_idx], for_cv=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            path, *_ = probe._cv_path(X, y_sub, log_each=False, metric=metric)
        best = max(path, key=lambda r: r["mean"])  # ties: the smaller C
        return {"cv_accuracy": best["mean"], "cv_std": best["std"], "C": best["C"], "dim": int(X.shape[1])}

    return score, metric


def _sweep_subset(y: np.ndarray, max_samples: int | None, random_state: int) -> np.ndarray:
    """Row indices to score on: all rows, or a stratified random subset of `max_samples` (multi-label: random)."""
    all_rows = np.arange(len(y))
    if max_samples is None or len(y) <= max_samples:
        return all_rows
    if y.ndim == 2:
        logger.info("sweep: scoring a random subset of %d of %d samples", max_samples, len(y))
        return np.sort(np.random.default_rng(random_state).choice(len(y), max_samples, replace=False))
    try:
        subset, _ = train_test_split(all_rows, train_size=max_samples, stratify=y, random_state=random_state)
    except ValueError as err:  # too few rows left out to stratify, or a class of one (reported later)
        logger.info("sweep: cannot subsample %d of %d rows (%s); scoring all rows", max_samples, len(y), err)
        return all_rows
    logger.info("sweep: scoring a stratified random subset of %d of %d samples", max_samples, len(y))
    return np.sort(subset)
