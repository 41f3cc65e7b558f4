"""The saved-probe file format: a folder of arrays.npz and probe.json (no pickle), versioned and checksummed."""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from transferkit.errors import TransferkitError
from transferkit.runtime.atomic import write_bytes_atomic

if TYPE_CHECKING:
    from transferkit.probe.linear import LinearProbe

_FORMAT = "transferkit.probe"
# 2: params gained class_weight and metric, and "metric" records what chose C; 1 still reads.
# 3: arrays gained the calibration ("temperature"; multi-label: "platt", (a, b) per label), "calibration" names it
# and params gained calibrate; 1 and 2 still read, without probabilities (LinearProbe.calibrated is False).
# 4: "head" records the fitted head ('svm', 'logistic', 'ncm'; best_C is null for 'ncm'), params gained head,
# scaling gained 'center_l2' and 'standard_l2'; 1-3 still read, as SVMs.
# A probe trained with flip (`transferkit probe --flip`) records extra["flip"] (probe.saved.FLIP) and stays a 4: its
# arrays and params are any probe's; a reader that ignores the key scores each image once with the same weights.
_FORMAT_VERSION = 4
ARRAYS_FILE = "arrays.npz"
META_FILE = "probe.json"
_META_KEYS = {"version", "params", "classes_dtype", "n_features_in", "best_C", "cv_score", "cv_results",
              "n_iter", "arrays_sha256", "extra"}


def write_probe(probe: LinearProbe, path: Path, extra: Mapping[str, Any] | None) -> Path:
    """Write fitted `probe` to directory `path`: arrays.npz, then probe.json, which vouches for the arrays."""
    arrays = probe.arrays()
    npz_bytes = _npz_bytes(arrays)
    meta = {
        "format": _FORMAT,
        "version": _FORMAT_VERSION,
        "params": {**probe.get_params(), "Cs": [float(c) for c in probe.Cs], "class_weight": _class_weight(probe)},
        "classes_dtype": probe.classes_.dtype.str if probe.classes_.dtype.kind in "iufb" else "str",
        "n_features_in": int(probe.n_features_in_),
        "best_C": probe.best_C_,
        "head": probe.head_,
        "cv_score": None if math.isnan(probe.cv_score_) else probe.cv_score_,
        "cv_results": probe.cv_results_,
        "metric": probe.metric_,
        "calibration": next((k for k in ("temperature", "platt") if k in arrays), None),  # what predict_proba uses
        "n_iter": probe.n_iter_,
        "arrays_sha256": hashlib.sha256(npz_bytes).hexdigest(),
        "extra": dict(extra or {}),
    }
    try:
        meta_text = json.dumps(meta, indent=2, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise TransferkitError(f"Cannot save probe to {path}: {err} (is `extra` JSON-able?)") from err
    path.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path / ARRAYS_FILE, npz_bytes)
    write_bytes_atomic(path / META_FILE, meta_text.encode())  # written last: it vouches for the arrays
    return path


def _class_weight(probe: LinearProbe) -> Any:
    """class_weight as JSON: a {class: weight} dict keyed by str(class), which `LinearProbe.load` maps back."""
    weights = probe.class_weight
    return {str(k): float(v) for k, v in weights.items()} if isinstance(weights, Mapping) else weights


def read_probe(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The metadata and the checksum-verified arrays of the probe saved in directory `path`."""
    meta = _read_meta(path / META_FILE)
    return meta, _read_arrays(path / ARRAYS_FILE, meta["arrays_sha256"])


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise TransferkitError(f"Probe file {path} not found (was the probe saved there?).") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TransferkitError(f"Probe file {path} is corrupt: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT or not meta.keys() >= _META_KEYS:
        raise TransferkitError(f"Probe file {path} is corrupt: not a {_FORMAT} file or fields are missing.")
    if not isinstance(meta["version"], int) or meta["version"] > _FORMAT_VERSION:
        raise TransferkitError(f"Probe file {path} has format version {meta['version']}; this transferkit "
                               f"reads up to {_FORMAT_VERSION}. Upgrade transferkit.")
    return meta


def _read_arrays(path: Path, sha256: str) -> dict[str, np.ndarray]:
    try:
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise TransferkitError(f"Probe file {path} not found.") from err
    if hashlib.sha256(data).hexdigest() != sha256:
        raise TransferkitError(f"Probe file {path} is corrupt: its checksum does not match {META_FILE}.")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError) as err:
        raise TransferkitError(f"Probe file {path} is corrupt: {err}") from err
