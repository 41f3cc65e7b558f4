"""Limits of the data parameters, as plain data (transferkit.runtime.params): the transforms, the extractor,
fine-tuning, the CLI and the recipe files read them. Light: no torch, no sklearn."""

from __future__ import annotations

from numbers import Integral
from pathlib import Path

from transferkit.runtime.params import Interval

IMAGE_SIZE = [Interval(Integral, 8, None, closed="left"), None]  # None: the model's pretrained input size

# what `open_dataset` accepts (its error messages and the CLI's DATA arguments say it)
ACCEPTED_FORMS = (
    "an ImageFolder directory (one subfolder of images per class), a CSV manifest with 'path' and "
    "'label' columns (or 'labels', several per image separated by ';'), or IDX files "
    "('<prefix>-images-idx3-ubyte[.gz]' beside the matching labels file)"
)
IDX_SUFFIXES = ("-images-idx3-ubyte", "-images-idx3-ubyte.gz")  # an IDX prefix names '<prefix><suffix>'


def could_be_data(path: str | Path) -> bool:
    """Whether `path` exists, or is an IDX prefix: the CLI refuses anything else before torch loads."""
    p = Path(path)
    return p.exists() or (bool(p.name) and any(p.with_name(p.name + s).is_file() for s in IDX_SUFFIXES))
