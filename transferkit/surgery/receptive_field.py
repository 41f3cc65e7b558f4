"""Receptive fields computed from the ops a network actually runs: kernels, strides, dilations and padding.

A forward pass under a torch function mode tracks, per tensor and per axis, the receptive-field arithmetic
(Dumoulin & Visin; "A guide to receptive field arithmetic"): the jump j (input pixels between neighbouring
cells), the size r, and the centre s of cell 0, in input pixel coordinates (pixel centres at 0, 1, ...).

    conv / pool (kernel k, stride t, dilation d, left padding p):  k' = d(k-1)+1
        j_out = j t,   r_out = r + (k'-1) j,   s_out = s + ((k'-1)/2 - p) j
    explicit F.pad (left p):  s_out = s - p j
    elementwise ops of several maps (residual add, concat): the union of their fields

Dynamic TF "SAME" padding (timm's Conv2dSame) is an F.pad before a conv, so the padding used at this
input size is what gets counted. Global pooling (squeeze-excitation, global context) makes a cell depend on
the whole image; that is recorded in `global_context` and the local field is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

from transferkit.errors import ModelError


@dataclass(frozen=True)
class Axis:
    jump: float  # input pixels between neighbouring cells
    size: float  # receptive field, input pixels
    start: float  # centre of cell 0, input pixel coordinates

    def conv(self, kernel: int, stride: int, pad_left: float, dilation: int = 1) -> Axis:
        k = dilation * (kernel - 1) + 1
        start = self.start + ((k - 1) / 2 - pad_left) * self.jump
        return Axis(self.jump * stride, self.size + (k - 1) * self.jump, start)

    def union(self, other: Axis) -> Axis:
        if abs(self.jump - other.jump) > 1e-9:
            raise ModelError(f"cannot merge feature maps with strides {self.jump:g} and {other.jump:g}")
        lo = min(self.start - (self.size - 1) / 2, other.start - (other.size - 1) / 2)
        hi = max(self.start + (self.size - 1) / 2, other.start + (other.size - 1) / 2)
        return Axis(self.jump, hi - lo + 1, (lo + hi) / 2)


@dataclass(frozen=True)
class Field:
    """Receptive field of every cell of a (B, C, h, w) map: centres and boxes in input pixels."""

    y: Axis
    x: Axis
    shape: tuple[int, int]  # (h, w) of the map
    input_shape: tuple[int, int]
    global_context: bool = False  # some op pooled the whole image (e.g. squeeze-excitation)

    def centres(self) -> torch.Tensor:
        """(h, w, 2) cell centres as (y, x) in input pixel coordinates."""
        ys = self.y.start + self.y.jump * torch.arange(self.shape[0], dtype=torch.float64)
        xs = self.x.start + self.x.jump * torch.arange(self.shape[1], dtype=torch.float64)
        return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1)

    def boxes(self, clip: bool = False) -> torch.Tensor:
        """(h, w, 4) boxes (y0, x0, y1, x1), inclusive pixel bounds; `clip` keeps them inside the input."""
        c = self.centres()
        half = torch.tensor([(self.y.size - 1) / 2, (self.x.size - 1) / 2], dtype=torch.float64)
        box = torch.cat([c - half, c + half], -1)
        if clip:
            h, w = self.input_shape
            box = torch.stack([box[..., 0].clamp(0, h - 1), box[..., 1].clamp(0, w - 1),
                               box[..., 2].clamp(0, h - 1), box[..., 3].clamp(0, w - 1)], -1)
        return box

    def rescaled(self, input_shape: tuple[int, int]) -> Field:
        """This field in the pixels of an image of `input_shape` (h, w) that was resized to this field's input:
        pixel centres map as (c + 0.5) / f - 0.5 (Pillow's resize), sizes and jumps as 1 / f."""
        fy, fx = self.input_shape[0] / input_shape[0], self.input_shape[1] / input_shape[1]
        y = Axis(self.y.jump / fy, self.y.size / fy, (self.y.start + 0.5) / fy - 0.5)
        x = Axis(self.x.jump / fx, self.x.size / fx, (self.x.start + 0.5) / fx - 0.5)
        return Field(y, x, self.shape, tuple(input_shape), self.global_context)

    def to_dict(self) -> dict:
        return {"jump": [self.y.jump, self.x.jump], "size": [self.y.size, self.x.size],
                "start": [self.y.start, self.x.start], "shape": list(self.shape),
                "input_shape": list(self.input_shape), "global_context": self.global_context}


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[-1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _arg(args, kwargs, i: int, name: str, default):
    return args[i] if len(args) > i else kwargs.get(name, default)


class _Tracker(TorchFunctionMode):
    """Propagates an (Axis, Axis) geometry through every op. Keyed weakly by tensor: an activation is freed
    when the network drops it, so tracking costs no more memory than the forward pass itself."""

    def __init__(self) -> None:
        super().__init__()
        from torch.utils.weak import WeakIdKeyDictionary

        self.geo = WeakIdKeyDictionary()  # tensor -> (Axis, Axis)
        self.global_context = False

    def set(self, t: torch.Tensor, g: tuple[Axis, Axis]) -> None:
        self.geo[t] = g

    def get(self, t) -> tuple[Axis, Axis] | None:
        return self.geo.get(t) if isinstance(t, torch.Tensor) else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out.dim() == 4:
            g = self._rule(getattr(func, "__name__", ""), args, kwargs, out)
            if g is not None:
                self.set(out, g)
        return out

    def _inputs(self, args, kwargs) -> list[tuple[torch.Tensor, tuple[Axis, Axis]]]:
        flat = [*args, *kwargs.values()]
        flat += [t for a in flat if isinstance(a, (list, tuple)) for t in a]
        return [(t, self.get(t)) for t in flat if self.get(t) is not None]

    def _rule(self, name: str, args, kwargs, out: torch.Tensor):
        ins = self._inputs(args, kwargs)
        if not ins:
            return None
        x, (gy, gx) = ins[0]
        if name == "conv2d":
            w = _arg(args, kwargs, 1, "weight", None)
            (ky, kx), (sy, sx) = w.shape[-2:], _pair(_arg(args, kwargs, 3, "stride", 1))
            (dy, dx) = _pair(_arg(args, kwargs, 5, "dilation", 1))
            pad = _arg(args, kwargs, 4, "padding", 0)
            if isinstance(pad, str):  # 'same' pads d(k-1) in total, the smaller half first; 'valid' none
                py, px = ((dy * (ky - 1)) // 2, (dx * (kx - 1)) // 2) if pad == "same" else (0, 0)
            else:
                py, px = _pair(pad)
            return gy.conv(ky, sy, py, dy), gx.conv(kx, sx, px, dx)
        if name in ("max_pool2d", "_max_pool2d", "max_pool2d_with_indices", "avg_pool2d"):
            ky, kx = _pair(_arg(args, kwargs, 1, "kernel_size", None))
            stride = _arg(args, kwargs, 2, "stride", None)
            sy, sx = _pair(stride) if stride not in (None, [], ()) else (ky, kx)
            py, px = _pair(_arg(args, kwargs, 3, "padding", 0))
            dy, dx = _pair(_arg(args, kwargs, 4, "dilation", 1)) if name != "avg_pool2d" else (1, 1)
            return gy.conv(ky, sy, py, dy), gx.conv(kx, sx, px, dx)
        if name == "pad":
            p = list(_arg(args, kwargs, 1, "pad", ())) + [0, 0, 0, 0]
            return Axis(gy.jump, gy.size, gy.start - p[2] * gy.jump), Axis(gx.jump, gx.size, gx.start - p[0] * gx.jump)
        if out.shape[-2:] == x.shape[-2:]:  # elementwise, norms, activations, 1x1 maps broadcast in
            g = (gy, gx)
            for t, (oy, ox) in ins[1:]:
                if t.shape[-2:] == out.shape[-2:]:
                    g = (g[0].union(oy), g[1].union(ox))
            if any(t.shape[-2:] != out.shape[-2:] for t, _ in ins[1:]):
                self.global_context = True
            return g
        if out.shape[-2:] == (1, 1):  # global pooling: the whole input
            self.global_context = True
            return None
        raise ModelError(f"cannot follow the receptive field through '{name}' ({tuple(x.shape)} -> "
                         f"{tuple(out.shape)}): only convolutions, pooling, padding and elementwise ops are known")


@torch.no_grad()
def receptive_field(net: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Field]:
    """Run `net` on `x` (B, C, H, W) and return its 4-D output with the receptive field of every cell."""
    tracker = _Tracker()
    x = x.clone()
    tracker.set(x, (Axis(1.0, 1.0, 0.0), Axis(1.0, 1.0, 0.0)))
    with tracker:
        out = net(x)
    g = tracker.get(out)
    if g is None:
        raise ModelError("the network's output is not a spatial map whose cells trace back to the input")
    return out, Field(g[0], g[1], tuple(out.shape[-2:]), tuple(x.shape[-2:]), tracker.global_context)
