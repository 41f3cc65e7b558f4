"""Exact duplicates (same bytes: the content hash that keys the code cache) and near-duplicates (cosine similarity
of codes at or above a threshold), within DATA and TEST and across them: a pair across is train/test leakage.

Images are numbered DATA first, then TEST (`n_data` is where TEST starts). Near-duplicates come from scikit-learn's
brute-force cosine NearestNeighbors, k per image: exact for the closest k, O(n^2 d) time in blocks.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

LEAKAGE, WITHIN = "leakage", "within"  # a pair's scope: across DATA/TEST, or inside one of them
EXACT, NEAR = "exact", "near"


def l2_normalise(codes: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero): their dot products are cosine similarities."""
    codes = np.asarray(codes, dtype=np.float32)
    norms = np.linalg.norm(codes, axis=1, keepdims=True)
    return codes / np.where(norms > 0, norms, 1)


def exact_duplicates(hashes: Sequence[bytes | None], n_data: int) -> list[dict]:
    """Pairs of images with the same bytes. Each group of copies becomes pairs with one representative: every TEST
    copy with the group's first DATA image (leakage), every other copy with the first of its own side (within)."""
    groups: dict[bytes, list[int]] = defaultdict(list)
    for i, h in enumerate(hashes):
        if h is not None:  # unreadable: nothing to compare
            groups[h].append(i)
    pairs = []
    for members in groups.values():
        if len(members) < 2:
            continue
        data = [i for i in members if i < n_data]
        test = [i for i in members if i >= n_data]
        if data:
            pairs += [_pair(EXACT, LEAKAGE, data[0], t, 1.0) for t in test]
        for side in (data, test):
            pairs += [_pair(EXACT, WITHIN, side[0], i, 1.0) for i in side[1:]]
    return pairs


def near_duplicates(codes: np.ndarray, n_data: int, *, threshold: float, neighbors: int,
                    exact: Sequence[dict] = ()) -> list[dict]:
    """Pairs whose codes' cosine similarity is >= `threshold` among each image's `neighbors` nearest, leaving out
    pairs already found as exact copies (or copies of one: same hash group).

    TEST images are searched in a DATA-only index, so a leak is found however many TEST images look alike."""
    unit = l2_normalise(codes)
    data, test = unit[:n_data], unit[n_data:]
    same = _copy_groups(exact, len(unit))
    found: dict[tuple[int, int], float] = {}
    searches = ((data, 0, data, 0), (test, n_data, test, n_data), (data, 0, test, n_data))  # (index, query)
    for base, offset_b, query, offset_q in searches:
        self_search = base is query
        if len(base) < 1 + self_search or not len(query):
            continue
        for i, j, sim in _close(base, query, threshold, neighbors, self_search=self_search):
            a, b = sorted((j + offset_b, i + offset_q))
            if a != b and same[a] != same[b]:
                found[(a, b)] = max(sim, found.get((a, b), -1.0))
    return [_pair(NEAR, LEAKAGE if a < n_data <= b else WITHIN, a, b, s) for (a, b), s in found.items()]


def ranked(pairs: list[dict]) -> list[dict]:
    """Leakage first (an accuracy measured on it is a lie), then exact before near, then the most similar."""
    return sorted(pairs, key=lambda p: (p["scope"] != LEAKAGE, p["kind"] != EXACT, -p["similarity"], p["a"], p["b"]))


def _close(base: np.ndarray, query: np.ndarray, threshold: float, k: int,
           self_search: bool) -> list[tuple[int, int, float]]:
    """(query row, base row, similarity) of each query row's k nearest base rows at or above `threshold`."""
    from sklearn.neighbors import NearestNeighbors

    k = min(k + self_search, len(base))  # searching a set in itself: each row finds itself first
    dist, idx = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(base).kneighbors(query)
    sim = 1.0 - dist  # (n_query, k)
    rows, cols = np.nonzero(sim >= threshold)
    return [(int(r), int(idx[r, c]), float(min(sim[r, c], 1.0))) for r, c in zip(rows, cols)]


def _copy_groups(exact: Sequence[dict], n: int) -> np.ndarray:
    """A group id per image: images linked by exact pairs share one (their codes are equal, so they'd pair again)."""
    group = np.arange(n)
    for p in exact:  # every exact pair links a copy to its group's representative, so one pass suffices
        group[p["b"]] = group[p["a"]]
    return group


def _pair(kind: str, scope: str, a: int, b: int, similarity: float) -> dict:
    return {"kind": kind, "scope": scope, "a": int(a), "b": int(b), "similarity": round(float(similarity), 6)}
