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
pairs worth the exact one (32 px, 9 x 9 crop positions, 6 blurs).
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

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
CHUNK = 2048  # pairs scored at once: (CHUNK, 32, 32) float32 arrays, a few MB


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
    scores = np.full(len(pairs), -1.0, np.float32)
    for start in range(0, len(pairs), CHUNK):
        part = pairs[start:start + CHUNK]
        a, b = thumbs[part[:, 0]].astype(np.float32), thumbs[part[:, 1]].astype(np.float32)
        coarse = np.maximum(_best_view(a, b, *COARSE), _best_view(b, a, *COARSE))
        close = coarse >= COARSE_FLOOR
        fine = coarse.copy()
        if close.any():
            fine[close] = np.maximum(_best_view(a[close], b[close], *FINE), _best_view(b[close], a[close], *FINE))
        scores[start:start + len(part)] = fine
    return np.minimum(scores, 1.0)


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


def _best_view(a: np.ndarray, b: np.ndarray, size: int, steps: int, blurs: tuple[float, ...]) -> np.ndarray:
    """Per pair, the largest correlation of b (whole, at `size`) with a view of a: (m, T, T) x2 -> (m,)."""
    plain = resampling(THUMB, size, 0, THUMB)
    target = _unit(plain @ b @ plain.T)
    best = np.full(len(a), -1.0, np.float32)
    for my, mxs in _views(size, steps, blurs):
        rows = my @ a  # (m, size, T)
        for mx in mxs:
            best = np.maximum(best, np.einsum("ij,ij->i", _unit(rows @ mx.T), target))
    return best


def _unit(x: np.ndarray) -> np.ndarray:
    """(m, h, w) -> (m, h*w) rows with mean 0 and length 1 (a flat row stays 0)."""
    x = x.reshape(len(x), -1)
    x = x - x.mean(1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)
