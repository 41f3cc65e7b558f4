"""Outliers (images far from their class in code space) and class-balance facts.

An image's score is the mean cosine distance from its codes to its k nearest neighbours of the same class (for
multi-label data: of the whole set): low k-NN density. It is an outlier above its class's median + `mads` scaled
median absolute deviations, a threshold that the outliers themselves hardly move (unlike mean + 3 std).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from transferkit.auditing.nearest import l2_normalise, nearest

MAD_SCALE = 1.4826  # MAD x this estimates the standard deviation of normally distributed scores


def knn_distance(codes: np.ndarray, k: int) -> np.ndarray:
    """(n,) mean cosine distance of each row to its k nearest other rows (0 for a lone row: nothing to compare)."""
    if len(codes) < 2:
        return np.zeros(len(codes))
    unit = l2_normalise(codes)
    sims, _ = nearest(unit, unit, k, self_search=True)
    return (1.0 - sims).mean(1)


def robust_threshold(scores: np.ndarray, mads: float) -> float:
    """median + `mads` x the scaled median absolute deviation of `scores`."""
    median = float(np.median(scores))
    return median + mads * MAD_SCALE * float(np.median(np.abs(scores - median)))


def find_outliers(codes: np.ndarray, labels: np.ndarray, classes: Sequence[str], *, neighbors: int,
                  mads: float) -> list[dict]:
    """Rows (index, label, score, threshold) of the images above their group's threshold, farthest (relative to the
    threshold) first. Groups: each class; multi-label data: all images at once."""
    unit = l2_normalise(codes)
    groups = [("*", np.arange(len(unit)))] if labels.ndim == 2 else \
        [(name, np.flatnonzero(labels == c)) for c, name in enumerate(classes)]
    rows = []
    for name, idx in groups:
        if len(idx) < 3:  # a median and a spread need a few images
            continue
        scores = knn_distance(unit[idx], neighbors)
        limit = robust_threshold(scores, mads)
        rows += [{"index": int(i), "label": name if name != "*" else _names(labels[i], classes),
                  "score": round(float(s), 6), "threshold": round(limit, 6)}
                 for i, s in zip(idx, scores) if s > limit]
    return sorted(rows, key=lambda r: -r["score"] / max(r["threshold"], 1e-12))


def class_balance(labels: np.ndarray, classes: Sequence[str]) -> dict:
    """Images per class (multi-label: per label), and the imbalance ratio largest / smallest."""
    counts = labels.sum(0) if labels.ndim == 2 else np.bincount(labels, minlength=len(classes))
    smallest = int(counts.min())
    return {"counts": {c: int(n) for c, n in zip(classes, counts)}, "largest": int(counts.max()),
            "smallest": smallest, "imbalance_ratio": round(float(counts.max()) / smallest, 4) if smallest else None}


def _names(row: np.ndarray, classes: Sequence[str]) -> str:
    return ";".join(c for c, on in zip(classes, row) if on)
