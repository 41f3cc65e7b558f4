"""Decoding images robustly (any Pillow mode to 8-bit RGB, one-line reasons for broken files) and at the size a
transform needs (`DecodeTarget`), and batching them (a collate that carries bad items as data; a thread that
decodes the next batch ahead)."""

from __future__ import annotations

import math
import queue
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import default_collate

from transferkit.errors import DataError

# How a DecodeTarget decodes, recorded in the transform description (so in the code cache's keys): JPEGs through
# libjpeg's DCT scaling (Image.draft: 1/2, 1/4 or 1/8 of the size) to the smallest scale still at least
# REDUCING_GAP times the target, then any image still that large in box-filtered integer steps (Image.reduce),
# as Pillow's own resize(reducing_gap=2) does; the transform's exact resize and crop follow. Why 2x and not 1x
# (the rule until 2026-11-27, "jpeg draft, reduce to 2x"): DCT scaling is a poorer low-pass than the resize's
# antialiasing filter, and drafting right down to the target left 12% more pixel noise, which moved the codes of
# flat-background images (upscaled Fashion-MNIST: cosine to exact 0.96 mean, 0.83 worst; 0.996 / 0.989 at 2x).
# bench/decode_fidelity.py
DECODE = "jpeg draft to 2x, reduce to 2x"
REDUCING_GAP = 2


@dataclass(frozen=True)
class DecodeTarget:
    """The least an image must keep for a transform: its shorter side (`longest`: its longer side) `side` px.

    Decoding a 12-megapixel JPEG in full to resize it to 256 px wastes ~85% of the work: this says how much
    may be skipped, for a transform whose resize maps that side to `side`.
    """

    side: int
    longest: bool = False

    def size_for(self, size: tuple[int, int], times: int = 1) -> tuple[int, int]:
        """The (width, height) an image of `size` has once its resize-defining side is `times` x `side`."""
        w, h = size
        scale = times * self.side / (max(w, h) if self.longest else min(w, h))
        return math.ceil(w * scale), math.ceil(h * scale)

    def reduce(self, img: Image.Image) -> Image.Image:
        """`img` box-reduced by the largest integer factor that keeps it REDUCING_GAP x the target (or itself)."""
        w, h = self.size_for(img.size)
        factor = min(img.width // (REDUCING_GAP * w), img.height // (REDUCING_GAP * h))
        if factor < 2 or img.mode not in ("RGB", "RGBA", "L", "LA", "RGBX", "CMYK"):
            return img
        return img.reduce(factor)


def load_image(path: str | Path, target: DecodeTarget | None = None) -> Image.Image:
    """Decode one image file to 8-bit RGB, fully loaded (img.load()), so truncated files fail here.

    With a `target`, no larger than the transform needs: a JPEG decodes at the smallest DCT scale still at
    least REDUCING_GAP x the target (never upscaled), then large images are box-reduced (DECODE); None decodes
    exactly.
    """
    try:
        with Image.open(path) as img:
            if target is not None and img.format == "JPEG":  # orientation swaps sides, not the shorter one
                img.draft("RGB", target.size_for(img.size, REDUCING_GAP))
            img.load()  # decode now: lazy decoding would report a truncated file far from its name
            upright = ImageOps.exif_transpose(img if target is None else target.reduce(img))  # a new image
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


def collate(
    batch: Sequence[tuple[torch.Tensor | None, int, int, str]],
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, list[tuple[int, str]]]:
    """DataLoader collate_fn that drops bad items: (x, y, idx, [(index, message), ...])."""
    good = [item for item in batch if item[0] is not None]
    bad = [(int(i), msg) for x, _, i, msg in batch if x is None]
    x = default_collate([item[0] for item in good]) if good else None
    y = torch.as_tensor(np.asarray([item[1] for item in good], dtype=np.int64))  # (n,) or (n, classes): multi-label
    idx = torch.tensor([item[2] for item in good], dtype=torch.int64)
    return x, y, idx, bad


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


def threaded_batches(dataset, batches: Iterable[Sequence[int]], threads: int, depth: int = 2) -> Iterator:
    """Collated batches of `dataset` (one list of indices each), in order, decoded by `threads` threads.

    Why threads: Pillow releases the GIL while it decodes and resizes, so two threads decode two photos at
    once without a worker process's start-up and tensor pickling. Up to `depth` batches are decoded ahead of
    the consumer; an item's exception is raised here, and leaving early cancels what is queued.
    """
    pool = ThreadPoolExecutor(threads, thread_name_prefix="transferkit-decode")
    pending: deque = deque()
    todo = iter(batches)
    try:
        for b in todo:
            pending.append([pool.submit(dataset.__getitem__, i) for i in b])
            if len(pending) > depth:
                yield collate([f.result() for f in pending.popleft()])
        while pending:
            yield collate([f.result() for f in pending.popleft()])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
