"""Resuming a run from its directory alone: a killed run continues from its last checkpoint, a finished one is
extended (`epochs` larger than the run's). Data and settings not given are the run's (config.json)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from transferkit.data.datasets import ImageDataset, open_dataset
from transferkit.errors import DataError, ParameterError
from transferkit.finetune.config import FinetuneConfig
from transferkit.finetune.loop import FinetuneResult, finetune
from transferkit.finetune.rundir import read_run


def resume_run(out: str | Path, *, train: ImageDataset | None = None, val: ImageDataset | None = None,
               progress: bool = True, **changes) -> FinetuneResult:
    """Continue the run in `out`, exactly as if it had never stopped, or extend it with `epochs=N` (larger than the
    run's): a new warmup+cosine cycle over the added epochs at `lr` (the run's unless given; see
    transferkit.finetune.schedule). `changes` are FinetuneConfig fields; those that would change what the trained
    epochs mean are refused. `train`/`val`: the run's recorded data unless given (either way checked against it).
    """
    out = Path(out)
    meta = read_run(out)
    config = run_config(meta, changes)
    if train is None or val is None:
        recorded_train, recorded_val = run_data(out, meta, need_train=train is None)
        train, val = train if train is not None else recorded_train, val if val is not None else recorded_val
    return finetune(train, out, config, val=val, progress=progress, resume=True)


def run_config(meta: dict, changes: dict) -> FinetuneConfig:
    """The run's FinetuneConfig with `changes` (FinetuneConfig fields) on top; an unknown name is refused."""
    known = {f.name for f in dataclasses.fields(FinetuneConfig)}
    for name in changes:
        if name not in known:
            raise ParameterError(f"The '{name}' parameter is not a FinetuneConfig field; known: "
                                 f"{', '.join(sorted(known))}.", param=name)
    return dataclasses.replace(FinetuneConfig.from_dict(meta["config"]), **changes)


def run_data(out: Path, meta: dict, *, need_train: bool = True) -> tuple[ImageDataset | None, ImageDataset | None]:
    """The training data (when `need_train`) and the given validation data (None: a hold-out or none) recorded in
    config.json's 'source', opened again. The fingerprint check of `finetune` says whether it is still the same."""
    source = meta.get("source")
    if not need_train and not isinstance(source, dict):  # an older run given its training data: val as it was
        return None, None
    if not isinstance(source, dict) or not isinstance(source.get("train"), str):
        raise DataError(f"'{out}' does not record where its data is (it was made by an older transferkit): "
                        f"give its data (DATA, or train= in Python)")
    skip_bad = bool(source.get("skip_bad", False))
    try:
        train = open_dataset(source["train"], skip_bad=skip_bad) if need_train else None
        val = open_dataset(source["val"], skip_bad=skip_bad) if isinstance(source.get("val"), str) else None
    except DataError as e:
        raise DataError(f"cannot resume '{out}' from its recorded data ({e}); give its data (DATA and --val, or "
                        f"train= and val= in Python)") from e
    per_class = source.get("max_per_class")
    if train is not None and isinstance(per_class, int) and not train.multilabel:
        train = train.subset(per_class)  # the whole set again, or the per-class subset the run was given
    return train, val
