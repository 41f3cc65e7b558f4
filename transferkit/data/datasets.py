"""Datasets of labelled images (ImageFolder, CSV manifest, IDX), robust decoding, model-config transforms."""

from __future__ import annotations

import copy
import csv
import errno
import gzip
import logging
import math
import os
import queue
import stat
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, default_collate

from transferkit.data.hashing import content_hash
from transferkit.data.params import IMAGE_SIZE
from transferkit.errors import DataError
from transferkit.runtime.params import validate

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

_ACCEPTED_FORMS = (
    "an ImageFolder directory (one subfolder of images per class), a CSV manifest with 'path' and "
    "'label' columns, or IDX files ('<prefix>-images-idx3-ubyte[.gz]' beside the matching labels file)"
)
_Parts = tuple[list[str], np.ndarray, list[str], np.ndarray | None]  # sources, targets, classes, pixels
_IDX_IMAGES_MAGIC = 0x00000803  # uint8, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # uint8, 1 dimension
# What timm.data.create_transform assumes when a key is absent, so the description matches the transform.
_CONFIG_DEFAULTS: dict[str, Any] = {
    "input_size": (3, 224, 224),
    "interpolation": "bilinear",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.875,
    "crop_mode": "center",
}


# ---------------------------------------------------------------------------------------------- decoding


def load_image(path: str | Path) -> Image.Image:
    """Decode one image file to 8-bit RGB, fully loaded (img.load()), so truncated files fail here."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now: lazy decoding would report a truncated file far from its name
            upright = ImageOps.exif_transpose(img)  # a new image, independent of the open file
        return _to_rgb(upright)
    except Exception as exc:  # Pillow plugins raise many types for broken files; all mean "bad image"
        raise DataError(f"cannot read image '{path}': {_why(exc)}") from exc


def _why(exc: Exception) -> str:
    """One-line reason for a decoding failure, worded for the person who owns the file."""
    if isinstance(exc, FileNotFoundError):
        return "file does not exist"
    if isinstance(exc, IsADirectoryError):
        return "it is a directory"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image, or a format Pillow cannot read"
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, Image.DecompressionBombError):
        return f"image too large ({text})"
    if isinstance(exc, EOFError) or "truncated" in text.lower():
        return f"truncated file ({text})"
    return f"corrupt or unsupported image ({type(exc).__name__}: {text})"


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; high-bit-depth data is rescaled, transparency goes on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return _gray_to_rgb(_scale_int(np.asarray(img)))
    if img.mode == "F":
        return _gray_to_rgb(_scale_float(np.asarray(img, dtype=np.float64)))
    if img.mode == "RGB" and not img.has_transparency_data:
        return img
    if img.has_transparency_data or img.mode in ("PA", "La", "RGBa"):
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX


def _scale_int(values: np.ndarray) -> np.ndarray:
    """Integer samples to uint8 by their bit range: 16-bit data >> 8 (clipping would saturate most pixels)."""
    values = values.astype(np.int64)
    lo, hi = int(values.min(initial=0)), int(values.max(initial=0))
    if lo >= 0 and hi <= 0xFFFF:
        return (values >> 8).astype(np.uint8)
    # 32-bit data has no conventional white level: stretch its own range instead.
    return ((values - lo) * 255 // max(hi - lo, 1)).astype(np.uint8)


def _scale_float(values: np.ndarray) -> np.ndarray:
    """Float samples to uint8: 0..1 if the maximum is at most 1, else 0..255; NaN becomes black."""
    values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
    scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
    return np.rint(np.clip(values * scale, 0.0, 255.0)).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(gray).convert("RGB")


# ---------------------------------------------------------------------------------------------- dataset


class ImageDataset(Dataset):
    """Labelled images from an ImageFolder tree, a CSV manifest or IDX files."""

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

    def __len__(self) -> int:
        return len(self.sources)

    def __repr__(self) -> str:
        return (
            f"ImageDataset(kind={self.kind!r}, root={self.root!r}, n={len(self)}, "
            f"classes={len(self.classes)})"
        )

    def image(self, i: int) -> Image.Image:
        """The RGB image of item `i`, before any transform."""
        if self._pixels is not None:
            return Image.fromarray(self._pixels[i]).convert("RGB")
        return load_image(self.sources[i])

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
        label = int(self.targets[i])
        try:
            img = self.image(i)
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
        order = np.argsort(self.targets, kind="stable")  # grouped by class, file order within each
        grouped = self.targets[order]
        rank = np.arange(len(order)) - np.searchsorted(grouped, grouped, side="left")
        return self.select(np.sort(order[rank < per_class]))

    def with_transform(self, transform: Callable | None) -> ImageDataset:
        """A shallow copy that applies `transform` instead (e.g. train vs eval preprocessing)."""
        other = copy.copy(self)
        other.transform = transform
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
        )


def collate(
    batch: Sequence[tuple[torch.Tensor | None, int, int, str]],
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, list[tuple[int, str]]]:
    """DataLoader collate_fn that drops bad items: (x, y, idx, [(index, message), ...])."""
    good = [item for item in batch if item[0] is not None]
    bad = [(int(i), msg) for x, _, i, msg in batch if x is None]
    x = default_collate([item[0] for item in good]) if good else None
    y = torch.tensor([item[1] for item in good], dtype=torch.int64)
    idx = torch.tensor([item[2] for item in good], dtype=torch.int64)
    return x, y, idx, bad


# ---------------------------------------------------------------------------------------------- opening


def decode_ahead(batches: Iterable, depth: int = 2) -> Iterator:
    """The items of `batches`, produced by a background thread up to `depth` ahead of the consumer.

    Why: decoding (PIL, torch) and ONNX Runtime release the GIL, so the next batch is decoded while the model
    runs the current one, without the process start-up and tensor pickling of a DataLoader worker. An
    exception in the thread is raised here; closing the generator early stops the thread.
    """
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop, end = threading.Event(), object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not put((batch, None)):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put((end, exc))
            return
        put((end, None))

    thread = threading.Thread(target=produce, name="transferkit-decode", daemon=True)
    thread.start()
    try:
        while True:
            batch, exc = items.get()
            if batch is end:
                if exc is not None:
                    raise exc
                return
            yield batch
    finally:
        stop.set()
        thread.join()


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
        raise DataError(f"cannot open dataset '{path}': {what}. Expected {_ACCEPTED_FORMS}.")
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
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(class_dirs) < min_classes:
        raise DataError(
            f"dataset folder '{root}' has {len(class_dirs)} class folder(s); need at least {min_classes} "
            f"(one subfolder of images per class)"
        )
    sources: list[str] = []
    targets: list[int] = []
    for label, (class_dir, files) in enumerate(zip(class_dirs, scan_images(class_dirs))):
        if not files:
            raise DataError(f"class folder '{class_dir}' has no images ({', '.join(IMAGE_EXTENSIONS)})")
        sources += files
        targets += [label] * len(files)
    return sources, np.asarray(targets, dtype=np.int64), [d.name for d in class_dirs], None


def scan_images(folders: Sequence[Path]) -> list[list[str]]:
    """The image files under each of `folders`: recursive, sorted, hidden entries skipped, symlinks followed.

    Each directory is walked once: a symlink to an ancestor, to one of `folders`, or to a directory already
    walked is not followed (`ln -s .. odd/up` would list the whole tree again and again, under the wrong class).
    A file reached twice under one folder (a symlink beside its target, a hard link) is listed once. One
    warning counts what was skipped.
    """
    walked = {key for folder in folders for key in map(_identity, (folder, *Path(folder).resolve().parents))}
    loops: list[str] = []
    repeats: list[str] = []
    out = [sorted(_walk_once(folder, walked, loops, repeats)) for folder in folders]
    if loops or repeats:
        log.warning(
            "listed each image once: skipped %d folder link(s) to an ancestor or a folder already scanned%s and "
            "%d file(s) reached twice%s", len(loops), f" (e.g. '{loops[0]}')" if loops else "", len(repeats),
            f" (e.g. '{repeats[0]}')" if repeats else "")
    return out


def _walk_once(folder: Path, walked: set, loops: list[str], repeats: list[str]) -> list[str]:
    """scan_images for one folder: adds to `walked` (directory identities) and to the skipped `loops`/`repeats`."""
    found: list[str] = []
    seen: set[tuple[int, int] | None] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        keep = []
        for name in sorted(d for d in dirnames if not d.startswith(".")):  # sorted: the same link wins every time
            key = _identity(os.path.join(dirpath, name))
            if key is not None and key in walked:
                loops.append(os.path.join(dirpath, name))
                continue
            walked.add(key)
            keep.append(name)
        dirnames[:] = keep  # os.walk descends into these only
        for name in sorted(filenames):
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(dirpath, name)
            key = _identity(path)  # None (a broken link): listed, and decoding says what is wrong
            if key is not None and key in seen:
                repeats.append(path)
                continue
            seen.add(key)
            found.append(path)
    return found


def _identity(path: str | Path) -> tuple[int, int] | None:
    """(device, inode) of what `path` leads to, following symlinks; None if it cannot be reached."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _read_manifest(manifest: Path) -> _Parts:
    """Rows of (path, label); paths relative to the manifest's folder; every file must exist."""
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames
            if not columns:
                raise DataError(f"manifest '{manifest}' is empty (expected a header with 'path' and 'label')")
            absent = [c for c in ("path", "label") if c not in columns]
            if absent:
                raise DataError(
                    f"manifest '{manifest}' has no {' or '.join(repr(c) for c in absent)} column "
                    f"(columns: {', '.join(columns)})"
                )
            rows = [(reader.line_num, row.get("path"), row.get("label")) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read manifest '{manifest}': {exc}") from exc
    if not rows:
        raise DataError(f"manifest '{manifest}' has a header but no rows")
    sources, labels, missing = [], [], []
    for line, raw_path, raw_label in rows:
        rel, label = (raw_path or "").strip(), (raw_label or "").strip()
        if not rel or not label:
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
    classes = sorted(set(labels))
    index = {name: k for k, name in enumerate(classes)}
    return sources, np.asarray([index[lb] for lb in labels], dtype=np.int64), classes, None


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
    for suffix in ("-images-idx3-ubyte", "-images-idx3-ubyte.gz"):
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
    labels = _read_idx_array(labels_file, _IDX_LABELS_MAGIC).astype(np.int64)
    if len(pixels) != len(labels):
        raise DataError(
            f"IDX images file '{images_file}' has {len(pixels)} images but labels file '{labels_file}' "
            f"has {len(labels)} labels"
        )
    classes = _idx_class_names(images_file.with_name("classes.txt"), int(labels.max()) + 1)
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


def _idx_class_names(names_file: Path, n_labels: int) -> list[str]:
    """Names from `classes.txt` beside the IDX file if present, else "0".."n-1"."""
    if not _is_file(names_file, f"class names file '{names_file}'"):
        return [str(k) for k in range(n_labels)]
    try:
        names = names_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read class names '{names_file}': {exc}") from exc
    while names and not names[-1].strip():
        names.pop()
    names = [n.strip() for n in names]
    if len(names) < n_labels:
        raise DataError(f"'{names_file}' lists {len(names)} class names; the labels go up to {n_labels - 1}")
    return names


# ---------------------------------------------------------------------------------------------- transforms


def _effective_config(data_config: dict, image_size: int | None) -> dict[str, Any]:
    """The six preprocessing keys, with timm's defaults filled in and the image_size override applied."""
    cfg = {key: data_config.get(key, default) for key, default in _CONFIG_DEFAULTS.items()}
    cfg = {key: _CONFIG_DEFAULTS[key] if value is None else value for key, value in cfg.items()}
    if isinstance(cfg["input_size"], int):
        cfg["input_size"] = (3, cfg["input_size"], cfg["input_size"])
    if image_size is not None:
        validate({"image_size": IMAGE_SIZE}, {"image_size": image_size}, "build_transform", error=DataError)
        # Resize the whole image: small centred subjects (Fashion-MNIST) must not lose their edges.
        cfg["input_size"] = (3, image_size, image_size)
        cfg["crop_pct"] = 1.0
    return cfg


def build_transform(data_config: dict, image_size: int | None = None, train: bool = False, uint8: bool = False,
                    **augment) -> Callable:
    """Preprocessing matching the backbone's pretrained config (timm's eval or training transform).

    `augment` goes to timm's create_transform when `train` (scale, hflip, color_jitter, re_prob ...).
    `uint8` stops before scaling and normalising (timm's prefetcher form: a (3, H, W) uint8 tensor), so a
    batch can be normalised at once (FeatureExtractor.normalize) instead of image by image.
    """
    from timm.data import create_transform  # timm is heavy; only pay for it when building transforms

    return create_transform(**_effective_config(data_config, image_size), is_training=train,
                            use_prefetcher=uint8, **(augment if train else {}))


def describe_transform(data_config: dict, image_size: int | None = None) -> dict:
    """JSON-serialisable effective preprocessing, recorded beside extracted features."""
    cfg = _effective_config(data_config, image_size)
    return {
        "input_size": [int(v) for v in cfg["input_size"]],
        "interpolation": str(cfg["interpolation"]),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "crop_pct": float(cfg["crop_pct"]),
        "crop_mode": str(cfg["crop_mode"]),
    }
