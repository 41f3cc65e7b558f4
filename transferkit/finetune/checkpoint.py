"""Training checkpoints that resume bit-exactly: model, optimizer, scheduler, RNG states, loop state and the
weights' average (config.ema_decay) when a run keeps one.

Tensors go to ``checkpoint-EPOCH.safetensors``; everything else, with that file's sha256, to
``checkpoint.json``. The JSON is replaced atomically after the tensors are on disk and only then is
the older tensor file removed, so a kill at any moment leaves a consistent pair behind. No pickle.
Loading checks every field against the model and optimizer it goes into before it restores anything.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from transferkit.errors import DataError
from transferkit.runtime.atomic import atomic_write, file_sha256, write_json_atomic

FORMAT = "transferkit.checkpoint/1"
JSON_NAME = "checkpoint.json"
NUMBER = (int, float)  # a JSON number (bool, a subclass of int, is refused where a number is read)


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
                    scheduler: torch.optim.lr_scheduler.LRScheduler, loop: dict, *,
                    ema: nn.Module | None = None) -> Path:
    """Write the state after a finished epoch (`loop` holds epoch, step, history, best ...; `ema`: the average of
    the weights, as 'ema.NAME' tensors)."""
    from safetensors.torch import save_file

    rng_meta, rng_tensors = rng_state()
    opt_meta, opt_tensors = _split_optimizer(optimizer)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})
    tensors.update(opt_tensors)
    tensors.update(rng_tensors)
    name = f"checkpoint-{loop['epoch']:04d}.safetensors"
    atomic_write(out / name, lambda tmp: save_file(tensors, str(tmp)))
    previous = _read_json(out)
    meta = {"format": FORMAT, "tensors": name, "sha256": file_sha256(out / name), "loop": loop,
            "optimizer": opt_meta, "scheduler": scheduler.state_dict(), "rng": rng_meta}
    write_json_atomic(out / JSON_NAME, meta)
    if previous and previous.get("tensors") not in (None, name):
        (out / previous["tensors"]).unlink(missing_ok=True)
    return out / JSON_NAME


def load_checkpoint(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, *, history_keys: tuple[str, ...] = (),
                    ema: nn.Module | None = None) -> dict:
    """Restore everything `save_checkpoint` wrote (RNGs and `ema` included) and return its loop state.

    All of it is checked (`read_checkpoint`) before anything is restored.
    """
    meta, tensors = read_checkpoint(out, model, optimizer, scheduler, history_keys=history_keys, ema=ema)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if ema is not None:
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    optimizer.load_state_dict(_join_optimizer(meta["optimizer"], tensors))
    scheduler.load_state_dict(meta["scheduler"])
    set_rng_state(meta["rng"], tensors)
    return meta["loop"]


def read_checkpoint(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, *,
                    history_keys: tuple[str, ...] = (),
                    ema: nn.Module | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """checkpoint.json and its tensors, checked field by field against what loading them into these objects needs.

    A hand-edited, truncated or foreign checkpoint raises a one-line DataError naming the file and the first
    missing or bad field, instead of a KeyError halfway through restoring. Nothing is changed.
    """
    from safetensors.torch import load_file

    meta = _read_json(out)
    if meta is None:
        raise DataError(f"'{out}' has no {JSON_NAME}: nothing to resume (the run ended before its first epoch)")
    _check_meta(_Fields(out / JSON_NAME, meta), optimizer, scheduler, history_keys)
    path = out / meta["tensors"]
    if not path.is_file() or file_sha256(path) != meta["sha256"]:
        raise DataError(f"'{path}' is missing or does not match the sha256 in '{out / JSON_NAME}'")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors' own errors: the file is not what its hash promised
        detail = " ".join(str(e).split())
        raise DataError(f"'{path}' is not a readable safetensors file: {type(e).__name__}: {detail}") from e
    _check_tensors(path, meta, tensors, model, optimizer, ema)
    return meta, tensors


class _Fields:
    """Typed access to the fields of one JSON file; the first missing or bad one raises a DataError."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta = path, meta

    def bad(self, name: str, problem: str) -> DataError:
        return DataError(f"'{self.path}': field '{name}' {problem}; cannot resume from this checkpoint")

    def get(self, name: str, kind: type | tuple[type, ...]):
        value = self.meta
        for part in name.split("."):
            if not isinstance(value, dict) or part not in value:
                raise self.bad(name, "is missing")
            value = value[part]
        return self.check(name, value, kind)

    def check(self, name: str, value, kind: type | tuple[type, ...]):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise self.bad(name, f"must be {names}, not {type(value).__name__}")
        return value

    def items(self, name: str, kinds: list) -> list:
        """A JSON array of exactly len(kinds) values, each of its kind (a kind may be [list, N] for N integers)."""
        values = self.get(name, list)
        if len(values) != len(kinds):
            raise self.bad(name, f"must have {len(kinds)} entries, not {len(values)}")
        for i, (value, kind) in enumerate(zip(values, kinds)):
            kind, length = kind if isinstance(kind, list) else (kind, None)
            self.check(f"{name}[{i}]", value, kind)
            if length is not None and (len(value) != length or not all(_is_int(v) for v in value)):
                raise self.bad(f"{name}[{i}]", f"must be {length} integers")
        return values


def _check_meta(f: _Fields, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                history_keys: tuple[str, ...]) -> None:
    """The JSON part: every field `load_checkpoint` and the training loop read, with its type."""
    name = f.get("tensors", str)
    if Path(name).name != name or not name.endswith(".safetensors"):
        raise f.bad("tensors", f"must name a .safetensors file beside it, not {name!r}")
    sha = f.get("sha256", str)
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise f.bad("sha256", "must be 64 hex digits")
    for key in ("loop", "optimizer", "scheduler", "rng"):
        f.get(key, dict)
    _check_loop(f, history_keys)
    _check_optimizer(f, optimizer)
    _check_like(f, "scheduler", f.meta["scheduler"], scheduler.state_dict())
    _check_rng(f)


def _check_loop(f: _Fields, history_keys: tuple[str, ...]) -> None:
    for key in ("epoch", "step"):
        if f.get(f"loop.{key}", int) < 0:
            raise f.bad(f"loop.{key}", "must be >= 0")
    history = f.get("loop.history", list)
    if len(history) != f.meta["loop"]["epoch"]:
        raise f.bad("loop.history", f"has {len(history)} rows for {f.meta['loop']['epoch']} epochs")
    for i, row in enumerate(history):
        f.check(f"loop.history[{i}]", row, dict)
        for key in history_keys:
            if key not in row:
                raise f.bad(f"loop.history[{i}].{key}", "is missing")
            f.check(f"loop.history[{i}].{key}", row[key], NUMBER)
    f.items("loop.best_key", [NUMBER, NUMBER])
    f.items("loop.best", [int, NUMBER])


def _check_optimizer(f: _Fields, optimizer: torch.optim.Optimizer) -> None:
    """Groups that pair one to one with `optimizer`'s (as torch's load_state_dict pairs them), state by their ids."""
    f.get("optimizer.state", dict)
    groups = f.get("optimizer.param_groups", list)
    if len(groups) != len(optimizer.param_groups):
        raise f.bad("optimizer.param_groups", f"has {len(groups)} groups, the optimizer {len(optimizer.param_groups)}")
    for i, live in enumerate(optimizer.param_groups):
        _check_like(f, f"optimizer.param_groups[{i}]", groups[i], live)
        params = groups[i]["params"]
        if len(params) != len(live["params"]) or not all(_is_int(p) for p in params):
            raise f.bad(f"optimizer.param_groups[{i}].params", f"must be {len(live['params'])} parameter ids")
    ids = {p for g in groups for p in g["params"]}
    for pid, entries in f.meta["optimizer"]["state"].items():
        if not pid.isdigit() or int(pid) not in ids:
            raise f.bad(f"optimizer.state.{pid}", "is not a parameter id of optimizer.param_groups")
        f.check(f"optimizer.state.{pid}", entries, dict)


def _check_rng(f: _Fields) -> None:
    """Types, then each state set on a scratch generator: the process's own changes only once all is checked."""
    python = f.items("rng.python", [int, [list, 625], (float, type(None))])
    numpy = f.items("rng.numpy", [str, [list, 624], int, int, NUMBER])
    try:
        random.Random().setstate((python[0], tuple(python[1]), python[2]))
    except (ValueError, TypeError, OverflowError) as e:
        raise f.bad("rng.python", f"is not a Python random state ({e})") from e
    try:
        np.random.RandomState().set_state((numpy[0], np.asarray(numpy[1], np.uint32), *numpy[2:]))
    except (ValueError, TypeError, OverflowError) as e:
        raise f.bad("rng.numpy", f"is not a NumPy random state ({e})") from e


def _check_like(f: _Fields, name: str, saved, live: dict) -> None:
    """`saved` has every key of `live` (a state dict of the object it will be loaded into), each of its JSON kind."""
    f.check(name, saved, dict)
    for key, value in live.items():
        if key not in saved:
            raise f.bad(f"{name}.{key}", "is missing")
        kind = (list if isinstance(value, (list, tuple)) else bool if isinstance(value, bool) else
                NUMBER if isinstance(value, NUMBER) else type(value))
        if value is not None:
            f.check(f"{name}.{key}", saved[key], kind)


def _check_tensors(path: Path, meta: dict, tensors: dict[str, torch.Tensor], model: nn.Module,
                   optimizer: torch.optim.Optimizer, ema: nn.Module | None = None) -> None:
    """The tensor file holds the model's tensors (and `ema`'s), the optimizer state the JSON points to, and the
    torch RNG."""
    def bad(name: str, problem: str) -> DataError:
        return DataError(f"'{path}': tensor '{name}' {problem}; cannot resume from this checkpoint")

    need = {f"model.{k}": (v.shape, False) for k, v in model.state_dict().items()}  # name: (shape, 0-d allowed)
    if ema is not None:
        need.update({f"ema.{k}": (v.shape, False) for k, v in ema.state_dict().items()})
    live = [p for g in optimizer.param_groups for p in g["params"]]
    saved_ids = [p for g in meta["optimizer"]["param_groups"] for p in g["params"]]
    param_of = dict(zip(saved_ids, live))  # how torch's load_state_dict pairs saved ids with parameters
    for pid, entries in meta["optimizer"]["state"].items():
        for key, value in entries.items():
            if value is None:  # a placeholder for a tensor in the file: the param's shape, or 0-d like 'step'
                need[f"optimizer.{pid}.{key}"] = (param_of[int(pid)].shape, True)
    need["rng.torch"] = (torch.get_rng_state().shape, False)
    for name, (shape, scalar_ok) in need.items():
        if name not in tensors:
            raise bad(name, "is missing")
        if tensors[name].shape != shape and not (scalar_ok and tensors[name].ndim == 0):
            raise bad(name, f"has shape {tuple(tensors[name].shape)}, needs {tuple(shape)}")
    extra = sorted(set(tensors) - set(need))
    if extra:
        raise bad(extra[0], "belongs to no parameter of this model or optimizer")
    if tensors["rng.torch"].dtype != torch.uint8:
        raise bad("rng.torch", f"must be uint8, not {tensors['rng.torch'].dtype}")


def _read_json(out: Path) -> dict | None:
    path = out / JSON_NAME
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise DataError(f"'{path}' is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        what = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise DataError(f"'{path}' is not a transferkit checkpoint (format {what!r})")
    return meta


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


