"""Learning-rate range test (Smith 2015, fastai's lr_find): raise the LR exponentially, watch the loss.

Every optimizer group keeps its ratio to the head, so the sweep tests the per-layer schedule the
run will use. The suggestion is fastai's classic one: a tenth of the LR at the lowest smoothed loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from transferkit.errors import ModelError


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

    Stops early once the smoothed loss exceeds `diverge` x its minimum or is not finite.
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
    lowest = lrs[losses.index(min(losses))]
    return LRFinderResult(lrs, losses, lowest / 10)
