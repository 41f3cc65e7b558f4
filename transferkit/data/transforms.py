"""Preprocessing that matches a backbone's pretrained config (timm's transforms), and its JSON description,
recorded beside every set of codes so that two sets can be compared."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

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


def hflip(x):
    """The horizontal mirror of an image tensor (..., H, W): the one flip of training's augmentation twin, the
    mirrored codes (`build_transform(mirror)`) and test-time augmentation (finetune's evaluate --tta)."""
    return x.flip(-1)


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

    A config (or description) with `mirror` True ends the eval transform with the horizontal flip (`hflip`), so
    the codes of mirror images are keyed apart in the code cache (describe_transform records it).

    `augment` goes to timm's create_transform when `train` (scale, hflip, color_jitter, re_prob ...).
    `uint8` stops before scaling and normalising (timm's prefetcher form: a (3, H, W) uint8 tensor), so a
    batch can be normalised at once (FeatureExtractor.normalize) instead of image by image.
    """
    from timm.data import create_transform  # timm is heavy; only pay for it when building transforms
    from torchvision.transforms import Compose

    transform = create_transform(**_effective_config(data_config, image_size), is_training=train,
                                 use_prefetcher=uint8, **(augment if train else {}))
    return Compose([transform, hflip]) if data_config.get(MIRROR) and not train else transform


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
    return description
