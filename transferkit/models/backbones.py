"""Pretrained backbones: timm models with offline weight resolution (their layers: transferkit.models.layers)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from transferkit.errors import WeightsError
from transferkit.models.params import DEFAULT_MODEL
from transferkit.models.vocabulary import unknown_model
from transferkit.models.weights import match_state_dict, resolve_weights, state_dict_sha256

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class WeightsInfo:
    """Which weights a backbone carries, kept in every output so results can be traced."""

    source: str  # "file", "package", "hub" or "random"
    location: str | None
    sha256: str  # content hash of the loaded tensors (transferkit.models.weights.state_dict_sha256)

    def to_dict(self) -> dict:
        return asdict(self)


def check_model_name(name: str) -> None:
    """Fail early, with the closest names, on a model timm does not know."""
    if not timm.is_model(name):
        raise unknown_model(name, timm.list_models())


def create_backbone(name: str = DEFAULT_MODEL, weights: str | Path = "auto", **kwargs) -> nn.Module:
    """A timm model in eval mode with pretrained weights resolved offline-first.

    `weights`: a file (.safetensors, .pth, .pt), "auto" (installed package, then timm's hub),
    "package", "hub", or "random" (the only way to get untrained weights). The result carries
    `weights_info` (source, location, sha256). Extra kwargs go to `timm.create_model`.
    """
    check_model_name(name)
    resolved = resolve_weights(name, weights)
    if resolved.source == "hub":
        model = _from_hub(name, resolved.tried, **kwargs)
    else:
        seeded = resolved.source == "random"  # 'random' weights are the same on every call: fit twice, same codes
        with torch.random.fork_rng(devices=[], enabled=seeded):  # the caller's RNG is left as it was
            if seeded:
                torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False, **kwargs)
        if resolved.state_dict is not None:
            origin = f"'{resolved.location}'"
            state = match_state_dict(resolved.state_dict, model, origin)
            model.load_state_dict(state)
    if resolved.mean is not None:
        model.pretrained_cfg = {**model.pretrained_cfg, "mean": resolved.mean, "std": resolved.std}
    if resolved.source == "random":
        log.warning("%s: random weights (asked for with weights='random')", name)
    sha = state_dict_sha256(model)
    model.weights_info = WeightsInfo(resolved.source, resolved.location, sha)
    log.info("%s: weights from %s %s (sha256 %s)", name, resolved.source, resolved.location or "", sha[:12])
    return model.eval()


def _from_hub(name: str, tried: list[str], **kwargs) -> nn.Module:
    """timm's own download; cannot succeed without network, so its failure lists everything tried."""
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:
        tried = [*tried, f"timm hub download failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})"]
        raise WeightsError(
            f"no pretrained weights found for '{name}': " + "; ".join(tried)
            + ". Set the 'weights' parameter to a file, or to 'random' to start from random weights."
        ) from e
