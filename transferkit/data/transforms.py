"""Preprocessing that matches a backbone's pretrained config (timm's transforms), and its JSON description,
recorded beside every set of codes so that two sets can be compared."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from transferkit.data.decode import DECODE, DecodeTarget
from transferkit.data.params import IMAGE_SIZE
from transferkit.errors import DataError
from transferkit.runtime.params import validate

# What timm.data.create_transform assumes when a key is absent, so the description matches the transform.
_CONFIG_DEFAULTS: dict[str, Any] = {
    "input_size": (3, 224, 224),
    "interpolation": "bilinear",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.875,
    "crop_mode": "center",
}
MIRROR = "mirror"  # a description's key for the horizontal mirror image; present (True) only when mirrored
# a description's key for copy k >= 1 of the randomly shifted (and half of them mirrored) images; present only then
SHIFT_COPY = "shift_copy"
SHIFT_MAX = 0.1  # a copy's shift, each way, at most this share of the image's side (3 pixels of Fashion-MNIST's 28)


def hflip(x):
    """The horizontal mirror of an image tensor (..., H, W): the one flip of training's augmentation twin, the
    mirrored codes (`build_transform(mirror)`) and test-time augmentation (finetune's evaluate --tta)."""
    return x.flip(-1)


class ShiftCopy:
    """Copy `copy` of an image: shifted by up to `SHIFT_MAX` of its side each way (edge pixels repeated into the
    gap) and mirrored half of the time, at random, as augmented training codes need (`LinearProbe.refit` on
    several copies of each image, `train_probe(augment=...)`).

    The draw is a function of the copy number and the image's pixels alone, not of where the image sits in a
    dataset, so the codes of a copy can be cached like any other (the description's `shift_copy` keys them).
    """

    def __init__(self, copy: int) -> None:
        self.copy = copy

    def __call__(self, img: Image.Image) -> Image.Image:
        a = np.asarray(img)
        rng = np.random.default_rng([self.copy, zlib.crc32(a.tobytes())])
        (fy, fx), mirror = rng.uniform(-SHIFT_MAX, SHIFT_MAX, 2), rng.random() < 0.5
        h, w = a.shape[:2]
        rows = np.clip(np.arange(h) - round(fy * h), 0, h - 1)
        cols = np.clip(np.arange(w) - round(fx * w), 0, w - 1)
        return Image.fromarray(np.ascontiguousarray(a[rows][:, cols[::-1] if mirror else cols]), img.mode)

    def __repr__(self) -> str:
        return f"ShiftCopy(copy={self.copy})"


def shift_copy(config: dict) -> int:
    """Which shifted copy a data config (the number) or transform description (`{"copy": k, ...}`) makes; 0:
    the images themselves."""
    value = config.get(SHIFT_COPY) or 0
    return int(value["copy"] if isinstance(value, dict) else value)


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

    A config (or description) with `mirror` True ends the eval transform with the horizontal flip (`hflip`), and
    one with `shift_copy` k starts it with `ShiftCopy(k)`, so the codes of mirror images and of shifted copies are
    keyed apart in the code cache (describe_transform records it).

    `augment` goes to timm's create_transform when `train` (scale, hflip, color_jitter, re_prob ...).
    `uint8` stops before scaling and normalising (timm's prefetcher form: a (3, H, W) uint8 tensor), so a
    batch can be normalised at once (FeatureExtractor.normalize) instead of image by image.
    """
    from timm.data import create_transform  # timm is heavy; only pay for it when building transforms
    from torchvision.transforms import Compose

    transform = create_transform(**_effective_config(data_config, image_size), is_training=train,
                                 use_prefetcher=uint8, **(augment if train else {}))
    if train:
        return transform
    if data_config.get(SHIFT_COPY):
        transform = Compose([ShiftCopy(shift_copy(data_config)), transform])
    return Compose([transform, hflip]) if data_config.get(MIRROR) else transform


def decode_target(data_config: dict, image_size: int | None = None) -> DecodeTarget:
    """How small an image may be decoded for the eval transform: the side its resize maps to `floor(size /
    crop_pct)` (timm's transforms_imagenet_eval), the shorter one, or the longer in crop mode 'border'."""
    cfg = _effective_config(data_config, image_size)
    side = math.floor(max(cfg["input_size"][1:]) / cfg["crop_pct"])
    return DecodeTarget(side, longest=cfg["crop_mode"] == "border")


def describe_transform(data_config: dict, image_size: int | None = None, *, exact_decode: bool = True) -> dict:
    """JSON-serialisable effective preprocessing, recorded beside extracted codes; decoding at the size needed
    (`exact_decode` False) adds how (decode.DECODE), so exact decoding keeps the description it always had."""
    cfg = _effective_config(data_config, image_size)
    description = {
        "input_size": [int(v) for v in cfg["input_size"]],
        "interpolation": str(cfg["interpolation"]),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "crop_pct": float(cfg["crop_pct"]),
        "crop_mode": str(cfg["crop_mode"]),
    }
    if not exact_decode:
        description["decode"] = DECODE
    if data_config.get(MIRROR):  # absent when not mirrored: the descriptions (and cache ids) of all other codes
        description[MIRROR] = True
    if data_config.get(SHIFT_COPY):  # absent for the images themselves, as MIRROR
        description[SHIFT_COPY] = {"copy": shift_copy(data_config), "max": SHIFT_MAX}
    return description
