"""Pooling a layer's activations into codes: the pool names (parse_pools), what each does (pool_map), and the
codes of a batch for every (layer, pool) pair (compute_codes)."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from transferkit.codes.spec import key_name
from transferkit.errors import ModelError, ParameterError
from transferkit.models.backbones import PRE_LOGITS
from transferkit.models.layers import Layer, forward_layers

log = logging.getLogger(__name__)

# timm's names and meanings: 'avgmax' is the mean of avg and max, 'catavgmax' their concatenation; plus grids
# "NxN" that keep location
POOLS = ("avg", "max", "avgmax", "catavgmax")
# 'all': avgmax is left out, a linear probe on catavgmax can weigh avg and max as it likes (avgmax among them)
ALL_POOLS = ("avg", "max", "catavgmax", "2x2", "4x4")
# Files written before transferkit followed timm's names (codes directories of format 1, probes of format 1)
# say 'avgmax' for the concatenation: their readers map the old names with this
RENAMED = {"avgmax": "catavgmax"}
POOL_NAMES = "timm"  # saved probes record it (their 'pool_names'); one without it is older and uses RENAMED
_GRID = re.compile(r"^(?:grid)?(\d)(?:x(\d))?$", re.ASCII)  # ASCII: int() would take '٣' for 3


def parse_pools(spec: str | Sequence[str]) -> list[str]:
    """Validate a pool list: 'avg', 'max', 'avgmax', 'catavgmax' (alias 'avg+max'), a grid 'NxN' (N <= 8),
    comma lists, 'all'."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    pools: list[str] = []
    for item in (p.strip().lower() for p in items):
        if item == "all":
            pools += ALL_POOLS
            continue
        item = "catavgmax" if item in ("avg+max", "avg-max") else item
        grid = _GRID.match(item)
        if grid and (grid.group(2) is None or grid.group(1) == grid.group(2)) and 1 <= int(grid.group(1)) <= 8:
            item = f"{grid.group(1)}x{grid.group(1)}"
        elif item not in POOLS:
            raise ParameterError(
                "The 'pool' parameter must be one of 'avg', 'max', 'avgmax', 'catavgmax', a grid such as '2x2', "
                f"or 'all'. "
                f"Got '{item}' instead.", param="pool",
            )
        pools.append(item)
    return list(dict.fromkeys(pools))


def grid_size(pool: str) -> int:
    """N for an 'NxN' grid pool, 0 for the global pools."""
    return int(pool.split("x")[0]) if pool[0].isdigit() else 0


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
