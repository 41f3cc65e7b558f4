"""An exponential moving average of the weights (timm's ModelEmaV3), what a run validates and saves when
`config.ema_decay` is set: on small data the last step's weights carry the noise of the last few batches, and their
average over the last hundreds of steps generalises better (Polyak averaging; timm's train.py --model-ema)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from timm.utils import ModelEmaV3


def make_ema(model: nn.Module, decay: float | None) -> ModelEmaV3 | None:
    """The average of `model`'s weights and buffers, or None when `decay` is None.

    timm's warmup sets the decay at step t to min(decay, 1 - (1 + t)^(-2/3)): the first steps' weights (a random
    head) wash out at once instead of lingering for 1 / (1 - decay) steps, which a short run would not outlast.
    """
    if decay is None:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay, use_warmup=True)


def saved_model(model: nn.Module, ema: ModelEmaV3 | None) -> nn.Module:
    """What a run validates and writes to model-*.safetensors: the average when there is one."""
    return model if ema is None else ema.module
