"""Dense prediction at chosen scales: an image resized before the converted net sees it, several scales averaged.

A classifier sees objects at the scale it was trained at: a probe trained on 64 px items gives a flat map on
a 1920x640 photo whose objects are 500 px tall, until the photo is shrunk. `scale` (a resize factor) and
`short_side` (pixels of the shorter side) choose the sizes; several are averaged as in OverFeat's multi-scale
evaluation: each scale's map of per-cell probabilities is sampled at the cells of the finest map (bilinear, at
each cell's centre in the image's own pixels, through each scale's receptive-field geometry) and the maps are
averaged. Probabilities are averaged, not raw scores: logits and SVM margins of different scales have no
common unit, probabilities do, and an average of distributions is a distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from transferkit.errors import DataError, ParameterError
from transferkit.runtime.params import validate
from transferkit.surgery.params import DENSE, MAX_MEGAPIXELS
from transferkit.surgery.receptive_field import Field, receptive_field

if TYPE_CHECKING:
    from PIL import Image

    from transferkit.surgery.dense import DenseClassifier


@dataclass(frozen=True)
class Step:
    """One scale of a dense pass: the (h, w) the network sees, and the parameter value that asked for it."""

    size: tuple[int, int]
    param: str | None  # 'scale' or 'short_side'; None: the image's own size
    value: float | None = None


@dataclass
class DenseMaps:
    """Per-cell probabilities of one image, at one scale or averaged over several, on one grid of cells."""

    probabilities: torch.Tensor  # (K, h, w) on the grid of the finest scale
    image_probabilities: torch.Tensor  # (K,) per scale the probabilities of the map's mean score, averaged
    field: Field  # the grid's cells in the pixels of the image as given (not as resized)
    steps: list[Step]
    map_sizes: list[tuple[int, int]]  # per step
    scores: torch.Tensor | None = None  # (K, h, w) raw scores: one scale only (scales' raw scores do not average)
    mean_scores: torch.Tensor | None = None  # (K,) their mean: the original logits/margins where the map's mean is

    @property
    def top_class(self) -> torch.Tensor:
        """(h, w): the most probable class of each cell."""
        return self.probabilities.argmax(0)


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def plan(clf: DenseClassifier, image_size: tuple[int, int], *, scale: float | Sequence[float] | None = None,
         short_side: int | Sequence[int] | None = None, source: str | Path = "") -> list[Step]:
    """The sizes to run an image of `image_size` (h, w) at, smallest first, each checked against the network's
    minimum input and the MAX_MEGAPIXELS memory cap before anything runs."""
    h, w = image_size
    asked = [("scale", v) for v in _as_list(scale)] + [("short_side", v) for v in _as_list(short_side)]
    steps = {}
    for param, value in asked:
        validate(DENSE, {param: value}, "dense_predict")
        if param == "scale":
            size = (max(1, round(h * value)), max(1, round(w * value)))
        else:  # the shorter side exactly `value` px, the other in proportion
            f = value / min(h, w)
            size = (int(value), max(1, round(w * f))) if h <= w else (max(1, round(h * f)), int(value))
        steps.setdefault(size, Step(size, param, value))
    if not steps:
        steps[(h, w)] = Step((h, w), None)
    for step in steps.values():
        _check(clf, step, image_size, source)
    return sorted(steps.values(), key=lambda s: s.size[0] * s.size[1])


def _check(clf: DenseClassifier, step: Step, image_size: tuple[int, int], source: str | Path) -> None:
    """Refuse a size the network cannot use (ParameterError naming the parameter that asked for it), or one
    over the memory cap."""
    (h, w), mp = step.size, step.size[0] * step.size[1] / 1e6
    if step.param is None:  # the image as it is: any size the network runs on (too small fails as it runs)
        min_h, min_w = clf.net.input_size if not clf.net.mean_is_logits else (1, 1)
        if h < min_h or w < min_w:
            raise DataError(f"image '{source}' is {w}x{h}; this network's head needs at least {min_w}x{min_h} (the "
                            "size it was converted at)")
        if mp > MAX_MEGAPIXELS:
            raise DataError(f"image '{source}' is {w}x{h} ({mp:.1f} megapixels), over dense prediction's limit of "
                            f"{MAX_MEGAPIXELS} (memory: ~350 MB per megapixel); pass a scale or short_side to "
                            "shrink it")
        return
    min_h, min_w = clf.min_input_size()
    why = ("the size it was converted at: each cell classifies one such window" if not clf.net.mean_is_logits
           else "one stride of the network: one full cell")
    said = f"The '{step.param}' parameter of dense_predict"
    if h < min_h or w < min_w:
        raise ParameterError(f"{said} must resize the {image_size[1]}x{image_size[0]} image '{source}' to at least "
                             f"{min_w}x{min_h} ({why}). Got {step.value}, giving {w}x{h}.", param=step.param)
    if mp > MAX_MEGAPIXELS:
        raise ParameterError(f"{said} must give at most {MAX_MEGAPIXELS} megapixels (memory: ~350 MB per megapixel). "
                             f"Got {step.value}, giving {w}x{h} ({mp:.1f} megapixels) for '{source}'.",
                             param=step.param)


@torch.no_grad()
def dense_maps(clf: DenseClassifier, image: Image.Image, steps: list[Step], source: str | Path = "") -> DenseMaps:
    """Run every step (smallest first), turn each map into probabilities, and average them on the finest grid."""
    runs = []  # (probabilities (K, h, w), field in the image's pixels)
    image_probs = []
    scores = None
    for step in steps:
        raw, field = _run(clf, image, step.size, source)
        runs.append((clf.probabilities(raw), field.rescaled((image.height, image.width))))
        image_probs.append(clf.probabilities(raw.mean((1, 2))))
        scores = raw if len(steps) == 1 else None
    ref = max(range(len(runs)), key=lambda i: (runs[i][1].shape[0] * runs[i][1].shape[1], i))
    onto = runs[ref][1]
    probs = [p if i == ref else _resample(p, field, onto) for i, (p, field) in enumerate(runs)]
    return DenseMaps(torch.stack(probs).mean(0), torch.stack(image_probs).mean(0), onto, list(steps),
                     [field.shape for _, field in runs], scores, None if scores is None else scores.mean((1, 2)))


def _run(clf: DenseClassifier, image: Image.Image, size: tuple[int, int], source: str | Path):
    """(K, h, w) raw scores of `image` resized to `size` (bicubic, antialiased; not at all at its own size)."""
    from PIL import Image as PILImage

    if size != (image.height, image.width):
        image = image.resize((size[1], size[0]), PILImage.BICUBIC)
    x = clf.preprocess(image)
    try:
        scores, field = receptive_field(clf.net, x)
    except RuntimeError as e:
        raise DataError(f"image '{source}' ({x.shape[-1]}x{x.shape[-2]}) is too small for this network: "
                        f"{str(e).splitlines()[0]}") from e
    if scores.shape[1] != len(clf.classes):
        raise DataError(f"the network gives {scores.shape[1]} scores for {len(clf.classes)} classes")
    return scores[0].float(), field


def _resample(values: torch.Tensor, field: Field, onto: Field) -> torch.Tensor:
    """(K, h, w) values on `field`'s cells -> (K, H, W) on `onto`'s, bilinear at each target cell's centre
    (both fields in the same image pixels); cells past the edge take the nearest border cell."""
    centres = onto.centres()  # (H, W, 2) as (y, x)
    grid = []
    for axis, n, c in ((field.x, field.shape[1], centres[..., 1]), (field.y, field.shape[0], centres[..., 0])):
        index = (c - axis.start) / axis.jump  # continuous cell index along this axis
        grid.append(2 * index / (n - 1) - 1 if n > 1 else torch.zeros_like(index))  # align_corners=True
    grid = torch.stack(grid, -1).unsqueeze(0).to(values.dtype)  # (1, H, W, 2) as (x, y)
    return F.grid_sample(values.unsqueeze(0), grid, mode="bilinear", padding_mode="border", align_corners=True)[0]
