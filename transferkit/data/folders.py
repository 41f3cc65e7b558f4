"""ImageFolder trees: class folders and the image files under them (symlink loops and all). Light (no torch,
no numpy), so the CLI refuses an empty or one-class DATA folder in a fraction of a second, with the words
`open_dataset` would use."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from transferkit.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def class_folders(root: Path, min_classes: int) -> list[Path]:
    """The class subfolders of `root`, sorted, hidden ones skipped; at least `min_classes` of them."""
    try:
        found = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    except OSError as exc:  # a folder that may not be read: the user's to fix, in one line
        raise DataError(f"cannot list dataset folder '{root}': {exc.strerror or exc}") from exc
    if len(found) < min_classes:
        raise DataError(
            f"dataset folder '{root}' has {len(found)} class folder(s); need at least {min_classes} "
            f"(one subfolder of images per class)"
        )
    return found


def no_images(folder: Path, *, what: str = "class folder") -> DataError:
    """The error for a folder in which scan_images finds nothing."""
    return DataError(f"{what} '{folder}' has no images ({', '.join(IMAGE_EXTENSIONS)})")


def check_folder(root: Path, min_classes: int = 2) -> None:
    """Raise what `open_dataset` would about `root`'s class folders (too few, one without images), stopping at the
    first image of each class instead of listing them all."""
    folders = class_folders(root, min_classes)
    walked = _starts(folders)
    for folder in folders:
        if next(_walk_images(folder, walked, [], []), None) is None:
            raise no_images(folder)


def scan_images(folders: Sequence[Path]) -> list[list[str]]:
    """The image files under each of `folders`: recursive, sorted, hidden entries skipped, symlinks followed.

    Each directory is walked once: a symlink to an ancestor, to one of `folders`, or to a directory already
    walked is not followed (`ln -s .. odd/up` would list the whole tree again and again, under the wrong class).
    A file reached twice under one folder (a symlink beside its target, a hard link) is listed once. One
    warning counts what was skipped.
    """
    walked = _starts(folders)
    loops: list[str] = []
    repeats: list[str] = []
    out = [sorted(_walk_images(folder, walked, loops, repeats)) for folder in folders]
    if loops or repeats:
        log.warning(
            "listed each image once: skipped %d folder link(s) to an ancestor or a folder already scanned%s and "
            "%d file(s) reached twice%s", len(loops), f" (e.g. '{loops[0]}')" if loops else "", len(repeats),
            f" (e.g. '{repeats[0]}')" if repeats else "")
    return out


def _starts(folders: Sequence[Path]) -> set:
    """The directories no walk may enter again: the folders themselves and their ancestors."""
    return {key for folder in folders for key in map(_identity, (folder, *Path(folder).resolve().parents))}


def _walk_images(folder: Path, walked: set, loops: list[str], repeats: list[str]) -> Iterator[str]:
    """The image files under one folder, as found: adds to `walked` (directory identities) and to the skipped
    `loops`/`repeats`."""
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
            yield path


def _identity(path: str | Path) -> tuple[int, int] | None:
    """(device, inode) of what `path` leads to, following symlinks; None if it cannot be reached."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino
