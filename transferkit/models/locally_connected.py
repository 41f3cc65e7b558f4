"""LocallyConnected2d: a convolution without parameter sharing, and what sharing saves.

cs231n: when the input is centred (faces), features on one side of the image need not be those on
the other, so each output location may learn its own filters. The price is parameters: one filter
bank per output location instead of one for the whole map, and a fixed input size, since the number
of locations is part of the layer.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from transferkit.errors import ModelError

IntPair = int | tuple[int, int]


def _pair(value: IntPair, name: str, minimum: int) -> tuple[int, int]:
    """(h, w) from an int or a pair, checked against `minimum`."""
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    ok = isinstance(pair, (tuple, list)) and len(pair) == 2
    if not (ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in pair)):
        raise ModelError(f"The '{name}' parameter of LocallyConnected2d must be an integer >= {minimum} "
                         f"or a pair of them. Got {value!r} instead.")
    return int(pair[0]), int(pair[1])


class ParameterCounts(NamedTuple):
    """Parameters of one layer with shared filters (nn.Conv2d) and without (LocallyConnected2d)."""

    shared: int
    unshared: int
    output_size: tuple[int, int]


def shared_vs_unshared_params(in_channels: int, out_channels: int, kernel_size: IntPair, input_size: IntPair,
                              stride: IntPair = 1, padding: IntPair = 0, bias: bool = True) -> ParameterCounts:
    """What parameter sharing saves: the same layer as nn.Conv2d and as LocallyConnected2d.

    shared   = F*C*kh*kw (+ F biases)
    unshared = oh*ow * F*C*kh*kw (+ F*oh*ow biases)
    e.g. a 32x32x3 input, 20 filters 8x8, stride 2, padding 1 -> 14x14 outputs: 3,860 vs 756,560.
    """
    layer = _Geometry(in_channels, out_channels, kernel_size, input_size, stride, padding)
    per_filter = in_channels * layer.kernel[0] * layer.kernel[1]
    locations = layer.output_size[0] * layer.output_size[1]
    shared = out_channels * per_filter + (out_channels if bias else 0)
    unshared = locations * out_channels * per_filter + (out_channels * locations if bias else 0)
    return ParameterCounts(shared, unshared, layer.output_size)


class _Geometry:
    """Checked sizes of a locally connected layer; its output size is (W - F + 2P) // S + 1 per axis."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, input_size: IntPair,
                 stride: IntPair, padding: IntPair):
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelError(f"The '{name}' parameter of LocallyConnected2d must be an integer >= 1. "
                                 f"Got {value!r} instead.")
        self.kernel = _pair(kernel_size, "kernel_size", 1)
        self.input_size = _pair(input_size, "input_size", 1)
        self.stride = _pair(stride, "stride", 1)
        self.padding = _pair(padding, "padding", 0)
        out = tuple((n + 2 * p - k) // s + 1 for n, k, s, p in zip(self.input_size, self.kernel, self.stride,
                                                                      self.padding))
        if min(out) < 1:
            raise ModelError(f"The 'kernel_size' {self.kernel} of LocallyConnected2d does not fit its 'input_size' "
                             f"{self.input_size} with padding {self.padding}: no output location is left.")
        self.output_size = (int(out[0]), int(out[1]))


class LocallyConnected2d(nn.Module):
    """Like nn.Conv2d, but every output location has its own filters and its own bias per channel.

    `input_size` (H, W) is fixed at construction: it decides the number of locations, and an input of
    another spatial size is refused. Weight: (oh*ow, out_channels, in_channels*kh*kw), each row laid
    out like nn.Conv2d's `weight.flatten(1)`; bias: (out_channels, oh, ow).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, input_size: IntPair,
                 stride: IntPair = 1, padding: IntPair = 0, bias: bool = True):
        super().__init__()
        geometry = _Geometry(in_channels, out_channels, kernel_size, input_size, stride, padding)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.input_size = geometry.kernel, geometry.input_size
        self.stride, self.padding, self.output_size = geometry.stride, geometry.padding, geometry.output_size
        locations = self.output_size[0] * self.output_size[1]
        fan_in = in_channels * self.kernel_size[0] * self.kernel_size[1]
        self.weight = nn.Parameter(torch.empty(locations, out_channels, fan_in))
        self.bias = nn.Parameter(torch.empty(out_channels, *self.output_size)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Conv2d's default init per location: He-uniform with a=sqrt(5), fan_in = in_channels*kh*kw.

        torch's own fan-in helper would read the 3-D weight as (locations, out, fan_in) and get it wrong.
        """
        fan_in = self.weight.shape[-1]
        gain = nn.init.calculate_gain("leaky_relu", math.sqrt(5))
        bound = gain * math.sqrt(3.0 / fan_in)  # = 1 / sqrt(fan_in), as nn.Conv2d
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels or tuple(x.shape[-2:]) != self.input_size:
            raise ModelError(
                f"LocallyConnected2d was built for inputs of shape (B, {self.in_channels}, {self.input_size[0]}, "
                f"{self.input_size[1]}) (one filter bank per output location); got {tuple(x.shape)}. "
                f"Feed it the image size it was built for."
            )
        cols = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)  # (B, C*kh*kw, L)
        out = torch.einsum("bkl,lok->bol", cols, self.weight)  # (B, C*kh*kw, L) -> (B, out, L)
        out = out.reshape(x.shape[0], self.out_channels, *self.output_size)  # (B, out, oh, ow)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"input_size={self.input_size}, stride={self.stride}, padding={self.padding}, "
                f"output_size={self.output_size}, bias={self.bias is not None}")
