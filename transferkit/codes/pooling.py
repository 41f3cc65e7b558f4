"""Pooling a layer's activations into codes: what each pool does (pool_map; the names are parsed in
codes.params), and the codes of a batch for every (layer, pool) pair (compute_codes)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from transferkit.codes.params import grid_size
from transferkit.codes.spec import key_name
from transferkit.errors import ModelError
from transferkit.models.layers import Layer, forward_layers
from transferkit.models.params import PRE_LOGITS

log = logging.getLogger(__name__)

def pool_map(x: torch.Tensor, pool: str) -> torch.Tensor:
    """Pool a feature map (B, C, H, W) -> (B, D); a grid keeps a coarse layout of where things are."""
    if pool == "avg":
        return x.mean((2, 3))
    if pool == "max":
        return x.amax((2, 3))
    if pool == "avgmax":  # as timm's adaptive_avgmax_pool2d
        return 0.5 * (x.mean((2, 3)) + x.amax((2, 3)))
    if pool == "catavgmax":
        return torch.cat([x.mean((2, 3)), x.amax((2, 3))], dim=1)
    return F.adaptive_avg_pool2d(x, grid_size(pool)).flatten(1)  # (B, C, n, n) -> (B, C*n*n), channel-major


def pooled_dim(layer: Layer, pool: str) -> int:
    """Width of the codes one (layer, pool) pair produces."""
    if pool == "catavgmax":
        return 2 * layer.channels
    if grid_size(pool):
        return layer.channels * grid_size(pool) ** 2
    return layer.channels


def compute_codes(model: nn.Module, x: torch.Tensor, pairs: Sequence[tuple[Layer, str]]) -> dict[str, torch.Tensor]:
    """One forward pass -> {'layer|pool': (B, D)} for every requested (layer, pool) pair.

    Stage maps come from transferkit.models.layers.forward_layers (timm's `forward_intermediates` for its
    feature_info stages); pre_logits with 'avg' is timm's own `forward_head(pre_logits=True)`, other pools pool
    the final feature map.
    """
    want_final = any(la.name == PRE_LOGITS for la, _ in pairs)
    final, maps = forward_layers(model, x, list(dict.fromkeys(la for la, _ in pairs)), want_final)
    codes: dict[str, torch.Tensor] = {}
    for layer, pool in pairs:
        if layer.name == PRE_LOGITS and pool == "avg":
            codes[key_name(layer.name, pool)] = model.forward_head(final, pre_logits=True)
        else:
            codes[key_name(layer.name, pool)] = pool_map(final if layer.name == PRE_LOGITS else maps[layer.name], pool)
    return {k: v.float() for k, v in codes.items()}


def select_pairs(layers: Sequence[Layer], pools: Sequence[str], side: int) -> list[tuple[Layer, str]]:
    """Every (layer, pool) pair, minus grids finer than the layer's feature map at this input size.

    A 4x4 grid over a 2x2 map only repeats values: it adds width, not information.
    """
    pairs = [(la, p) for la in layers for p in pools if grid_size(p) <= math.ceil(side / la.reduction)]
    dropped = [key_name(la.name, p) for la in layers for p in pools if (la, p) not in pairs]
    if not pairs:
        raise ModelError(f"grid pooling {', '.join(pools)} is finer than the feature map of {dropped[0].split('|')[0]} "
                         f"at input size {side}; use a coarser grid or a larger image_size")
    if dropped:
        log.info("input %dpx: skipping grids finer than their feature map: %s", side, ", ".join(dropped))
    return pairs
