"""Fine-tuning runs: the training loop, resume, optimizer and schedule, the run's files, torchrun.

A run directory holds config.json (enough to rebuild the model), model-best/model-last.safetensors,
metrics.csv, curves.png, confusion.png (best model on the validation set) and checkpoint.json with
its checkpoint-EPOCH.safetensors (see transferkit.finetune.checkpoint). Only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from transferkit.data.datasets import ImageDataset
from transferkit.errors import DataError, TransferkitError
from transferkit.finetune.averaging import make_ema, saved_model
from transferkit.finetune.checkpoint import load_checkpoint, save_checkpoint
from transferkit.finetune.config import DEFAULT_CONFIG, FinetuneConfig, build_model
from transferkit.finetune.evaluation import evaluate_best
from transferkit.finetune.head_init import init_head_from_probe
from transferkit.finetune.loaders import (
    balanced_weights,
    make_loaders,
    maybe_cache,
    positive_weights,
    resize_train,
    small_val_warning,
    split_train_val,
)
from transferkit.finetune.mixing import make_mixup, mix
from transferkit.finetune.params import FINETUNE, OPTIMIZERS, SCHEDULES  # noqa: F401  (re-exported)
from transferkit.finetune.prefix_cache import bypassed
from transferkit.finetune.rundir import (
    FORMAT,
    RESULTS,
    check_run_dir,
    check_start_weights,
    create_run_dir,
    data_source,
    fingerprint,
)
from transferkit.finetune.schedule import (  # noqa: F401  (make_optimizer re-exported)
    Cycle,
    as_json,
    begin_cycle,
    cycle_at,
    extend,
    make_optimizer,
    make_scheduler,
    patience_over,
    run_cycles,
)
from transferkit.models.stages import (  # noqa: F401  (re-exported: the fine-tuning API in one import)
    HEADS,
    Stage,
    freeze_until,
    list_stages,
    lr_table,
    param_groups,
    replace_head,
    resolve_stage,
    set_train_mode,
    warmup_cosine,
)
from transferkit.models.weights import load_state_dict_file
from transferkit.runtime.atomic import atomic_write, write_json_atomic, write_text_atomic
from transferkit.runtime.device import autocast, default_device
from transferkit.runtime.distributed import World, all_true, close_world, init_world, sum_all
from transferkit.runtime.progress import progress_bar

if TYPE_CHECKING:
    from timm.data import Mixup
    from timm.utils import ModelEmaV3

    from transferkit.probe.metrics import Evaluation, MultiLabelEvaluation  # sklearn: imported when run evaluates

log = logging.getLogger(__name__)

METRICS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr_head", "seconds", "img_per_s")


@dataclass
class FinetuneResult:
    out: Path
    best_epoch: int
    best_val_accuracy: float
    history: list[dict]
    model: nn.Module
    cached: bool = False  # trained on frozen-prefix activations
    evaluation: Evaluation | MultiLabelEvaluation | None = None  # best model on the validation set (None: no val)
    warnings: list[str] = field(default_factory=list)  # also in config.json: e.g. a validation set too small to trust


@dataclass
class Run:
    """The live state of one run, passed between the loop's steps."""

    model: nn.Module  # unwrapped: what is saved
    net: nn.Module  # what runs forward: `model`, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    config: FinetuneConfig
    out: Path
    sources: list[str]  # of the training set, to name the files of a failing batch
    device: torch.device
    world: World
    bypass: list[nn.Module] = field(default_factory=list)  # frozen prefix replaced by cached activations
    multilabel: bool = False  # one sigmoid per class (targets (n, classes) of 0/1)
    loss_weight: torch.Tensor | None = None  # per class, config.class_weight='balanced'; None: plain cross-entropy
    step: int = 0
    last_saved: int = 0
    cycles: list[Cycle] = field(default_factory=list)  # the LR schedule's cycles (transferkit.finetune.schedule)
    steps_per_epoch: int = 0
    ema: ModelEmaV3 | None = None  # config.ema_decay: the average of the weights, validated and saved
    mixup: Mixup | None = None  # config.mixup / config.cutmix


def finetune(train: ImageDataset, out: str | Path, config: FinetuneConfig = DEFAULT_CONFIG, *,
             val: ImageDataset | None = None, progress: bool = True, resume: bool = False) -> FinetuneResult:
    """Fine-tune `config.model` on `train`; keep the epoch with the best validation accuracy.

    `resume=True` continues the run in `out` from its last checkpoint; `config` and the data must be
    those of that run. Under torchrun every rank calls this with the same arguments.
    """
    config.validate()
    device = default_device()
    world = init_world(device)
    try:
        with flush_denormals():
            return _finetune(train, Path(out), config, val, progress and world.main, resume, device, world)
    finally:
        close_world(world)
        for path in Path(out).glob("prefix-cache-*.npy"):  # memory-mapped activations: rebuilt on demand
            path.unlink(missing_ok=True)


def _finetune(train, out: Path, config: FinetuneConfig, val, progress: bool, resume: bool, device, world: World):
    seed_everything(config.seed)
    source = data_source(train, val)
    train, val = split_train_val(train, val, config)
    meta = {"format": FORMAT, "config": asdict(config), "classes": list(train.classes),
            "multilabel": train.multilabel, "data": fingerprint(train, val), "source": source}
    inputs = [train.root, None if val is None else val.root]  # the run directory is never inside the data
    old = check_run_dir(out, meta, resume, inputs)  # before the model is built: a wrong --resume fails at once
    counts = train.class_counts()
    model = build_model(config, train.classes, counts, len(train) if train.multilabel else None)
    model.to(device, memory_format=torch.channels_last)  # ~2x faster convs on CPU (oneDNN)
    meta["weights"] = model.weights_info.to_dict()
    check_start_weights(out, config, old, meta["weights"])
    if config.head_init == "probe" and not resume:  # a resumed run's head comes from its checkpoint
        meta["head_init"] = init_head_from_probe(model, train, config, device)
    loader, val_loader, data_meta = make_loaders(model, train, val, config, world)
    meta.update(data_meta)
    cycles = run_cycles(old, FinetuneConfig.from_dict(old["config"]) if old else config)
    run = _start(model, config, out, train.sources, device, world, cycles[0], len(loader))
    run.multilabel = train.multilabel
    run.mixup = make_mixup(config, len(train.classes), train.multilabel)
    if config.class_weight == "balanced":  # multi-label: each label's negatives / positives (BCE's pos_weight)
        weights = (positive_weights(train.targets) if train.multilabel else
                   balanced_weights(train.targets, len(train.classes)))
        run.loss_weight = torch.tensor(weights, dtype=torch.float32, device=device)
        meta["class_weights"] = weights.tolist()
    if resume:  # the whole checkpoint is checked, and restored, before anything is written
        loop = _restore(run, old, cycles)
        meta = {**{k: old[k] for k in RESULTS if k in old}, **meta}  # kept until this run replaces them
    else:  # the model, its weights and the data are checked: only now does the run directory appear
        loop, run.cycles = _fresh_loop(), cycles
        create_run_dir(out, world, inputs)
    meta["cycles"] = as_json(run.cycles)
    loader, val_loader, bypass = maybe_cache(model, config, train, val, loader, val_loader, out, device, world,
                                             progress)
    run.bypass = bypass["modules"]
    if run.ema is not None:  # its copy of the frozen prefix is bypassed with the model's
        run.bypass += [run.ema.module.get_submodule(name) for name in bypass["names"]]
    meta["cached_prefix"] = bypass["names"]
    warning = small_val_warning(len(val or []), given=source["val"] is not None)
    meta["warnings"] = [warning] if warning else []
    if world.main:
        if warning:
            log.warning("%s", warning)
        write_json_atomic(out / "config.json", meta)
    history, best = _fit(run, loader, val_loader, progress, loop)
    model.load_state_dict(load_state_dict_file(out / "model-best.safetensors"))
    ev = None
    if world.main:
        meta.update(best_epoch=best[0], best_val_accuracy=best[1])
        if val_loader is not None:
            ev = evaluate_best(run, val_loader, train.classes)
            meta["val"] = {k: v for k, v in ev.to_dict().items() if k not in ("labels", "confusion", "report")}
            meta["val"]["n"] = ev.n if run.multilabel else int(ev.confusion.sum())
        write_json_atomic(out / "config.json", meta)
    return FinetuneResult(out, best[0], best[1], history, model.eval(), cached=bool(run.bypass), evaluation=ev,
                          warnings=meta["warnings"])


def _restore(run: Run, old: dict, cycles: list[Cycle]) -> dict:
    """Load the last checkpoint into `run` and return its loop state; `run.cycles` are the run's, plus a new cycle
    when `run.config.epochs` extends it (schedule.extend)."""
    out, config = run.out, run.config
    loop = load_checkpoint(out, run.model, run.optimizer, run.scheduler, history_keys=METRICS,
                           ema=None if run.ema is None else run.ema.module)
    if loop["epoch"] and not (out / "model-best.safetensors").is_file():  # read back when the run ends
        raise DataError(f"cannot resume '{out}': model-best.safetensors, the best epoch so far, is missing")
    run.step, run.last_saved = loop["step"], loop["epoch"]
    was = FinetuneConfig.from_dict(old["config"])
    if config.epochs > was.epochs:
        stopped = loop["epoch"] >= cycles[-1].last or patience_over(loop["epoch"], loop["best"][0],
                                                                    cycle_at(cycles, loop["epoch"]), was.early_stop)
        cycles = extend(cycles, config, loop["epoch"], stopped)
        log.info("extending '%s' from %d to %d epochs: a new %s cycle from epoch %d at lr %g", out, was.epochs,
                 config.epochs, "one-cycle" if config.schedule == "onecycle" else "warmup+cosine", cycles[-1].first,
                 config.lr)
    else:
        log.info("resuming '%s' after epoch %d of %d", out, loop["epoch"], config.epochs)
    run.cycles = cycles
    return loop


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _fresh_loop() -> dict:
    return {"epoch": 0, "step": 0, "history": [], "best_key": [-math.inf, -math.inf], "best": [0, math.nan]}


def _start(model: nn.Module, config: FinetuneConfig, out: Path, sources: list[str], device, world: World,
           cycle: Cycle, steps_per_epoch: int) -> Run:
    """Optimizer over the per-stage groups, the schedule of the first cycle, the weights' average (config.ema_decay)
    and the DDP wrapper under torchrun."""
    optimizer = make_optimizer(model, config, cycle.lr)
    if world.main:
        log.info("learning rates:\n%s", lr_table(optimizer.param_groups))
    scheduler = make_scheduler(optimizer, config, cycle, steps_per_epoch)
    net = model
    if world.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return Run(model, net, optimizer, scheduler, config, out, sources, device, world, steps_per_epoch=steps_per_epoch,
               ema=make_ema(model, config.ema_decay))


def _fit(run: Run, loader, val_loader, progress: bool, loop: dict) -> tuple[list[dict], tuple[int, float]]:
    """Epochs with validation, checkpoints, metrics.csv and early stopping; returns (history, (epoch, acc))."""
    history, best_key, best = loop["history"], tuple(loop["best_key"]), tuple(loop["best"])
    for epoch in range(loop["epoch"] + 1, run.config.epochs + 1):
        cycle = cycle_at(run.cycles, epoch)
        if patience_over(epoch - 1, best[0], cycle, run.config.early_stop):
            break  # a resumed run that had already stopped early
        if epoch == cycle.first > 1:  # an extension's cycle: fresh warmup+cosine, optimizer moments kept
            run.scheduler = begin_cycle(run.model, run.optimizer, run.config, cycle, run.steps_per_epoch)
        seed_everything(run.config.seed * 100_003 + epoch * 1_009 + run.world.rank)  # resumable, distinct per rank
        loader.sampler.set_epoch(epoch)
        if run.config.start_size is not None:  # progressive resizing: this epoch's size
            resize_train(loader, run.model, run.config, epoch)
        start = time.perf_counter()
        loss, acc, seen = _epoch(run, loader, epoch, progress)
        rate = seen / (time.perf_counter() - start)  # training images per second, validation excluded
        val_loss, val_acc, _ = (math.nan, math.nan, 0) if val_loader is None else _epoch(run, val_loader)
        seconds = time.perf_counter() - start
        lr_head = max(g["lr"] for g in run.optimizer.param_groups)
        history.append(dict(zip(METRICS, (epoch, loss, acc, val_loss, val_acc, lr_head, seconds, rate))))
        # multi-label: the lowest validation loss (per-label accuracy rewards predicting every rare label absent)
        key = (epoch, 0.0) if val_loader is None else (-val_loss, val_acc) if run.multilabel else (val_acc, -val_loss)
        improved = key > best_key
        if improved:
            best_key, best = key, (epoch, val_acc)
        if run.world.main:
            _save(saved_model(run.model, run.ema), run.out / "model-last.safetensors")
            if improved:
                _save(saved_model(run.model, run.ema), run.out / "model-best.safetensors")
            _write_metrics(run.out / "metrics.csv", history)
            _plot_curves(run.out, history)
            save_checkpoint(run.out, run.model, run.optimizer, run.scheduler,
                            {"epoch": epoch, "step": run.step, "history": history, "best_key": list(best_key),
                             "best": list(best)}, ema=None if run.ema is None else run.ema.module)
        run.last_saved = epoch
        log.info("epoch %d: loss %.4f acc %.3f val_loss %.4f val_acc %.3f (%.0f img/s)", epoch, loss, acc, val_loss,
                 val_acc, rate)
        if patience_over(epoch, best[0], cycle, run.config.early_stop):
            log.info("early stop: no val improvement in %d epochs (best: %d)", run.config.early_stop, best[0])
            break
    if run.world.distributed:
        torch.distributed.barrier()  # rank 0's files are complete before any rank reads them
    return history, best


def to_device(x: torch.Tensor, device) -> torch.Tensor:
    return x.to(device, memory_format=torch.channels_last) if x.ndim == 4 else x.to(device)


def _epoch(run: Run, loader, epoch: int = 0, progress: bool = False) -> tuple[float, float, int]:
    """One pass over `loader`: training for epoch >= 1, evaluation (no grad, eval mode) for epoch 0 of the model
    a run saves (the weights' average with config.ema_decay).

    Loss, accuracy and count are summed over all ranks.
    """
    training = epoch > 0
    evaluated = saved_model(run.model, run.ema)
    set_train_mode(run.model, run.config.train_bn) if training else evaluated.eval()
    total, correct, seen, start = 0.0, 0, 0, time.perf_counter()
    bar = progress_bar(loader, desc=f"epoch {epoch}/{run.config.epochs}", enabled=training and progress, leave=False)
    with bypassed(run.bypass):
        for batch, (x, y, idx, _) in enumerate(bar, 1):
            if x is None:
                continue
            x, y = to_device(x, run.device), y.to(run.device)
            target = y  # mixup/cutmix: soft targets (B, classes); accuracy still counts the dominant image's class
            if training and run.mixup is not None:
                x, target = mix(run.mixup, x, y)
            with torch.set_grad_enabled(training), autocast(run.config.precision, run.device):
                logits = (run.net if training else evaluated)(x).float()
                weight = run.loss_weight if training else None  # validation loss: plain, comparable across runs
                loss = training_loss(logits, target, run.config, weight, run.multilabel)
            if training:
                _step(run, loss, epoch, batch, [run.sources[i] for i in idx[:3].tolist()])
            total, seen = total + loss.item() * len(y), seen + len(y)
            hits = (logits > 0) == y if y.ndim == 2 else logits.argmax(1) == y  # multi-label: each label's yes/no
            correct += hits.float().mean(1).sum().item() if y.ndim == 2 else hits.sum().item()
            rate = seen / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{total / seen:.4f}", acc=f"{correct / seen:.3f}",
                            img_s=f"{rate * run.world.size:.0f}", refresh=False)
    total, correct, seen = sum_all(run.world, total, correct, seen)
    if not seen:
        raise DataError(f"no image of the {'training' if training else 'validation'} set could be read")
    return total / seen, correct / seen, int(seen)


def training_loss(logits: torch.Tensor, y: torch.Tensor, config: FinetuneConfig,
                  weight: torch.Tensor | None, multilabel: bool | None = None) -> torch.Tensor:
    """Cross-entropy over the classes (`weight`: per class; `y` class indices, or soft targets (B, classes) from
    mixup); for multi-label targets (B, classes), binary cross-entropy per label (`weight`: each label's positive
    weight), label smoothing as timm's BinaryCrossEntropy smooths: targets 1 - s + s/K and s/K for K labels.
    `multilabel` None: targets (B, classes) are multi-label."""
    if y.ndim == 2 if multilabel is None else multilabel:
        off = config.label_smoothing / y.shape[1]
        target = y.float() * (1 - config.label_smoothing) + off
        return nn.functional.binary_cross_entropy_with_logits(logits, target, pos_weight=weight)
    return nn.functional.cross_entropy(logits, y, weight=weight, label_smoothing=config.label_smoothing)


def _step(run: Run, loss: torch.Tensor, epoch: int, batch: int, files: list[str]) -> None:
    """One optimizer and scheduler step; a non-finite loss (or grad norm) stops before the weights change."""
    run.step += 1
    where = f"at step {run.step} (epoch {epoch}, batch {batch}; first files: {', '.join(files)})"
    kept = (f"the checkpoint of epoch {run.last_saved} in '{run.out}' is kept (resuming continues from it)"
            if run.last_saved else "no checkpoint was written yet")
    finite = bool(torch.isfinite(loss))
    if not all_true(run.world, finite):
        what = f"loss is {loss.item()} {where}" if not finite else f"another process hit a non-finite loss {where}"
        raise TransferkitError(f"{what}. Lower lr or set clip_grad; {kept}.")
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if run.config.clip_grad:
        params = [p for g in run.optimizer.param_groups for p in g["params"]]
        norm = nn.utils.clip_grad_norm_(params, run.config.clip_grad)
        if not torch.isfinite(norm):  # identical on every rank: DDP has averaged the gradients
            raise TransferkitError(f"gradient norm is {norm.item()} {where}. Lower lr; {kept}.")
    run.optimizer.step()
    run.scheduler.step()
    if run.ema is not None:
        run.ema.update(run.model, step=run.step)


def _plot_curves(out: Path, history: list[dict]) -> None:
    from transferkit.plots import plot_curves

    plot_curves(history, out / "curves.png")


def _save(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}  # channels_last -> dense
    atomic_write(path, lambda tmp: save_file(state, str(tmp)))


def _write_metrics(path: Path, history: list[dict]) -> None:
    rows = [",".join(f"{r[k]:.6g}" if isinstance(r[k], float) else str(r[k]) for k in METRICS) for r in history]
    write_text_atomic(path, "\n".join([",".join(METRICS), *rows]) + "\n")


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """Flush denormal floats to zero while training: denormal gradients make CPU backward ~20% slower, and flushing
    them is harmless. The setting is the whole process's CPU state (numpy's too), so it is turned off again after."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


