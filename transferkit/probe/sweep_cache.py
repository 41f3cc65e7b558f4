"""Remembered sweeps: a sweep of the same codes and labels with the same settings gives the same ranking, so its
result is kept in the cache root and reused (an audit or `extract --layer auto` run again on the same images spent
~100 s of its 2-core time re-fitting ~350 probes: docs/benchmarks.md, 'Audit of 70,000 images').

The key is a digest of everything the result depends on: every view's code matrix (bytes, shape, dtype), the labels,
the sweep's settings and the scikit-learn version. A file is used only if it parses and records that same key;
anything else is swept again and rewritten (atomically), so a damaged file costs time, never a wrong pick.

Layout: ``<cache root>/sweeps/<key>.json`` holding ``{"format", "key", "result": SweepResult.to_dict()}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.probe import sweep as sweeping
from transferkit.runtime.atomic import write_json_atomic
from transferkit.runtime.cache_root import default_root

log = logging.getLogger(__name__)

FORMAT = "transferkit.sweep/1"  # bump when SweepResult's meaning changes


def sweep_key(codes: Mapping[tuple[str, str], Any], y: Any, settings: Mapping[str, Any]) -> str:
    """64-hex digest of the views' codes, the labels and the sweep's settings (what makes two sweeps the same)."""
    import sklearn

    h = hashlib.sha256(json.dumps({"format": FORMAT, "sklearn": sklearn.__version__, "max_iter":
                                   sweeping._SWEEP_MAX_ITER, "tol": sweeping._SWEEP_TOL, **settings},
                                  sort_keys=True, default=str).encode())
    for name, array in [*((repr(k), codes[k]) for k in sorted(codes)), ("labels", y)]:
        array = np.ascontiguousarray(array)
        h.update(f"{name}|{array.dtype.str}|{array.shape}".encode())
        h.update(array.data)
    return h.hexdigest()


def cached_sweep(codes: Mapping[tuple[str, str], Any], y: Any, *, root: str | Path | None = None,
                 **settings: Any) -> sweeping.SweepResult:
    """`probe.sweep.sweep(codes, y, **settings)`, or its remembered result for the very same inputs.

    `progress` and `n_jobs` change how the sweep runs, not what it finds: they are not part of the key.
    """
    runs = {k: settings.pop(k) for k in ("progress", "n_jobs") if k in settings}
    key = sweep_key(codes, y, settings)
    path = _folder(root) / f"{key}.json"
    if (found := _read(path, key)) is not None:
        log.info("sweep: reusing the result of the same sweep on the same codes (%s)", path)
        return found
    result = sweeping.sweep(codes, y, **settings, **runs)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"format": FORMAT, "key": key, "result": result.to_dict()})
    except OSError as e:  # the cache only saves time: a full or read-only disk never stops a run
        log.warning("sweep cache: cannot write %s (%s)", path, e.strerror or e)
    return result


def sweep_files(root: str | Path | None = None) -> list[Path]:
    """The remembered sweeps in the cache root (`transferkit cache info` counts them, `cache clean` deletes them)."""
    folder = _folder(root)
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def _folder(root: str | Path | None) -> Path:
    return Path(root if root is not None else default_root()) / "sweeps"


def _read(path: Path, key: str) -> sweeping.SweepResult | None:
    """The SweepResult stored in `path` if it is whole and was made for `key`, else None (with a warning if the
    file exists but cannot be used)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT or data.get("key") != key:
            raise ValueError("made for other inputs")
        result = data["result"]
        rows = [dict(r) for r in result["rows"]]
        best = dict(result["best"])
        if best not in rows:
            raise ValueError("its best view is not among its rows")
        return sweeping.SweepResult(rows=rows, best=rows[rows.index(best)], metric=str(result["metric"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("sweep cache: ignoring %s (%s); sweeping again", path, e)
        return None
