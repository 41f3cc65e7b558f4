"""The copy verification of near-duplicates (transferkit.auditing.copies) on real Fashion-MNIST items: each transform
of bench/audit_duplicates.py, at its harshest, is verified as a copy; an item's closest distinct look-alike is not."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from transferkit.auditing import copies
from transferkit.auditing.params import NEAR_THRESHOLD
from transferkit.data.datasets import ImageDataset

pytestmark = pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                                reason="needs dataset-fashion-mnist")


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("L")


TRANSFORMS = {  # the harshest of each kind the bench plants (a crop's position varies: three of them)
    "resize 60%": lambda im: im.resize((17, 17), Image.Resampling.BILINEAR).resize((28, 28), Image.Resampling.BILINEAR),
    "jpeg 60": lambda im: jpeg(im, 60),
    "crop 90% top left": lambda im: im.resize((28, 28), Image.Resampling.BILINEAR, box=(0, 0, 25.2, 25.2)),
    "crop 90% centre": lambda im: im.resize((28, 28), Image.Resampling.BILINEAR, box=(1.4, 1.4, 26.6, 26.6)),
    "crop 90% bottom right": lambda im: im.resize((28, 28), Image.Resampling.BILINEAR, box=(2.8, 2.8, 28, 28)),
    "brightness -15%": lambda im: ImageEnhance.Brightness(im).enhance(0.85),
}


@pytest.fixture(scope="module")
def items():
    from transferkit.recipes.demo import fashion_mnist

    return fashion_mnist("train", per_class=20)  # 200 items, the first 20 of each class


def as_dataset(pixels: np.ndarray) -> ImageDataset:
    return ImageDataset([f"#{i}" for i in range(len(pixels))], np.zeros(len(pixels)), ["x"], root="mem", kind="idx",
                        pixels=pixels)


def test_every_transform_of_real_items_is_verified_as_a_copy(items):
    originals = items._pixels[::20][:10]  # one item per class
    made = [np.asarray(t(Image.fromarray(p)).convert("L")) for t in TRANSFORMS.values() for p in originals]
    thumbs = copies.thumbnails(as_dataset(np.concatenate([originals, np.stack(made)])))
    n = len(originals)
    pairs = np.array([(j % n, n + j) for j in range(len(made))])
    scores = copies.verify(thumbs, pairs).reshape(len(TRANSFORMS), n)
    missed = {name: row.round(4).tolist() for name, row in zip(TRANSFORMS, scores) if (row < NEAR_THRESHOLD).any()}
    assert not missed, missed
    assert copies.verify(thumbs, pairs[:, ::-1]).tolist() == scores.ravel().tolist()  # symmetric


def test_distinct_look_alikes_are_not_verified_as_copies(items):
    """Each item's most similar other item (by the 8 px thumbnails that propose candidates) scores below the
    threshold for nearly all: Fashion-MNIST has genuine near-identical product shots, so not for all."""
    thumbs = copies.thumbnails(items)
    sketch = copies.sketches(thumbs)
    sim = sketch @ sketch.T
    np.fill_diagonal(sim, -1)
    pairs = np.stack([np.arange(len(items)), sim.argmax(1)], 1)
    assert sim.max(1).mean() > 0.9  # they do look alike at 8 px
    scores = copies.verify(thumbs, pairs)
    assert (scores >= NEAR_THRESHOLD).mean() <= 0.05, np.sort(scores)[-12:]


def _reference_score(ta: np.ndarray, tb: np.ndarray) -> float:
    """One pair, straight from the definition: the best correlation of either image (whole, at the pass's size)
    with any view of the other; the exact pass only for pairs that reach COARSE_FLOOR in the cheap one."""
    def corr(u: np.ndarray, v: np.ndarray) -> float:
        u, v = u.ravel() - u.mean(), v.ravel() - v.mean()
        return float(u @ v / max(np.linalg.norm(u) * np.linalg.norm(v), 1e-12))

    def best(spec, a, b):
        plain = copies.resampling(copies.THUMB, spec[0], 0, copies.THUMB)
        return max(corr(my @ a @ mx.T, plain @ b @ plain.T) for my, mxs in copies._views(*spec) for mx in mxs)

    a, b = ta.astype(np.float64), tb.astype(np.float64)
    coarse = max(best(copies.COARSE, a, b), best(copies.COARSE, b, a))
    return coarse if coarse < copies.COARSE_FLOOR else max(best(copies.FINE, a, b), best(copies.FINE, b, a))


def test_batched_scores_equal_the_definition_pair_by_pair(items, monkeypatch):
    """verify computes each image's views once and shares them among its pairs, a few images at a time: the same
    scores as pair by pair (float32 vs float64: 1e-4), with banks of 3 images so that pairs span banks."""
    originals = items._pixels[:12]
    made = np.stack([np.asarray(t(Image.fromarray(p)).convert("L")) for t, p in zip(TRANSFORMS.values(), originals)])
    thumbs = copies.thumbnails(as_dataset(np.concatenate([originals, made])))
    pairs = np.array([(0, 12), (1, 13), (2, 14), (3, 15), (4, 16), (5, 17), (0, 1), (0, 5), (0, 17), (6, 7),
                      (9, 10), (11, 12), (3, 3)])
    monkeypatch.setattr(copies, "BANK_BYTES", 3 * 4 * 32 * 32 * 87)
    scores = copies.verify(thumbs, pairs)
    want = np.array([min(_reference_score(thumbs[a], thumbs[b]), 1.0) for a, b in pairs])
    assert np.abs(scores - want).max() < 1e-4, np.c_[scores, want]
    assert (scores[:6] >= copies.COARSE_FLOOR).all() and (scores[6:] < copies.COARSE_FLOOR).any()  # both passes
    assert copies.verify(thumbs, np.zeros((0, 2), np.int64)).shape == (0,)
