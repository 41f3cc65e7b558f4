"""Datasets of labelled images: ImageFolder trees (symlink loops and all), CSV manifests and IDX files."""

from __future__ import annotations

import copy
import csv
import errno
import gzip
import logging
import math
import os
import stat
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from transferkit.data.decode import DecodeTarget, load_image
from transferkit.data.folders import class_folders, no_images, scan_images
from transferkit.data.hashing import content_hash
from transferkit.data.known_sets import known_class_names
from transferkit.data.params import ACCEPTED_FORMS, IDX_SUFFIXES
from transferkit.errors import DataError

log = logging.getLogger(__name__)

_Parts = tuple[list[str], np.ndarray, list[str], np.ndarray | None]  # sources, targets, classes, pixels
_IDX_IMAGES_MAGIC = 0x00000803  # uint8, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # uint8, 1 dimension
LABEL_SEPARATOR = ";"  # between the labels of one image in a manifest's 'labels' column


# ---------------------------------------------------------------------------------------------- dataset


class ImageDataset(Dataset):
    """Labelled images from an ImageFolder tree, a CSV manifest or IDX files.

    `targets`: one class index per image, (n,); or, for multi-label data (a manifest's 'labels' column), a 0/1
    row per image over `classes`, (n, n_classes), where a row of zeros is an image with no label.
    """

    def __init__(
        self,
        sources: list[str],
        targets: np.ndarray,
        classes: list[str],
        *,
        root: str,
        kind: str,
        transform: Callable | None = None,
        skip_bad: bool = False,
        pixels: np.ndarray | None = None,
    ) -> None:
        self.sources = sources
        self.targets = np.asarray(targets, dtype=np.int64)
        self.classes = classes
        self.root = root
        self.kind = kind
        self.transform = transform
        self.skip_bad = skip_bad
        self._pixels = pixels  # IDX only: (n, H, W) uint8, kept in memory instead of files
        self.decode_target: DecodeTarget | None = None  # decode no larger than the transform needs (None: exactly)

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def multilabel(self) -> bool:
        """Whether each image carries a set of labels (targets (n, n_classes) of 0/1) rather than one class."""
        return self.targets.ndim == 2

    def class_counts(self) -> np.ndarray:
        """Images per class, in class order; multi-label data: the images carrying each label."""
        if self.multilabel:
            return self.targets.sum(0).astype(np.int64)
        return np.bincount(self.targets, minlength=len(self.classes))

    def __repr__(self) -> str:
        return (
            f"ImageDataset(kind={self.kind!r}, root={self.root!r}, n={len(self)}, "
            f"classes={len(self.classes)})"
        )

    def image(self, i: int, target: DecodeTarget | None = None) -> Image.Image:
        """The RGB image of item `i`, before any transform; with a `target`, no larger than that needs
        (transferkit.data.decode.load_image)."""
        if self._pixels is not None:
            img = Image.fromarray(self._pixels[i]).convert("RGB")
            return img if target is None else target.reduce(img)
        return load_image(self.sources[i], target)

    def content_hashes(self) -> list[bytes | None]:
        """A 16-byte blake2b digest of each item's bytes (file or IDX pixels); None for a file that cannot be read.

        Keys the code cache: same bytes, same codes, wherever the file lives.
        """
        if self._pixels is not None:
            return [content_hash(row.tobytes()) for row in self._pixels]
        out: list[bytes | None] = []
        for source in self.sources:
            try:
                out.append(content_hash(Path(source).read_bytes()))
            except OSError:
                out.append(None)
        return out

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, int, str]:
        """(tensor, label, index, error); with skip_bad a bad file gives (None, label, index, message)."""
        label = self.targets[i] if self.multilabel else int(self.targets[i])
        try:
            img = self.image(i, self.decode_target)
        except DataError as exc:
            if self.skip_bad:
                return None, label, i, str(exc)
            raise
        if self.transform is not None:
            return self.transform(img), label, i, ""
        return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous(), label, i, ""

    def subset(self, per_class: int) -> ImageDataset:
        """The first `per_class` items of each class, in file order; smaller classes keep all they have."""
        if isinstance(per_class, bool) or not isinstance(per_class, int | np.integer) or per_class < 1:
            raise DataError(
                f"The 'per_class' parameter of subset must be an integer >= 1. Got {per_class!r} instead."
            )
        if self.multilabel:
            raise DataError(f"The 'per_class' parameter does not apply to multi-label data ('{self.root}'): an "
                            "image counts towards several classes")
        order = np.argsort(self.targets, kind="stable")  # grouped by class, file order within each
        grouped = self.targets[order]
        rank = np.arange(len(order)) - np.searchsorted(grouped, grouped, side="left")
        return self.select(np.sort(order[rank < per_class]))

    def with_transform(self, transform: Callable | None, decode_target: DecodeTarget | None = None) -> ImageDataset:
        """A shallow copy that applies `transform` instead (e.g. train vs eval preprocessing), decoding images
        no larger than `decode_target` (None: exactly)."""
        other = copy.copy(self)
        other.transform, other.decode_target = transform, decode_target
        return other

    def select(self, idx: np.ndarray) -> ImageDataset:
        """The items at positions `idx`, in that order."""
        return ImageDataset(
            [self.sources[i] for i in idx],
            self.targets[idx],
            self.classes,
            root=self.root,
            kind=self.kind,
            transform=self.transform,
            skip_bad=self.skip_bad,
            pixels=None if self._pixels is None else self._pixels[idx],
        ).with_transform(self.transform, self.decode_target)


# ---------------------------------------------------------------------------------------------- opening


def open_dataset(
    path: str | Path, *, transform: Callable | None = None, skip_bad: bool = False, min_classes: int = 2
) -> ImageDataset:
    """Open an ImageFolder directory, a CSV manifest or an IDX pair, chosen by what `path` is."""
    p = Path(path)
    found = _stat(p, f"cannot open dataset '{path}'")
    if found is not None and stat.S_ISDIR(found.st_mode):
        kind, parts = "folder", _scan_folder(p, min_classes)
    elif found is not None and stat.S_ISREG(found.st_mode) and p.suffix.lower() == ".csv":
        kind, parts = "csv", _read_manifest(p)
    elif (images := _idx_images_file(p)) is not None:
        kind, parts = "idx", _read_idx(images)
    else:
        what = "no such file or directory" if found is None else "not a dataset"
        raise DataError(f"cannot open dataset '{path}': {what}. Expected {ACCEPTED_FORMS}.")
    sources, targets, classes, pixels = parts
    if len(classes) < min_classes:
        raise DataError(
            f"dataset '{path}' has {len(classes)} class(es) ({', '.join(classes) or 'none'}); "
            f"need at least {min_classes}"
        )
    return ImageDataset(
        sources,
        targets,
        classes,
        root=str(path),
        kind=kind,
        transform=transform,
        skip_bad=skip_bad,
        pixels=pixels,
    )


def _scan_folder(root: Path, min_classes: int) -> _Parts:
    """One sorted subfolder per class; image files found recursively, sorted, hidden entries skipped."""
    class_dirs = class_folders(root, min_classes)
    sources: list[str] = []
    targets: list[int] = []
    for label, (class_dir, files) in enumerate(zip(class_dirs, scan_images(class_dirs))):
        if not files:
            raise no_images(class_dir)
        sources += files
        targets += [label] * len(files)
    return sources, np.asarray(targets, dtype=np.int64), [d.name for d in class_dirs], None


def _read_manifest(manifest: Path) -> _Parts:
    """Rows of (path, label) or (path, labels); paths relative to the manifest's folder; every file must exist.

    A 'labels' column makes the data multi-label: each cell holds the image's labels separated by ';' (an
    empty cell: no label, all negatives), and the targets are 0/1 rows over the sorted classes.
    """
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames
            if not columns:
                raise DataError(f"manifest '{manifest}' is empty (expected a header with 'path' and 'label')")
            if "label" in columns and "labels" in columns:
                raise DataError(f"manifest '{manifest}' line 1: both a 'label' and a 'labels' column; keep 'label' "
                                f"for one class per image or 'labels' for several, not both")
            column = "labels" if "labels" in columns else "label"
            absent = [c for c in ("path", column) if c not in columns]
            if absent:
                raise DataError(
                    f"manifest '{manifest}' has no {' or '.join(repr(c) for c in absent)} column "
                    f"(columns: {', '.join(columns)})"
                )
            rows = [(reader.line_num, row.get("path"), row.get(column)) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read manifest '{manifest}': {exc}") from exc
    if not rows:
        raise DataError(f"manifest '{manifest}' has a header but no rows")
    sources, labels, missing = [], [], []
    for line, raw_path, raw_label in rows:
        rel = (raw_path or "").strip()
        label = _label_set(manifest, line, raw_label) if column == "labels" else (raw_label or "").strip()
        if not rel or label == "":
            raise DataError(f"manifest '{manifest}' line {line}: empty 'path' or 'label'")
        file = manifest.parent / rel  # an absolute `rel` replaces the folder
        if not _is_file(file, f"manifest '{manifest}' line {line}: file '{rel}'"):
            missing.append((line, rel))
        sources.append(str(file))
        labels.append(label)
    if missing:
        line, rel = missing[0]
        more = f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise DataError(f"manifest '{manifest}' line {line}: file '{rel}' does not exist{more}")
    if column == "labels":
        classes = sorted(set().union(*labels))
        index = {name: k for k, name in enumerate(classes)}
        targets = np.zeros((len(labels), len(classes)), dtype=np.int64)
        for row, names in enumerate(labels):
            targets[row, [index[n] for n in names]] = 1
        return sources, targets, classes, None
    classes = sorted(set(labels))
    index = {name: k for k, name in enumerate(classes)}
    return sources, np.asarray([index[lb] for lb in labels], dtype=np.int64), classes, None


def _label_set(manifest: Path, line: int, cell: str | None) -> tuple[str, ...]:
    """The labels of one 'labels' cell: ';'-separated names, each stripped; no quotes, none empty, none twice."""
    names = [n.strip() for n in (cell or "").split(LABEL_SEPARATOR)] if (cell or "").strip() else []
    for why, bad in (("a quote inside a label (labels cannot contain ';' or quotes)", any('"' in n for n in names)),
                     ("an empty label between two ';'", any(not n for n in names)),
                     ("a label given twice", len(set(names)) < len(names))):
        if bad:
            raise DataError(f"manifest '{manifest}' line {line}: {why}: {cell!r}")
    return tuple(names)


def _stat(path: Path, what: str) -> os.stat_result | None:
    """os.stat(path), None if nothing is there (nor can be: a name too long, a NUL, a symlink loop).

    Other refusals (a folder that may not be searched) are a DataError about `what`, where Path.is_file() would
    raise an OSError from deep inside a parser.
    """
    try:
        return path.stat()
    except ValueError:  # an embedded NUL
        return None
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP):
            return None
        raise DataError(f"{what}: {exc.strerror or exc}") from exc


def _is_file(path: Path, what: str) -> bool:
    found = _stat(path, what)
    return found is not None and stat.S_ISREG(found.st_mode)


def _idx_images_file(p: Path) -> Path | None:
    """`p` itself if it is an IDX images file, else `<p>-images-idx3-ubyte[.gz]` if one exists."""
    if "images-idx3-ubyte" in p.name and _is_file(p, f"IDX file '{p}'"):
        return p
    for suffix in IDX_SUFFIXES:
        candidate = p.with_name(p.name + suffix) if p.name else None
        if candidate is not None and _is_file(candidate, f"IDX file '{candidate}'"):
            return candidate
    return None


def _read_idx(images_file: Path) -> _Parts:
    """An IDX images/labels pair as one in-memory (n, H, W) uint8 array plus int64 labels."""
    labels_name = images_file.name.replace("images-idx3", "labels-idx1")
    plain = labels_name.removesuffix(".gz")
    candidates = [images_file.with_name(n) for n in (labels_name, plain, plain + ".gz")]  # either compression
    labels_file = next((f for f in candidates if _is_file(f, f"IDX labels file '{f}'")), None)
    if labels_file is None:
        expected = images_file.with_name(labels_name)
        raise DataError(f"IDX images file '{images_file}' has no labels file '{expected}'")
    pixels = _read_idx_array(images_file, _IDX_IMAGES_MAGIC)
    raw_labels = _read_idx_array(labels_file, _IDX_LABELS_MAGIC)
    labels = raw_labels.astype(np.int64)
    if len(pixels) != len(labels):
        raise DataError(
            f"IDX images file '{images_file}' has {len(pixels)} images but labels file '{labels_file}' "
            f"has {len(labels)} labels"
        )
    known = known_class_names(raw_labels)
    classes = _idx_class_names(images_file.with_name("classes.txt"), int(labels.max()) + 1, known)
    sources = [f"{images_file}#{i}" for i in range(len(labels))]
    return sources, labels, classes, pixels


def _read_idx_array(file: Path, magic: int) -> np.ndarray:
    """Parse one IDX file: big-endian magic and dims, then exactly prod(dims) uint8 values."""
    try:
        with gzip.open(file, "rb") if file.name.endswith(".gz") else file.open("rb") as f:
            data = f.read()
    except (OSError, EOFError, ValueError, zlib.error) as exc:  # gzip: bad header OSError, cut EOFError, bad data zlib
        raise DataError(f"cannot read IDX file '{file}': {exc}") from exc
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < 4 or int.from_bytes(data[:4], "big") != magic:
        found = f"0x{int.from_bytes(data[:4], 'big'):08x}" if len(data) >= 4 else "nothing"
        raise DataError(f"IDX file '{file}' has magic {found}; expected 0x{magic:08x}")
    if len(data) < header:
        raise DataError(f"IDX file '{file}' is truncated: header needs {header} bytes, file has {len(data)}")
    dims = tuple(int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    if 0 in dims:  # no items, or images of 0 pixels: nothing to learn from (and (2**32-1, 2**32-1, 0) can't reshape)
        raise DataError(f"IDX file '{file}' is empty: dimensions {dims}")
    expected = math.prod(dims)  # exact: np.prod wraps at 2**64, and (2**31, 2**31, 4) would "need" 0 bytes
    if len(data) - header != expected:
        raise DataError(
            f"IDX file '{file}' has {len(data) - header} data bytes; dimensions {dims} need {expected}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _idx_class_names(names_file: Path, n_labels: int, known: Sequence[str] | None = None) -> list[str]:
    """Names from `classes.txt` beside the IDX file if present, else a known set's (`known`), else "0".."n-1"."""
    if not _is_file(names_file, f"class names file '{names_file}'"):
        return list(known) if known is not None and len(known) >= n_labels else [str(k) for k in range(n_labels)]
    try:
        names = names_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read class names '{names_file}': {exc}") from exc
    while names and not names[-1].strip():
        names.pop()
    names = [n.strip() for n in names]
    if len(names) < n_labels:
        raise DataError(f"'{names_file}' lists {len(names)} class names; the labels go up to {n_labels - 1}")
    empty = [k + 1 for k, n in enumerate(names) if not n]
    twice = sorted({n for n in names if n and names.count(n) > 1})
    if empty or twice:  # every report and every match by name needs one name per class
        why = f"line {empty[0]} is empty" if empty else f"'{twice[0]}' is listed twice"
        raise DataError(f"'{names_file}': {why}; give each class one name, one per line")
    return names
