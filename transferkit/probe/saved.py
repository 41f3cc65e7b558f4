"""A probe folder on disk (`transferkit probe -o`): how to tell one, and how to load it with the extractor that
makes its codes. Used by the jobs (predict, evaluate) and by network surgery alike."""

from __future__ import annotations

from pathlib import Path

from transferkit.codes.extractor import FeatureExtractor
from transferkit.errors import DataError
from transferkit.models.weights import weights_argument
from transferkit.probe.linear import LinearProbe

PROBE_DIR = "probe"  # the folder inside a probe output that holds the model (arrays.npz + probe.json)


def is_probe_dir(path: str | Path) -> bool:
    """Whether `path` is a folder written by `transferkit probe`."""
    return (Path(path) / PROBE_DIR).is_dir()


def load_probe_dir(path: str | Path, *, batch_size: int = 64, progress: bool = False,
                   exact: bool = False) -> tuple[LinearProbe, FeatureExtractor]:
    """A saved probe and the fitted extractor that makes its codes, with the same backbone weights.

    `exact`: an fp32 backbone without folding, whatever the codes were made with (for network surgery).
    """
    probe = LinearProbe.load(Path(path) / PROBE_DIR)
    spec = probe.extra_
    extractor = FeatureExtractor(
        spec["model"], weights=weights_argument(spec["weights"]), layer=spec["layer"], pool=spec["pool"],
        image_size=spec["image_size"], batch_size=batch_size, precision="fp32" if exact else spec["precision"],
        fold_bn=not exact, engine="torch" if exact else "auto", progress=progress,
    ).fit()
    if extractor.backbone_.weights_info.sha256 != spec["weights"]["sha256"]:
        raise DataError(f"the backbone's weights differ from those probe '{path}' was trained with")
    return probe, extractor
