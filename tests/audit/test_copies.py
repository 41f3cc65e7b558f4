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
