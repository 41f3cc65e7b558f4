"""Make a frozen backbone fast to run: BatchNorm folded into the convolution before it, and a parity check.

Folding is exact algebra for a BatchNorm in eval mode: y = (conv(x) - mean) / sqrt(var + eps) * g + b is
conv'(x) with weight w * s and bias (bias - mean) * s + b, s = g / sqrt(var + eps). It saves one pass over
every activation map. A pair is folded only when the BatchNorm is the conv's next sibling in module order
(how timm and torchvision write conv -> bn); `fold_checked` then compares the whole network's output with
the unfolded one and keeps the original if they differ, so an unusual wiring can cost speed, never accuracy.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def _after_bn(bn: nn.BatchNorm2d) -> nn.Module:
    """What is left of a BatchNorm once folded: timm's BatchNormAct2d keeps its dropout and activation."""
    rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
    rest = [m for m in rest if not isinstance(m, nn.Identity)]
    return nn.Sequential(*rest) if rest else nn.Identity()


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> int:
    """Fold each eval-mode BatchNorm2d that directly follows a Conv2d into that conv, in place; return the count."""
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode: training BatchNorm uses batch statistics")
    folded = 0
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                continue
            if bn.num_features != conv.out_channels or bn.running_mean is None or bn.running_var is None:
                continue
            scale = torch.rsqrt(bn.running_var + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            bias = (bias - bn.running_mean) * scale + (bn.bias if bn.bias is not None else 0)
            conv.weight.copy_(conv.weight * scale.reshape(-1, *([1] * (conv.weight.ndim - 1))))
            conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
            setattr(parent, bn_name, _after_bn(bn))
            folded += 1
    return folded


@torch.no_grad()
def fold_checked(model: nn.Module, example: torch.Tensor, rtol: float = 1e-4,
                 atol: float = 1e-4) -> tuple[nn.Module, int]:
    """A BN-folded copy of `model` if its output on `example` matches the original's, else `model` itself.

    Returns (model, number of folds; 0 when nothing folded or the check failed).
    """
    folded = copy.deepcopy(model)
    n = fold_batchnorm(folded)
    if not n:
        return model, 0
    want, got = model(example), folded(example)
    if not torch.allclose(got, want, rtol=rtol, atol=atol):
        worst = (got - want).abs().max().item()
        log.warning("BatchNorm folding changed the output by up to %.3g; running unfolded", worst)
        return model, 0
    return folded, n
