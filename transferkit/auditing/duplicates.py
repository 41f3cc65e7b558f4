"""Exact duplicates (same bytes: the content hash that keys the code cache) and near-duplicates (transformed copies:
candidates by codes and thumbnails, verified on the images by `copies`), within DATA and TEST and across them: a
pair across is train/test leakage.

Images are numbered DATA first, then TEST (`n_data` is where TEST starts). Candidates come from an exact k-nearest
search per image (auditing.nearest: scikit-learn, faiss for large sets), O(n^2 d) time.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from transferkit.auditing import copies
from transferkit.auditing.nearest import l2_normalise, nearest

LEAKAGE, WITHIN = "leakage", "within"  # a pair's scope: across DATA/TEST, or inside one of them
EXACT, NEAR = "exact", "near"


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


def near_duplicates(codes: np.ndarray, thumbs: np.ndarray, n_data: int, *, threshold: float, candidates: int,
                    exact: Sequence[dict] = ()) -> list[dict]:
    """Pairs that `copies.verify` scores >= `threshold` and that are each other's best match (ties count), among
    candidates: each image's `candidates` nearest by codes (cosine) and by 8 px thumbnails (correlation), leaving
    out pairs already found as exact copies (or copies of one: same hash group). `thumbs`: `copies.thumbnails` of
    the same images, in the same order. Of three or more copies of one image (that are not exact), only the
    mutually closest pairs are reported.

    Codes alone cannot decide: a resized copy of a small image scores below distinct look-alikes (docs/audit.md).
    TEST images are searched in a DATA-only index, so a leak is found however many TEST images look alike."""
    same = _copy_groups(exact, len(codes))
    pairs: set[tuple[int, int]] = set()
    for space in (l2_normalise(codes), copies.sketches(thumbs)):
        data, test = space[:n_data], space[n_data:]
        searches = ((data, 0, data, 0), (test, n_data, test, n_data), (data, 0, test, n_data))  # (index, query)
        for base, offset_b, query, offset_q in searches:
            self_search = base is query
            if len(base) < 1 + self_search or not len(query):
                continue
            for i, j in _nearest(base, query, candidates, self_search=self_search):
                a, b = sorted((j + offset_b, i + offset_q))
                if a != b and same[a] != same[b]:
                    pairs.add((a, b))
    found = np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)
    scores = copies.verify(thumbs, found)
    best = np.full(len(codes), -1.0, np.float32)  # each image's best copy score with any candidate
    np.maximum.at(best, found[:, 0], scores)
    np.maximum.at(best, found[:, 1], scores)
    # mutual best matches only: a copy resembles its original more than anything else does, and vice versa, while a
    # look-alike of the original may resemble a (blurred) copy more than the original (bench: 55 such pairs in 1164)
    keep = (scores >= threshold) & (scores >= best[found[:, 0]]) & (scores >= best[found[:, 1]])
    return [_pair(NEAR, LEAKAGE if a < n_data <= b else WITHIN, a, b, s)
            for (a, b), s in zip(found[keep].tolist(), scores[keep].tolist())]


def ranked(pairs: list[dict]) -> list[dict]:
    """Leakage first (an accuracy measured on it is a lie), then exact before near, then the most similar."""
    return sorted(pairs, key=lambda p: (p["scope"] != LEAKAGE, p["kind"] != EXACT, -p["similarity"], p["a"], p["b"]))


def _nearest(base: np.ndarray, query: np.ndarray, k: int, self_search: bool) -> list[tuple[int, int]]:
    """(query row, base row) of each query row's k nearest base rows (unit rows: by cosine similarity)."""
    _, idx = nearest(base, query, k, self_search=self_search)  # (n_query, k)
    return [(r, int(j)) for r, row in enumerate(idx) for j in row]


def _copy_groups(exact: Sequence[dict], n: int) -> np.ndarray:
    """A group id per image: images linked by exact pairs share one (their codes are equal, so they'd pair again)."""
    group = np.arange(n)
    for p in exact:  # every exact pair links a copy to its group's representative, so one pass suffices
        group[p["b"]] = group[p["a"]]
    return group


def _pair(kind: str, scope: str, a: int, b: int, similarity: float) -> dict:
    return {"kind": kind, "scope": scope, "a": int(a), "b": int(b), "similarity": round(float(similarity), 6)}
