"""A fine-tuning run directory on disk: what marks one, what a resume must match before anything is written,
and loading the trained network back."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from transferkit.data.datasets import ImageDataset
from transferkit.errors import DataError, ParameterError
from transferkit.finetune.config import FinetuneConfig
from transferkit.models.backbones import WeightsInfo
from transferkit.models.stages import replace_head
from transferkit.models.weights import load_state_dict_file, state_dict_sha256
from transferkit.runtime.distributed import World
from transferkit.runtime.outputs import check_output, claim

FORMAT = "transferkit.finetune/1"
RUN_KIND = "run"  # the output kind in its marker (transferkit.runtime.outputs)
RESULTS = ("best_epoch", "best_val_accuracy", "val")  # what a finished run adds to config.json
EXTENDABLE = ("epochs", "lr", "warmup_epochs", "early_stop")  # may differ when a run is extended: the new cycle's


def fingerprint(train: ImageDataset, val: ImageDataset | None) -> dict:
    """What --resume checks the data against: sizes, a hash of every (source, label), and one of every (name under
    its dataset's root, label), which is the same however the root is spelled (relative, absolute, moved)."""
    h, names = hashlib.sha256(), hashlib.sha256()
    for part in (train, val):
        if part is not None:
            prefix = os.path.join(str(part.root), "")
            for src, y in zip(part.sources, part.targets):
                h.update(f"{src}\t{y}\n".encode())
                name = src[len(prefix):] if src.startswith(prefix) else os.path.relpath(src, part.root)
                names.update(f"{name}\t{y}\n".encode())
        h.update(b"--\n")
        names.update(b"--\n")
    return {"n_train": len(train), "n_val": len(val or []), "sha256": h.hexdigest(), "names_sha256": names.hexdigest()}


def data_source(train: ImageDataset, val: ImageDataset | None) -> dict:
    """Where a run's data is, so that `resume_run(out)` can open it again without being given it.

    `max_per_class`: the largest class of `train`; `open_dataset(train).subset(max_per_class)` is `train` again when
    it was the whole dataset or a per-class subset of it (the fingerprint checks that it is).
    """
    return {"train": os.path.abspath(train.root), "val": None if val is None else os.path.abspath(val.root),
            "max_per_class": None if train.multilabel else int(train.class_counts().max()),
            "skip_bad": bool(train.skip_bad)}


class RunMismatch(ParameterError, DataError):
    """A resumed run given a setting that differs from the run's: names the parameter (the CLI: its flag)."""


def check_run_dir(out: Path, meta: dict, resume: bool, inputs: list) -> dict | None:
    """A fresh run needs a directory without a run (and that transferkit may write: transferkit.runtime.outputs);
    a resumed one the same data and config, except what may change to extend it (EXTENDABLE). Returns the run's
    config.json."""
    if not resume:
        check_output(out, RUN_KIND, inputs=inputs)
        if (out / "config.json").exists():
            raise DataError(f"'{out}' already holds a fine-tuning run; resume it (resume=True) "
                            f"or choose another 'out' directory")
        return None
    old = read_run(out)
    was, now = old["config"].get("epochs"), meta["config"]["epochs"]
    if isinstance(was, int) and now < was:
        raise RunMismatch(f"cannot resume '{out}': epochs: run has {was}, now {now}; a run can be extended (epochs "
                          f"larger than {was}), not shortened", param="epochs")
    extending = isinstance(was, int) and now > was
    diff = [(k, line) for k, line in config_diff(old, meta) if not (extending and k in EXTENDABLE)]
    if diff:
        may = ("that would change what its trained epochs mean; start a new run in another 'out'"
               if any(k not in EXTENDABLE for k, _ in diff) else
               f"{', '.join(EXTENDABLE[1:-1])} and {EXTENDABLE[-1]} may change only when extending it: epochs "
               f"larger than {was}")
        raise RunMismatch(f"cannot resume '{out}': it was started with different settings: "
                          f"{'; '.join(line for _, line in diff)} ({may})", param=diff[0][0])
    data = data_diff(old, meta)  # after the settings: another seed or val_fraction also holds out other images
    if data:
        raise DataError(f"cannot resume '{out}': the data is not the run's ({'; '.join(data)}); give the run's "
                        f"data or none (its recorded data is then used)")
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


def config_diff(old: dict, new: dict) -> list[tuple[str, str]]:
    """(key, 'key: run has X, now Y') for each setting of the config that differs."""
    lines = []
    for key in sorted(set(old.get("config", {})) | set(new["config"])):
        a, b = old.get("config", {}).get(key), new["config"].get(key)
        if (list(a) if isinstance(a, tuple) else a) != (list(b) if isinstance(b, tuple) else b):
            lines.append((key, f"{key}: run has {a!r}, now {b!r}"))
    return lines


def data_diff(old: dict, new: dict) -> list[str]:
    """'key: run has X, now Y' for the classes and data that differ (names_sha256 where both runs have it: the
    root may be spelled differently, else the older sha256 of the sources as given)."""
    same_names = "names_sha256" in old.get("data", {}) and "names_sha256" in new.get("data", {})
    lines = []
    for key, part in (("classes", None), ("data", "n_train"), ("data", "n_val"),
                      ("data", "names_sha256" if same_names else "sha256")):
        a, b = old.get(key), new.get(key)
        if part is not None:
            a, b = (a or {}).get(part), (b or {}).get(part)
        if a != b:
            lines.append(f"{key if part is None else f'{key}.{part}'}: run has {a!r}, now {b!r}")
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
