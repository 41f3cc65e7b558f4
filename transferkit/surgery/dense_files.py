"""The files of a dense prediction: STEM.npz (every map), STEM-heatmap.png (chosen classes) and STEM-classes.png
(the most probable class of each cell), each written atomically into an output folder transferkit owns."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from transferkit.runtime.atomic import write_bytes_atomic
from transferkit.runtime.outputs import claim
from transferkit.surgery.dense import DENSE_KIND

if TYPE_CHECKING:
    from transferkit.surgery.dense import DenseClassifier
    from transferkit.surgery.multiscale import DenseMaps


def write_maps(clf: DenseClassifier, image, image_path: str | Path, out: str | Path, maps: DenseMaps,
               heat_classes: list[int]) -> list[str]:
    """Write the three files of one image into `out` (claimed: never the images' folder, never a folder
    transferkit did not make); return their paths."""
    from transferkit.plots import plot_class_map, plot_heatmaps

    out = claim(out, DENSE_KIND, inputs=[image_path])
    stem = Path(image_path).stem
    files = [out / f"{stem}.npz", out / f"{stem}-heatmap.png", out / f"{stem}-classes.png"]
    _write(files[0], lambda f: np.savez_compressed(f, **_arrays(clf, maps)))
    pixels, kind = np.asarray(image), clf.probability_kind
    heats = [maps.probabilities[k].numpy() for k in heat_classes]
    _write(files[1], lambda f: plot_heatmaps(pixels, heats, [clf.classes[k] for k in heat_classes], maps.field, f,
                                             label=f"probability per cell: {kind}{_scales_text(maps)}"))
    _write(files[2], lambda f: plot_class_map(pixels, maps.top_class.numpy(), clf.classes, maps.field, f,
                                              title=f"most probable class per cell ({kind}){_scales_text(maps)}"))
    return [str(f) for f in files]


def _write(path: Path, write: Callable[[io.BytesIO], object]) -> None:
    """Render into memory, then replace `path` in one rename: a reader sees the old file or the new one."""
    buffer = io.BytesIO()
    write(buffer)
    write_bytes_atomic(path, buffer.getvalue())


def _scales_text(maps: DenseMaps) -> str:
    sizes = [f"{s.size[1]}x{s.size[0]}" for s in maps.steps]
    if len(sizes) == 1 and maps.steps[0].param is None:
        return ""
    return f"; input {sizes[0]}" if len(sizes) == 1 else f"; mean of {len(sizes)} scales ({', '.join(sizes)})"


def _arrays(clf: DenseClassifier, maps: DenseMaps) -> dict[str, np.ndarray]:
    """Everything the maps hold, as arrays: boxes and centres in the pixels of the image as given."""
    field = maps.field
    arrays = {
        "probabilities": maps.probabilities.numpy(), "top_class": maps.top_class.numpy(),
        "image_probabilities": maps.image_probabilities.numpy(), "probability": np.array(clf.probability_kind),
        "centres": field.centres().numpy(), "boxes": field.boxes().numpy(),
        "boxes_clipped": field.boxes(clip=True).numpy(), "classes": np.array(clf.classes),
        "input_sizes": np.array([s.size for s in maps.steps]), "map_sizes": np.array(maps.map_sizes),
    }
    if maps.scores is not None:  # one scale: its raw scores (several scales' raw scores are not averaged)
        arrays["scores"] = maps.scores.numpy()
    if clf.multilabel:
        arrays["thresholds"] = np.asarray(clf.thresholds)
    return arrays
