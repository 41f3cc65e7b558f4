"""Pretrained backbones: timm models with offline weight resolution, and their named layers."""

from __future__ import annotations

import difflib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from transferkit.errors import ModelError, WeightsError
from transferkit.models.params import DEFAULT_MODEL, PRE_LOGITS
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


@dataclass(frozen=True)
class Layer:
    """A place in the network whose activations can serve as CNN codes."""

    name: str  # timm module name ("blocks.4") or "pre_logits"
    index: int | None  # index into model.feature_info; None for pre_logits
    channels: int
    reduction: int  # input pixels per feature-map cell along one side


def check_model_name(name: str) -> None:
    """Fail early, with the closest names, on a model timm does not know."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else " See `timm.list_models()`."
        raise ModelError(f"unknown model '{name}'.{hint}")


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


def model_layers(model: nn.Module) -> list[Layer]:
    """The stages timm reports in `feature_info`, then the pooled pre-logits features."""
    info = model.feature_info
    dicts = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
    layers = [Layer(d["module"], i, d["num_chs"], d["reduction"]) for i, d in enumerate(dicts)]
    last = layers[-1].reduction if layers else 32
    return [*layers, Layer(PRE_LOGITS, None, model.num_features, last)]


def resolve_layers(model: nn.Module, spec: str | int) -> list[Layer]:
    """Parse a --layer value: a stage index, a timm module name, 'pre_logits', 'all', or a comma list."""
    layers = model_layers(model)
    text = str(spec).strip()
    if "," in text:
        chosen = {la.name: la for part in text.split(",") for la in resolve_layers(model, part)}
        return [la for la in layers if la.name in chosen]  # network order, no repeats
    if text == "all":
        return layers
    if text.replace("_", "-") == "pre-logits":
        return [layers[-1]]
    stages = layers[:-1]
    if text.lstrip("-").isdigit():
        i = int(text)
        if -len(stages) <= i < len(stages):
            return [stages[i]]
    for layer in stages:
        if text == layer.name:
            return [layer]
    choices = ", ".join(f"{i} ({s.name})" for i, s in enumerate(stages))
    raise ModelError(
        f"unknown layer '{spec}' for {model.pretrained_cfg.get('architecture', 'this model')}; "
        f"choose a stage index or name: {choices}; or pre_logits, all"
    )


def layer_table(model: nn.Module) -> str:
    """Human-readable list of the layers --layer accepts."""
    rows = [f"{'index':>5}  {'layer':<12} {'channels':>8} {'stride':>6}"]
    for layer in model_layers(model):
        idx = "" if layer.index is None else str(layer.index)
        rows.append(f"{idx:>5}  {layer.name:<12} {layer.channels:>8} {layer.reduction:>6}")
    return "\n".join(rows)
