"""Learning-rate range test (Smith 2015, fastai's lr_find): raise the LR exponentially, watch the loss.

Every optimizer group keeps its ratio to the head, so the sweep tests the per-layer schedule the
run will use. The suggestion is fastai's classic one: a tenth of the LR at the lowest smoothed loss.
`lr_range_test` is the method on any optimizer; `find_lr` runs it on the network a FinetuneConfig describes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from transferkit.data.datasets import ImageDataset
from transferkit.errors import ModelError
from transferkit.finetune.config import DEFAULT_CONFIG, FinetuneConfig, build_model
from transferkit.finetune.loaders import make_loaders
from transferkit.finetune.loop import Run, flush_denormals, make_optimizer, seed_everything, to_device, training_loss
from transferkit.finetune.rundir import RUN_KIND
from transferkit.models.stages import set_train_mode
from transferkit.runtime.atomic import write_json_atomic
from transferkit.runtime.device import autocast, default_device
from transferkit.runtime.distributed import World
from transferkit.runtime.outputs import check_output, claim
from transferkit.runtime.progress import progress_bar


@dataclass(frozen=True)
class LRFinderResult:
    lrs: list[float]  # head LR at each step
    losses: list[float]  # exponentially smoothed, bias-corrected
    suggestion: float

    def to_dict(self) -> dict:
        return asdict(self)


def lr_range_test(optimizer: torch.optim.Optimizer, step: Callable[[], float], *, start: float = 1e-6,
                  end: float = 1.0, steps: int = 100, smooth: float = 0.98, diverge: float = 4.0) -> LRFinderResult:
    """Call `step()` (one training step; returns its loss) `steps` times with the head LR going start -> end.

    Stops early once the smoothed loss exceeds `diverge` x its minimum or is not finite. Suggests a tenth of
    the LR at the lowest smoothed loss after the first tenth of the steps.
    """
    if not 0 < start < end or steps < 2:
        raise ModelError(f"need 0 < start < end and steps >= 2. Got start={start}, end={end}, steps={steps}.")
    head = max(g["lr"] for g in optimizer.param_groups)
    ratios = [g["lr"] / head for g in optimizer.param_groups]
    lrs, losses, avg, best = [], [], 0.0, math.inf
    for i in range(steps):
        lr = start * (end / start) ** (i / (steps - 1))
        for g, r in zip(optimizer.param_groups, ratios):
            g["lr"] = lr * r
        loss = step()
        if not math.isfinite(loss):
            break
        avg = smooth * avg + (1 - smooth) * loss
        smoothed = avg / (1 - smooth ** (i + 1))
        lrs.append(lr)
        losses.append(smoothed)
        best = min(best, smoothed)
        if i > 5 and smoothed > diverge * best:
            break
    if not losses:
        raise ModelError(f"the first step of the LR range test already gave a non-finite loss (lr {start:g})")
    # the first tenth of the curve averages too few batches to trust (fastai skips its start too): one lucky
    # first batch made it the minimum, and the suggestion 1/10 of the starting LR (measured on multi-label mosaics)
    skip = steps // 10 if len(losses) > steps // 10 else 0
    lowest = lrs[skip + int(np.argmin(losses[skip:]))]
    return LRFinderResult(lrs, losses, lowest / 10)


def find_lr(train: ImageDataset, out: str | Path, config: FinetuneConfig = DEFAULT_CONFIG, *, start: float = 1e-6,
            end: float = 1.0, steps: int = 100, progress: bool = True):
    """LR range test on the model, head, freezing and per-layer ratios `config` describes.

    Writes lr_find.png and lr_find.json to `out` and trains nothing: the run starts from scratch after.
    """
    from transferkit.plots import plot_lr_find

    config.validate()
    seed_everything(config.seed)
    check_output(out, RUN_KIND, inputs=[train.root])
    counts = train.class_counts()
    model = build_model(config, train.classes, counts, len(train) if train.multilabel else None)  # as a run builds it
    out = claim(out, RUN_KIND, inputs=[train.root])  # once the model is built: bad weights leave no folder
    device = default_device()
    model.to(device, memory_format=torch.channels_last)
    loader = make_loaders(model, train, None, config, World())[0]
    run = Run(model, model, make_optimizer(model, config), None, config, out, train.sources, device, World())
    set_train_mode(model, config.train_bn)
    bar = progress_bar(total=steps, desc="lr finder", enabled=progress, leave=False)

    def batches():
        epoch = 0
        while True:
            epoch += 1
            loader.sampler.set_epoch(epoch)
            yield from ((x, y) for x, y, _, _ in loader if x is not None)

    it = batches()

    def step() -> float:
        x, y = next(it)
        with autocast(config.precision, device):
            loss = training_loss(model(to_device(x, device)).float(), y.to(device), config, None)  # as a run trains
        if torch.isfinite(loss):
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip_grad:
                nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.clip_grad)
            run.optimizer.step()
        bar.update()
        return loss.item()

    with flush_denormals():
        result = lr_range_test(run.optimizer, step, start=start, end=end, steps=steps)
    bar.close()
    write_json_atomic(out / "lr_find.json", {"config": asdict(config), **result.to_dict()})
    plot_lr_find(result.lrs, result.losses, out / "lr_find.png", suggestion=result.suggestion,
                 title=f"LR finder: {config.model}, freeze until {config.freeze_until}")
    return result
