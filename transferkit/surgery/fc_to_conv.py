"""FC -> conv: a classifier trained at one input size becomes a fully convolutional net that returns a score map.

cs231n: an FC layer that looks at a (C, h, w) volume is a conv with an h x w kernel; later FCs are 1x1
convs. A global average pool followed by linear layers is moved after them (a linear map commutes with an
average), so every cell of the map gets the classifier's scores and the map's mean is exactly the original
logits at any input size. A global pool followed by something non-linear (max pooling, a LayerNorm as in
ConvNeXt, an MLP with ReLU, an L2-normalised probe) cannot move: it becomes a sliding window of the
training-size map, stride 1, so every cell is the original head on one training-size window (OverFeat).
`window=True` asks for that form everywhere, which is what sliding-window evaluation computes.

Every conversion is checked against the original network at the training input size before it is returned.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from transferkit.errors import ModelError
from transferkit.models.layers import Layer, forward_layers
from transferkit.models.params import PRE_LOGITS

GLOBAL_KINDS = ("avg", "max", "avgmax", "catavgmax")  # timm's pool types, as transferkit.codes.pooling names them
PARITY_ATOL = 1e-4


class GlobalPool(nn.Module):
    """Global pooling of a map to (B, C') vectors, as timm's heads and transferkit's probes do it."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind not in GLOBAL_KINDS:
            raise ModelError(f"The 'kind' parameter must be one of {', '.join(GLOBAL_KINDS)}. Got {kind!r} instead.")
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, m = x.mean((2, 3)), x.amax((2, 3))
        return {"avg": a, "max": m, "avgmax": 0.5 * (a + m), "catavgmax": torch.cat([a, m], 1)}[self.kind]


class GridPool(nn.Module):
    """transferkit's 'NxN' probe pooling: adaptive average to an N x N grid, flattened channel-major."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, self.n).flatten(1)


class WindowPool(nn.Module):
    """A global pool turned into a stride-1 sliding window of the training-size map."""

    def __init__(self, kind: str, kernel: tuple[int, int]) -> None:
        super().__init__()
        self.kind, self.kernel = kind, tuple(kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] < self.kernel[0] or x.shape[-1] < self.kernel[1]:
            raise ModelError(f"the feature map {tuple(x.shape[-2:])} is smaller than the head's window {self.kernel}: "
                             "the input is smaller than the size the network was converted at")
        a = F.avg_pool2d(x, self.kernel, stride=1) if self.kind != "max" else None
        m = F.max_pool2d(x, self.kernel, stride=1) if self.kind != "avg" else None
        return {"avg": a, "max": m, "avgmax": None if a is None or m is None else 0.5 * (a + m),
                "catavgmax": None if a is None or m is None else torch.cat([a, m], 1)}[self.kind]

    def extra_repr(self) -> str:
        return f"{self.kind}, kernel={self.kernel}, stride=1"


class ChannelNorm(nn.Module):
    """A LayerNorm or L2 normalisation of (B, C) vectors, applied to each cell of a (B, C, h, w) map."""

    def __init__(self, norm: nn.Module | None) -> None:
        super().__init__()
        self.norm = norm  # nn.LayerNorm over C, or None for L2 normalisation (sklearn's Normalizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is None:
            return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class L2Normalize(nn.Module):
    """scikit-learn's Normalizer on (B, D) vectors (a probe with scaling='l2')."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


class FullyConvNet(nn.Module):
    """trunk -> converted head: (B, 3, H, W) images -> (B, K, h, w) class scores, for any H, W the trunk takes.

    `mean_is_logits`: the spatial mean of the map equals the original network's logits at every input size
    (the pooled-linear case); otherwise the map is 1x1 at the training size and each cell is one window.
    """

    def __init__(self, trunk: nn.Module, head: nn.Sequential, input_size: tuple[int, int], mean_is_logits: bool,
                 parity_error: float = math.nan) -> None:
        super().__init__()
        self.trunk, self.head = trunk, head
        self.input_size = tuple(input_size)
        self.mean_is_logits = mean_is_logits
        self.parity_error = parity_error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if not self.mean_is_logits and (h < self.input_size[0] or w < self.input_size[1]):
            raise ModelError(f"input {w}x{h} is smaller than the network's receptive field here, the "
                             f"{self.input_size[1]}x{self.input_size[0]} window every cell classifies")
        try:
            return self.head(self.trunk(x))
        except RuntimeError as e:
            raise ModelError(f"input {w}x{h} is too small for this network: {str(e).splitlines()[0]}") from e

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Scores averaged over the map: the original logits at the training size (and at any size if
        `mean_is_logits`)."""
        return self(x).mean((2, 3))


class Features(nn.Module):
    """A timm model's forward_features (the convolutional trunk)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


class Intermediate(nn.Module):
    """A timm model's feature map after stage `layer` (transferkit.models.layers.forward_layers)."""

    def __init__(self, model: nn.Module, layer: Layer) -> None:
        super().__init__()
        self.model, self.layer = model, layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return forward_layers(self.model, x, [self.layer], final=False)[1][self.layer.name]


def _size(input_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(int(s) for s in input_size)[-2:]
    if len(size) != 2 or min(size) < 1:
        raise ModelError(f"The 'input_size' parameter must be N or (H, W). Got {input_size!r} instead.")
    return size


def _flat_ops(modules) -> list[nn.Module]:
    ops = []
    for m in modules:
        ops += _flat_ops(m) if isinstance(m, nn.Sequential) else [m]
    return ops


def timm_head_ops(model: nn.Module) -> list[nn.Module]:
    """What a timm CNN runs after forward_features, in order, as modules (checked by parity afterwards)."""
    from timm.layers import SelectAdaptivePool2d

    ops = []
    if isinstance(getattr(model, "pre_logits", None), nn.Module):  # VGG's ConvMlp: fc6/fc7 already convs
        ops.append(model.pre_logits)
    head = getattr(model, "head", None)
    if isinstance(head, nn.Module) and hasattr(head, "global_pool") and hasattr(head, "fc"):
        return ops + _flat_ops(head.children())  # ClassifierHead / NormMlpClassifierHead run children in order
    pool = getattr(model, "global_pool", None)  # SelectAdaptivePool2d, or Identity under a 'local' head
    if isinstance(pool, (SelectAdaptivePool2d, nn.Identity)) and hasattr(model, "get_classifier"):
        return ops + [model.global_pool, *_flat_ops([model.get_classifier()])]
    raise ModelError(f"{type(model).__name__} has no head transferkit can convert (expected a timm CNN with a "
                     "global pool and a classifier, or an nn.Sequential with Flatten + Linear; attention models "
                     "with fixed position embeddings, such as ViT, have no sliding convolutional form)")


def _global_kind(op: nn.Module) -> str | None:
    """The kind of a global pooling module, or None if `op` is not one."""
    from timm.layers import SelectAdaptivePool2d

    if isinstance(op, GlobalPool):
        return op.kind
    if isinstance(op, SelectAdaptivePool2d) and op.pool_type:
        kind = op.pool_type.replace("fast", "")
        if kind not in GLOBAL_KINDS:
            raise ModelError(f"global pooling '{op.pool_type}' cannot be converted")
        return kind
    if isinstance(op, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and _size(op.output_size) == (1, 1):
        return "avg" if isinstance(op, nn.AdaptiveAvgPool2d) else "max"
    return None


_LINEAR_AFTER_POOL = (nn.Linear, nn.Dropout, nn.Identity, nn.Flatten)


def _conv_from_linear(fc: nn.Linear, c: int, kernel: tuple[int, int], dilation: tuple[int, int]) -> nn.Conv2d:
    """The Linear's weight reshaped (out, C*h*w) -> (out, C, h, w), not retrained."""
    if fc.in_features != c * kernel[0] * kernel[1]:
        raise ModelError(f"{fc} expects {fc.in_features} inputs but the map before it gives {c}x{kernel[0]}x"
                         f"{kernel[1]} = {c * kernel[0] * kernel[1]}")
    conv = nn.Conv2d(c, fc.out_features, kernel, dilation=dilation, bias=fc.bias is not None)
    with torch.no_grad():
        conv.weight.copy_(fc.weight.reshape(fc.out_features, c, *kernel))
        if fc.bias is not None:
            conv.bias.copy_(fc.bias)
    return conv


@torch.no_grad()
def convert_ops(ops: list[nn.Module], fmap: torch.Tensor, window: bool = False) -> tuple[nn.Sequential, bool]:
    """Convert a head (modules run in order on `fmap`, the trunk's map at the training size) to convolutions.

    Returns the converted head and whether the map's mean equals the logits at every size.
    """
    kinds = [_global_kind(op) for op in ops]
    pools = [i for i, k in enumerate(kinds) if k is not None] + [i for i, op in enumerate(ops)
                                                                 if isinstance(op, GridPool)]
    if len(pools) > 1:
        raise ModelError("a head with more than one global pooling cannot be converted")
    at = pools[0] if pools else None
    movable = (at is not None and kinds[at] == "avg" and not window
               and all(isinstance(op, _LINEAR_AFTER_POOL) for op in ops[at + 1:]))
    out: list[nn.Module] = []
    flat: tuple[int, int, int] | None = None  # (C, h, w) when a Flatten has been seen
    dilation = (1, 1)
    after_moved_pool = False
    for i, op in enumerate(ops):
        if isinstance(op, (nn.Dropout, nn.Identity)):
            continue  # inference: identity
        if i == at and isinstance(op, GridPool):
            h, w = fmap.shape[-2:]
            if h % op.n or w % op.n:
                raise ModelError(f"grid pooling {op.n}x{op.n} over a {h}x{w} map has unequal cells; convert at an "
                                 f"input size whose final map divides by {op.n}")
            cell = (h // op.n, w // op.n)
            out.append(WindowPool("avg", cell))
            fmap = out[-1](fmap)
            flat, dilation = (fmap.shape[1], op.n, op.n), cell
            continue
        if i == at:
            if movable:
                after_moved_pool = True  # the mean over the final map does the pooling
            else:
                out.append(WindowPool(kinds[i], tuple(fmap.shape[-2:])))
                fmap = out[-1](fmap)
            continue
        if isinstance(op, nn.Flatten):
            if not after_moved_pool and flat is None:
                flat = tuple(fmap.shape[1:])
            continue
        if isinstance(op, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            if _size(op.output_size) == tuple(fmap.shape[-2:]):
                continue  # an identity at this size (AlexNet's 6x6 avgpool at 224)
            raise ModelError(f"{op} resizes the {tuple(fmap.shape[-2:])} map: it has no fixed-stride conv equivalent")
        if isinstance(op, nn.Linear):
            c, kh, kw = flat if flat is not None else (fmap.shape[1], 1, 1)
            conv = _conv_from_linear(op, c, (kh, kw), dilation)
            flat, dilation = None, (1, 1)
            out.append(conv)
            fmap = conv(fmap)
            continue
        module, fmap = _map_op(op, fmap, flat)
        out.append(module)
    if flat is not None:
        raise ModelError("the head ends with a Flatten and no Linear after it: nothing to convert")
    return nn.Sequential(*out), movable


def _map_op(op: nn.Module, fmap: torch.Tensor, flat: tuple | None) -> tuple[nn.Module, torch.Tensor]:
    """A head layer that is not a pool, Flatten or Linear, as a module that works on feature maps, and its
    output on `fmap`: norms over features become norms over channels; anything else must already take maps."""
    if type(op) is nn.LayerNorm and tuple(op.normalized_shape) == (fmap.shape[1],):  # timm's LayerNorm2d
        # subclasses it but already normalises maps over channels: it takes the generic path below
        module = ChannelNorm(op)
        return module, module(fmap)
    if isinstance(op, L2Normalize):
        module = ChannelNorm(None)
        return module, module(fmap)
    if type(op).__name__ == "LocallyConnected2d":
        raise ModelError("a LocallyConnected2d head has one filter per location of the training-size map: "
                         "it has no sliding (shared-weight) equivalent on larger inputs")
    if flat is not None:
        raise ModelError(f"cannot express {type(op).__name__} between Flatten and Linear as a convolution")
    try:
        y = op(fmap)
    except RuntimeError as e:  # torch's "output size is too small" and kin
        raise ModelError(f"{type(op).__name__} fails on the {tuple(fmap.shape[-2:])} feature map (input too "
                         f"small for this network?): {str(e).splitlines()[0]}") from e
    except Exception as e:  # noqa: BLE001 - the layer's own error says why it rejects a map
        raise ModelError(f"cannot express the head layer {type(op).__name__} as a convolution: it does not "
                         f"accept a feature map ({type(e).__name__}: {e})") from e
    if y.dim() != 4:
        raise ModelError(f"cannot express the head layer {type(op).__name__} as a convolution: it turns a map "
                         f"into shape {tuple(y.shape)}")
    return op, y


def _probe_input(size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def fc_to_conv(model: nn.Module, input_size: int | tuple[int, int], *, window: bool = False) -> FullyConvNet:
    """A fully convolutional copy of `model` (a timm CNN or an nn.Sequential with Flatten + Linear).

    `input_size` is the size the classifier was trained at: it fixes the kernel of an FC after a Flatten
    and the window of a pool that cannot be moved. The result's mean map equals `model(x)` at that size
    (checked here, fp32, on a random input).
    """
    import copy

    size = _size(input_size)
    model = copy.deepcopy(model).eval().float()
    if isinstance(model, nn.Sequential):
        trunk, ops = nn.Identity(), _flat_ops(model)
    elif hasattr(model, "forward_features"):
        trunk, ops = Features(model), timm_head_ops(model)
    else:
        raise ModelError(f"{type(model).__name__} is neither a timm CNN nor an nn.Sequential: cannot convert")
    return _assemble(trunk, ops, size, window, reference=model)


@torch.no_grad()
def _assemble(trunk: nn.Module, ops: list[nn.Module], size: tuple[int, int], window: bool, reference) -> FullyConvNet:
    x = _probe_input(size)
    try:
        fmap = trunk(x)
    except RuntimeError as e:
        raise ModelError(f"input size {size} is too small for this network: {e}") from e
    head, movable = convert_ops(ops, fmap, window)
    net = FullyConvNet(trunk, head, size, movable).eval()
    want = reference(x)  # once (each forward of the network costs ~0.5 s at 224 on 2 cores: loads pay for them)
    got = head(fmap).mean((2, 3))  # net.logits(x), the trunk's map reused
    if got.shape != want.shape:
        raise ModelError(f"converted head gives {tuple(got.shape)} scores, the original {tuple(want.shape)}")
    err = float((got.double() - want.double()).abs().max())
    scale = float(want.abs().max()) + 1.0
    if not err <= PARITY_ATOL * scale:
        raise ModelError(f"the converted network differs from the original by {err:.3g} at {size}: its head runs "
                         "something transferkit does not model; cannot convert")
    net.parity_error = err
    return net


def probe_head(coef: np.ndarray, intercept: np.ndarray, pool: str, scale_mean: np.ndarray | None = None,
               scale_scale: np.ndarray | None = None, l2: bool = False, pair: bool = True) -> list[nn.Module]:
    """The modules that compute a probe's SVM scores from a feature map: pool, [L2], Linear (scaler folded in).

    A StandardScaler is affine, so W((x - mean) / scale) + b = (W / scale) x + (b - W (mean / scale)).
    A binary SVM's single score s becomes two columns (-s, s), as `transferkit predict` reports it (`pair`;
    not for a multi-label probe, whose one row is its one label).
    """
    w, b = np.asarray(coef, np.float64), np.asarray(intercept, np.float64)
    if scale_mean is not None:
        w, b = w / scale_scale, b - (w / scale_scale) @ scale_mean
    if w.shape[0] == 1 and pair:
        w, b = np.concatenate([-w, w]), np.concatenate([-b, b])
    linear = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(w))
        linear.bias.copy_(torch.from_numpy(b))
    pooling = [GridPool(int(pool.split("x")[0]))] if pool[0].isdigit() else [GlobalPool(pool)]
    return [*pooling, *([L2Normalize()] if l2 else []), linear]


def probe_to_conv(backbone: nn.Module, layer: Layer, ops: list[nn.Module],
                  input_size: int | tuple[int, int], *, window: bool = False) -> FullyConvNet:
    """A probe on `layer` of `backbone` (pre_logits: the final map) as a fully convolutional net.

    `ops` are the probe's head modules (see `probe_head`); for pre_logits with 'avg' pass the model's own
    head ops without its classifier followed by the Linear.
    """
    backbone = backbone.eval().float()
    trunk = Features(backbone) if layer.name == PRE_LOGITS else Intermediate(backbone, layer)
    reference = nn.Sequential(trunk, *ops).eval()
    return _assemble(trunk, ops, _size(input_size), window, reference=reference)
