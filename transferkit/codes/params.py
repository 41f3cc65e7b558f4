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
    "views": [str, list, tuple, None],  # parsed by parse_views: 'layer|pool,layer|pool' (then not layer/pool)
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
    "shift_copy": [Interval(Integral, 0, None, closed="left")],  # 0: the images; k: transforms.ShiftCopy(k)
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
COMBINED = "+"  # joins the views of a combination in its key: 'blocks.4|catavgmax+blocks.0|4x4'
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


def view_keys(key: str) -> list[str]:
    """The single-view 'layer|pool' keys a key names: its views for a combination, else itself."""
    return key.split(COMBINED)


def parse_views(spec: str | Sequence[str | Sequence[str]]) -> list[tuple[str, str]]:
    """Validate a combination of views: 'blocks.2|4x4,blocks.4|catavgmax' (as feature files name codes, also
    joined by '+'), or a list of such strings or of (layer, pool) pairs -> [(layer, pool), ...], pools
    normalised as parse_pools does. The layers are checked against the network when the extractor is fitted."""
    items = spec.replace("+", ",").split(",") if isinstance(spec, str) else list(spec)
    views: list[tuple[str, str]] = []
    for item in items:
        parts = [p.strip() for p in (item.split("|") if isinstance(item, str) else item)]
        if len(parts) != 2 or not all(parts) or parts[1] == "all" or "," in parts[1]:
            raise ParameterError("The 'views' parameter must be a comma list of layer|pool pairs such as "
                                 f"'blocks.2|4x4,blocks.4|catavgmax'. Got {item!r} in {spec!r} instead.", param="views")
        try:
            (pool,) = parse_pools(parts[1])
        except ParameterError as err:
            raise ParameterError(f"The 'views' parameter has a bad pool in {item!r}: {err}", param="views") from None
        views.append((parts[0], pool))
    if not views:
        raise ParameterError(f"The 'views' parameter must name at least one layer|pool pair. Got {spec!r} instead.",
                             param="views")
    if len(set(views)) < len(views):
        raise ParameterError(f"The 'views' parameter names a view twice. Got {spec!r} instead.", param="views")
    return views


def as_views_error(err: ParameterError, views: object) -> ParameterError:
    """A refused layer of one view, as an error about `views` (the parameter, and flag, the user gave)."""
    problem = str(err).replace("The 'layer' parameter must be", "each layer must be", 1)
    return ParameterError(f"The 'views' parameter names a layer the model does not have: {problem} (in {views!r})",
                          param="views")
