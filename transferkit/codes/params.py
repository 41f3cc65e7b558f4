"""The FeatureExtractor's parameter limits, as plain data (transferkit.runtime.params): its
`_parameter_constraints`, the CLI's choices and the recipe validator all read this table. Light: no torch,
no sklearn, so `transferkit --help` stays fast."""

from __future__ import annotations

import re
from collections.abc import Sequence
from numbers import Integral
from os import PathLike

from transferkit.data.params import IMAGE_SIZE
from transferkit.errors import ParameterError
from transferkit.runtime.params import PRECISIONS, Interval, StrOptions

ENGINES = ("auto", "torch", "onnxruntime")
BATCH_SIZE = [Interval(Integral, 1, None, closed="left")]
NUM_WORKERS = [Interval(Integral, 0, None, closed="left")]

EXTRACTOR = {
    "model": [str],
    "weights": [str, PathLike],  # 'auto', 'package', 'hub', 'random' or a weights file
    "layer": [str, Integral, list, tuple],  # resolved against the network in fit
    "pool": [str, list, tuple],  # parsed by parse_pools: 'avg', 'max', '[cat]avgmax', 'NxN', lists, 'all'
    "image_size": IMAGE_SIZE,
    "batch_size": BATCH_SIZE,
    "precision": [StrOptions(PRECISIONS)],
    "num_workers": NUM_WORKERS,
    "fold_bn": ["boolean"],
    "engine": [StrOptions(ENGINES)],
    "exact_decode": ["boolean"],
    "decode_threads": [Interval(Integral, 1, None, closed="left"), None],  # None: measured per run
    "progress": ["boolean"],
    "mirror": ["boolean"],
}

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
