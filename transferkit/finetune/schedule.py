"""The optimizer and the learning-rate schedule of a run, in cycles: how a run extended with more epochs continues.

A run's schedule is a list of cycles. A fresh run has one: warmup then cosine to 0 (or one-cycle) over all its
epochs. Extending a finished run (`epochs` larger than the run's) appends a cycle over the added epochs, with its
own warmup and cosine at the (possibly new) `lr`, like fastai's `fit` after `fine_tune` or Keras'
`initial_epoch`: stretching the old cosine instead would jump the LR from ~0 back up to mid-schedule and change
what the finished epochs were trained under. A killed run resumes inside its cycle exactly as if never killed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from transferkit.errors import DataError
from transferkit.finetune.config import FinetuneConfig
from transferkit.models.stages import param_groups, warmup_cosine


@dataclass(frozen=True)
class Cycle:
    """One warmup+cosine (or one-cycle) schedule: it starts at epoch `first` and spans `epochs` epochs (the next
    cycle may begin earlier, when a run that stopped early is extended)."""

    first: int
    epochs: int
    lr: float
    warmup_epochs: float

    @property
    def last(self) -> int:
        return self.first + self.epochs - 1


@dataclass
class WarmupCosine:
    """warmup_cosine as a callable object: LambdaLR saves its fields with the scheduler's state, so a checkpoint
    says which cycle's schedule it is in."""

    warmup: int
    total: int

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, warmup=self.warmup, total=self.total)


def run_cycles(meta: dict | None, config: FinetuneConfig) -> list[Cycle]:
    """The cycles recorded in a run's config.json (`meta`), or the one cycle of a run that was never extended."""
    saved = (meta or {}).get("cycles")
    if not saved:
        return [Cycle(1, config.epochs, config.lr, config.warmup_epochs)]
    fields = {"first": int, "epochs": int, "lr": (int, float), "warmup_epochs": (int, float)}
    if not isinstance(saved, list) or not all(
            isinstance(c, dict) and c.keys() == fields.keys() and all(isinstance(c[k], t) for k, t in fields.items())
            for c in saved):
        raise DataError(f"config.json: field 'cycles' must be a list of {{first, epochs, lr, warmup_epochs}}; "
                        f"got {saved!r}")
    cycles = [Cycle(**c) for c in saved]
    firsts = [c.first for c in cycles]
    if firsts[0] != 1 or firsts != sorted(set(firsts)) or min(c.epochs for c in cycles) < 1:
        raise DataError(f"config.json: field 'cycles' must start at epoch 1, each later, none empty; got {saved!r}")
    return cycles


def extend(cycles: list[Cycle], config: FinetuneConfig, trained: int, stopped: bool) -> list[Cycle]:
    """Add a cycle up to `config.epochs`: after the last epoch `trained` if the run had stopped (finished or stopped
    early), else after the end of its last cycle (a killed run first finishes the schedule it was in)."""
    first = trained + 1 if stopped else cycles[-1].last + 1
    return [*cycles, Cycle(first, config.epochs - first + 1, config.lr, config.warmup_epochs)]


def cycle_at(cycles: list[Cycle], epoch: int) -> Cycle:
    return [c for c in cycles if c.first <= epoch][-1]


def as_json(cycles: list[Cycle]) -> list[dict]:
    return [asdict(c) for c in cycles]


def make_optimizer(model: nn.Module, config: FinetuneConfig, lr: float | None = None) -> torch.optim.Optimizer:
    layer_decay = None if config.lr_range else config.layer_decay
    groups = param_groups(model, config.lr if lr is None else lr, layer_decay=layer_decay,
                          lr_range=config.lr_range, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=config.lr)


def make_scheduler(optimizer, config: FinetuneConfig, cycle: Cycle,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedule of one cycle over each group's own lr, so the per-layer ratios hold throughout."""
    steps = cycle.epochs * steps_per_epoch
    warmup = round(cycle.warmup_epochs * steps / cycle.epochs)
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=steps,
            pct_start=min(max(warmup / steps, 0.01), 0.99), cycle_momentum=False)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup, steps))


def begin_cycle(model: nn.Module, optimizer, config: FinetuneConfig, cycle: Cycle,
                steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Start `cycle` on an optimizer that has trained before: each group's lr back to the cycle's `lr` (per-layer
    ratios as at the start), the optimizer's moments kept, and a fresh scheduler."""
    fresh = param_groups(model, cycle.lr, layer_decay=None if config.lr_range else config.layer_decay,
                         lr_range=config.lr_range, weight_decay=config.weight_decay)
    for group, new in zip(optimizer.param_groups, fresh, strict=True):
        group["lr"] = group["initial_lr"] = new["lr"]
    return make_scheduler(optimizer, config, cycle, steps_per_epoch)


def patience_over(trained: int, best_epoch: int, cycle: Cycle, early_stop: int | None) -> bool:
    """Early stopping after epoch `trained`: `early_stop` epochs without a gain, counted from the best epoch or the
    start of `cycle` (the cycle of the next epoch), whichever is later, so an extension gets its full patience."""
    return bool(early_stop) and trained - max(best_epoch, cycle.first - 1) >= early_stop
