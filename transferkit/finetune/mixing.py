"""Mixup and CutMix (timm.data.Mixup): each training batch is blended with itself reversed, images and targets
alike, so the network sees soft targets between classes; a regulariser for small training sets."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from transferkit.finetune.config import FinetuneConfig

if TYPE_CHECKING:
    from timm.data import Mixup


def make_mixup(config: FinetuneConfig, n_classes: int, multilabel: bool) -> Mixup | None:
    """timm's Mixup for `config.mixup`/`config.cutmix` (both on: each batch one or the other), None when both are 0.

    Label smoothing stays in the loss (`loop.training_loss`), applied to the mixed targets as to plain ones.
    """
    if not (config.mixup or config.cutmix):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, label_smoothing=0.0, num_classes=n_classes,
                 multi_label=multilabel)


def mix(mixup: Mixup, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixed images (in place) and soft targets (B, classes), each row summing to 1 (multi-label: each label in
    [0, 1]). timm pairs image i with image B-1-i and needs an even batch: an odd batch's last image stays as it is."""
    from timm.data.mixup import mixup_target

    n = len(x) - len(x) % 2
    target = mixup_target(y, mixup.num_classes, 1.0, 0.0, mixup.multi_label).to(x.device)
    if n:
        x[:n], target[:n] = mixup(x[:n], y[:n])
    return x, target
