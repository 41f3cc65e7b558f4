"""Is image b a transformed copy of image a? Verified on small grayscale thumbnails of the images, because CNN codes
cannot tell: a 28 px Fashion-MNIST item resized down and up keeps only 0.5-0.93 cosine similarity of its
pre_logits codes, while distinct look-alikes reach 0.954 (docs/audit.md).

A copy is recognised by modelling what copying does: a crop (90% of the side, anywhere: the view of `a` at
that box, resampled), a loss of resolution (resizing down and up, JPEG: `a` blurred by a Gaussian), a change
of brightness or contrast (normalised cross-correlation ignores gain and offset). The score of a pair is the
largest correlation between `b` and any such view of `a` (and of `a` and any view of `b`): a copy scores
~0.99-1, a look-alike less, since its own details differ once it is aligned at full thumbnail resolution.

Every view is linear in the thumbnail, `My @ t @ Mx.T` with resampling matrices (`resampling`), so a batch of
pairs is scored with a few matrix products. Two passes: a cheap one (16 px, 5 x 5 crop positions) keeps the
pairs worth the exact one (32 px, 9 x 9 crop positions, 6 blurs). Each pass computes an image's views once
(`_view_bank`) and scores its pairs by dot products with them: a 70,000-image audit checks ~1.6M candidate
pairs (~430,000 reach the exact pass), and recomputing the views per pair took ~200 s of its 2 cores.
"""

from __future__ import annotations

import os
import queue
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from threadpoolctl import threadpool_limits

if TYPE_CHECKING:
    from transferkit.data.datasets import ImageDataset


THUMB = 32  # px: every image becomes a THUMB x THUMB grayscale thumbnail (aspect ignored, as pHash does)
SKETCH = 8  # px: candidates are the nearest thumbnails at this size (normalised cross-correlation)
CROP = 0.9  # a crop keeps this fraction of each side: the views of an image are its crops at that size
# The cheap pass: 16 px, 5 x 5 crop positions (0.7 px apart at 28 px). A planted copy of a 28 px Fashion-MNIST item
# scores >= 0.97 there in 98% of cases (bench/audit_duplicates.py); pairs below are not looked at again.
COARSE = (16, 5, (0.0,))
COARSE_FLOOR = 0.97
FINE = (THUMB, 9, (0.0, 0.6, 0.9, 1.2, 1.5, 1.8))  # 32 px, 9 x 9 crop positions, Gaussian blurs (sigma in px)
BANK_BYTES = 128 << 20  # views held at once: ~4,900 images' 26 views at 16 px, ~370 images' 87 at 32 px


def thumbnails(dataset: ImageDataset) -> np.ndarray:
    """(n, THUMB, THUMB) uint8 grayscale thumbnails, decoded no larger than needed (transferkit.data.decode)."""
    from transferkit.data.decode import DecodeTarget  # torch: not on the CLI's way to its argument checks

    target = DecodeTarget(THUMB)
    out = np.empty((len(dataset), THUMB, THUMB), np.uint8)
    for i in range(len(dataset)):
        img = dataset.image(i, target).convert("L")
        out[i] = np.asarray(img.resize((THUMB, THUMB), Image.Resampling.BILINEAR), np.uint8)
    return out


def sketches(thumbs: np.ndarray) -> np.ndarray:
    """(n, SKETCH**2) unit rows, mean removed: their dot products are normalised cross-correlations of the images
    at SKETCH px, the candidates' metric (robust to blur, JPEG and brightness; crops need the codes or `verify`)."""
    m = resampling(THUMB, SKETCH, 0.0, THUMB)
    return _unit(m @ thumbs.astype(np.float32) @ m.T)


def verify(thumbs: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """The copy score of each pair (a, b) of rows of `thumbs`: the largest normalised cross-correlation of one
    image with any view (crop, blur) of the other at 32 px; pairs below COARSE_FLOOR at 16 px score their cheap
    score (they are not copies)."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    scores = _best_view(thumbs, pairs, *COARSE)
    close = np.flatnonzero(scores >= COARSE_FLOOR)
    scores[close] = _best_view(thumbs, pairs[close], *FINE)
    return np.minimum(scores, 1.0)


def _best_view(thumbs: np.ndarray, pairs: np.ndarray, size: int, steps: int, blurs: tuple[float, ...]) -> np.ndarray:
    """Per pair, both ways, the largest correlation of one image (whole, unblurred, at `size`) with any view of the
    other. Each image's views are computed once, for as many images at a time as fit in BANK_BYTES; an image's
    pairs are then one (pairs x px) @ (px x views) product. Banks run on every core, one BLAS thread each: these
    products are small, and a multi-threaded BLAS spent more time starting threads than multiplying (3-4x)."""
    n = len(pairs)
    src, dst = np.concatenate([pairs[:, 0], pairs[:, 1]]), np.concatenate([pairs[:, 1], pairs[:, 0]])
    order = np.argsort(src, kind="stable")
    src, dst = src[order], dst[order]
    used = np.unique(pairs)
    m = resampling(THUMB, size, 0, THUMB)
    n_views = sum(len(mxs) for _, mxs in _views(size, steps, blurs))
    per_bank = max(1, BANK_BYTES // (4 * size * size * n_views))
    plain = np.zeros((len(thumbs), size * size), np.float32)  # every pair's target: the other image, unblurred
    scores = np.empty(2 * n, np.float32)
    buffers: queue.SimpleQueue = queue.SimpleQueue()  # one bank's memory per worker, reused (page faults cost)

    def targets(images: np.ndarray) -> None:
        plain[images] = _unit(m @ thumbs[images].astype(np.float32) @ m.T)

    def score(images: np.ndarray) -> None:
        try:
            out = buffers.get_nowait()
        except queue.Empty:  # the first bank of each worker
            out = np.empty((per_bank, n_views, size * size), np.float32)
        bank = _view_bank(thumbs[images].astype(np.float32), size, steps, blurs, out)  # (m, views, px)
        starts, ends = np.searchsorted(src, images, "left"), np.searchsorted(src, images, "right")
        for views, start, end in zip(bank, starts.tolist(), ends.tolist()):
            scores[start:end] = (plain[dst[start:end]] @ views.T).max(1)
        buffers.put(out)

    chunks = [used[lo:lo + per_bank] for lo in range(0, len(used), per_bank)]
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(min(len(chunks), _cores()) or 1) as pool:
        list(pool.map(targets, chunks))  # all targets before any bank: a pair's other image may be in any chunk
        list(pool.map(score, chunks))
    out = np.empty(2 * n, np.float32)
    out[order] = scores
    return np.maximum(out[:n], out[n:])


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _view_bank(t: np.ndarray, size: int, steps: int, blurs: tuple[float, ...], out: np.ndarray) -> np.ndarray:
    """out[:m] (m, views, size**2), filled with unit rows: every view (`_views`) of each of the (m, THUMB, THUMB)
    thumbnails `t`. `out` is reused from bank to bank (fresh 100 MB arrays cost more in page faults than the
    views take to compute)."""
    bank, v = out[:len(t)], 0
    for my, mxs in _views(size, steps, blurs):
        rows = my @ t  # (m, size, THUMB)
        for mx in mxs:
            bank[:, v] = _unit(rows @ mx.T)
            v += 1
    return bank


def resampling(n: int, size: int, start: float, width: float, sigma: float = 0.0) -> np.ndarray:
    """(size, n) matrix taking a row of n pixels to `size` pixels covering [start, start + width), with a triangle
    (bilinear) filter widened when shrinking (antialiased, as PIL resizes), after a Gaussian blur of `sigma` px."""
    return _resampling(n, size, round(float(start), 6), round(float(width), 6), float(sigma)).copy()


@lru_cache(maxsize=256)
def _resampling(n: int, size: int, start: float, width: float, sigma: float) -> np.ndarray:
    scale = width / size
    support = max(scale, 1.0)
    centres = start + (np.arange(size) + 0.5) * scale
    src = np.arange(n) + 0.5
    w = np.maximum(0.0, 1.0 - np.abs(src[None] - centres[:, None]) / support)
    w /= w.sum(1, keepdims=True)
    if sigma > 0:
        g = np.exp(-0.5 * ((src[:, None] - src[None]) / sigma) ** 2)
        w = w @ (g / g.sum(1, keepdims=True))
    return w.astype(np.float32)


def _views(size: int, steps: int, blurs: tuple[float, ...]) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """The views of a thumbnail as (My, [Mx, ...]): the whole blurred by each sigma, and CROP crops on a
    steps x steps grid of positions; grouped by My so that My @ t is computed once."""
    whole = [(resampling(THUMB, size, 0, THUMB, s), [resampling(THUMB, size, 0, THUMB, s)]) for s in blurs]
    side = CROP * THUMB
    crops = [resampling(THUMB, size, x, side) for x in np.linspace(0, THUMB - side, steps)]
    return whole + [(my, crops) for my in crops]


def _unit(x: np.ndarray) -> np.ndarray:
    """(m, h, w) -> (m, h*w) rows with mean 0 and length 1 (a flat row stays 0)."""
    x = x.reshape(len(x), -1)
    x = x - x.mean(1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)
