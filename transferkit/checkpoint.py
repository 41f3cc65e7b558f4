"""Training checkpoints that resume bit-exactly: model, optimizer, scheduler, RNG states and loop state.

Tensors go to ``checkpoint-EPOCH.safetensors``; everything else, with that file's sha256, to
``checkpoint.json``. The JSON is replaced atomically after the tensors are on disk and only then is
the older tensor file removed, so a kill at any moment leaves a consistent pair behind. No pickle.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from transferkit.atomic import atomic_write, write_json_atomic
from transferkit.errors import DataError

FORMAT = "transferkit.checkpoint/1"
JSON_NAME = "checkpoint.json"


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """Python, NumPy and torch generator states as (JSON part, tensor part)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached]}
    return state, {"rng.torch": torch.get_rng_state()}


def set_rng_state(state: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])


def _split_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """torch's optimizer state_dict with its tensors pulled out under 'optimizer.PARAM.KEY' names."""
    sd = optimizer.state_dict()
    tensors, state = {}, {}
    for pid, entries in sd["state"].items():
        state[str(pid)] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{pid}.{key}"] = value.detach().cpu().contiguous()
                state[str(pid)][key] = None  # placeholder: the value is in the tensor file
            else:
                state[str(pid)][key] = value
    return {"state": state, "param_groups": sd["param_groups"]}, tensors


def _join_optimizer(meta: dict, tensors: dict[str, torch.Tensor]) -> dict:
    state = {}
    for pid, entries in meta["state"].items():
        state[int(pid)] = {k: tensors[f"optimizer.{pid}.{k}"] if v is None else v for k, v in entries.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, loop: dict) -> Path:
    """Write the state after a finished epoch (`loop` holds epoch, step, history, best ...)."""
    from safetensors.torch import save_file

    rng_meta, rng_tensors = rng_state()
    opt_meta, opt_tensors = _split_optimizer(optimizer)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update(opt_tensors)
    tensors.update(rng_tensors)
    name = f"checkpoint-{loop['epoch']:04d}.safetensors"
    atomic_write(out / name, lambda tmp: save_file(tensors, str(tmp)))
    previous = _read_json(out)
    meta = {"format": FORMAT, "tensors": name, "sha256": _sha256(out / name), "loop": loop,
            "optimizer": opt_meta, "scheduler": scheduler.state_dict(), "rng": rng_meta}
    write_json_atomic(out / JSON_NAME, meta)
    if previous and previous.get("tensors") not in (None, name):
        (out / previous["tensors"]).unlink(missing_ok=True)
    return out / JSON_NAME


def load_checkpoint(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict:
    """Restore everything `save_checkpoint` wrote (RNGs included) and return its loop state."""
    from safetensors.torch import load_file

    meta = _read_json(out)
    if meta is None:
        raise DataError(f"'{out}' has no {JSON_NAME}: nothing to resume (the run ended before its first epoch)")
    path = out / meta["tensors"]
    if not path.is_file() or _sha256(path) != meta["sha256"]:
        raise DataError(f"'{path}' is missing or does not match the sha256 in '{out / JSON_NAME}'")
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    optimizer.load_state_dict(_join_optimizer(meta["optimizer"], tensors))
    scheduler.load_state_dict(meta["scheduler"])
    set_rng_state(meta["rng"], tensors)
    return meta["loop"]


def _read_json(out: Path) -> dict | None:
    path = out / JSON_NAME
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"'{path}' is not valid JSON: {e}") from e
    if meta.get("format") != FORMAT:
        raise DataError(f"'{path}' is not a transferkit checkpoint (format {meta.get('format')!r})")
    return meta


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
