"""Layer summary (output shape, parameters, MACs per layer) and the output-size arithmetic behind it.

Output size of a convolution or pooling along one axis, input W, kernel F, stride S, padding P,
dilation D (effective kernel D*(F-1)+1):

    explicit padding (PyTorch, Caffe; VALID when P = 0):  floor((W - F + 2P) / S) + 1
    TensorFlow SAME (timm's Conv2dSame, tf_* models):      ceil(W / S)

SAME pads max((ceil(W/S) - 1)*S + F - W, 0) in total, the odd pixel at the bottom/right.

MACs (multiply-accumulates) are counted for Conv2d (timm's Conv2dSame included), Linear and
LocallyConnected2d; every other layer (BatchNorm, activations, pooling, additions) counts 0, which is
how the published figures (timm, torchvision, papers) count them too. FLOPs = 2 x MACs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from transferkit.errors import ModelError, ParameterError
from transferkit.models.locally_connected import LocallyConnected2d


def _check_ints(**values: int) -> None:
    minimum = {"padding": 0}
    for name, value in values.items():
        low = minimum.get(name, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ParameterError(f"The '{name}' parameter must be an integer >= {low}. Got {value!r} instead.",
                                 param=name)


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """floor((W - F + 2P) / S) + 1 cells along one axis: explicit padding, VALID when P = 0."""
    _check_ints(size=size, kernel=kernel, stride=stride, padding=padding, dilation=dilation)
    span = dilation * (kernel - 1) + 1
    if size + 2 * padding < span:
        raise ModelError(f"a kernel spanning {span} pixels does not fit an input of {size} pixels with padding "
                         f"{padding}: (W - F + 2P) / S + 1 = ({size} - {span} + {2 * padding}) / {stride} + 1 < 1")
    return (size - span + 2 * padding) // stride + 1


def same_output_size(size: int, stride: int) -> int:
    """ceil(W / S) cells along one axis: TensorFlow's SAME padding, whatever the kernel."""
    _check_ints(size=size, stride=stride)
    return -(-size // stride)


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """(before, after) padding of TF SAME along one axis; the odd pixel goes after (bottom/right)."""
    _check_ints(size=size, kernel=kernel, stride=stride, dilation=dilation)
    total = max((same_output_size(size, stride) - 1) * stride + dilation * (kernel - 1) + 1 - size, 0)
    return total // 2, total - total // 2


def layer_macs(module: nn.Module, output: torch.Tensor) -> int:
    """Multiply-accumulates of one call of `module` that produced `output` (batch of 1); 0 for other layers."""
    if isinstance(module, nn.Conv2d):  # each output element: (C_in / groups) * kh * kw products
        kh, kw = module.kernel_size
        return output.numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):  # out_features * in_features per row
        return output.numel() * module.in_features
    if isinstance(module, LocallyConnected2d):
        kh, kw = module.kernel_size
        return output.numel() * module.in_channels * kh * kw
    return 0


@dataclass(frozen=True)
class LayerRow:
    """One call of one layer, in execution order."""

    name: str
    kind: str  # class name
    output_shape: tuple[int, ...] | None  # None when the layer returns no single tensor
    trainable: int  # parameters of this layer itself; 0 on later calls of a reused layer
    frozen: int
    macs: int


@dataclass(frozen=True)
class ModelSummary:
    """Per-layer rows and totals of one forward pass of a zero image of `input_shape`."""

    title: str
    input_shape: tuple[int, int, int, int]  # (1, C, H, W)
    rows: list[LayerRow]
    total_params: int
    trainable_params: int

    @property
    def macs(self) -> int:
        return sum(r.macs for r in self.rows)

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def table(self) -> str:
        """Aligned text: one line per layer call, then the totals."""
        name_w = max([len("layer"), *(len(r.name) for r in self.rows)])
        kind_w = max([len("type"), *(len(r.kind) for r in self.rows)])
        head = f"{'layer':<{name_w}}  {'type':<{kind_w}}  {'output':<18} {'trainable':>11} {'frozen':>11} {'MACs':>14}"
        lines = [self.title, head, "-" * len(head)]
        for r in self.rows:
            shape = "x".join(map(str, r.output_shape)) if r.output_shape else "-"
            lines.append(f"{r.name:<{name_w}}  {r.kind:<{kind_w}}  {shape:<18} {r.trainable:>11,} {r.frozen:>11,} "
                         f"{r.macs:>14,}")
        frozen = self.total_params - self.trainable_params
        lines += ["-" * len(head),
                  f"input: {'x'.join(map(str, self.input_shape))}",
                  f"params: {self.total_params:,} total, {self.trainable_params:,} trainable, {frozen:,} frozen",
                  f"MACs: {self.macs:,} ({self.macs / 1e9:.3f} G); FLOPs (2 x MACs): {self.flops:,} "
                  f"({self.flops / 1e9:.3f} G); only Conv2d, Linear and LocallyConnected2d count"]
        return "\n".join(lines)


def summarize(model: nn.Module, image_size: int | tuple[int, int], title: str = "") -> ModelSummary:
    """Run one zero image of `image_size` through `model` (eval mode, no grad) and record every layer.

    A layer is a module without children or with parameters of its own (e.g. timm's BatchNormAct2d);
    rows follow the order in which layers start. Raises ParameterError naming `image_size` when the
    network cannot run at that size.
    """
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else ()
    if len(size) != 2:
        raise ParameterError(f"The 'image_size' parameter must be an integer or a pair (H, W) of them. "
                             f"Got {image_size!r} instead.", param="image_size")
    _check_ints(image_size=size[0])
    _check_ints(image_size=size[1])
    recorder = _Recorder(model)
    modes = [(m, m.training) for m in model.modules()]  # e.g. frozen BatchNorms in eval inside a training model
    param = next(model.parameters(), None)
    channels = next((m.in_channels for m in model.modules() if isinstance(m, (nn.Conv2d, LocallyConnected2d))), 3)
    x = torch.zeros(1, channels, *size, device=None if param is None else param.device)
    try:
        with torch.no_grad():
            model.eval()(x)
    except (RuntimeError, AssertionError, ModelError) as e:
        where = recorder.current()
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        raise ParameterError(f"The 'image_size' parameter {size[0]} x {size[1]} does not fit {arch}: "
                             f"layer '{where}' failed: {message}. Try a larger size.", param="image_size") from e
    finally:
        recorder.remove()
        for module, training in modes:
            module.training = training
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ModelSummary(title, tuple(x.shape), recorder.rows(), total, trainable)


class _Recorder:
    """Forward pre/post hooks on every layer: start order, output shapes, parameters and MACs."""

    def __init__(self, model: nn.Module):
        self.calls: list[dict] = []
        self.open: list[dict] = []
        self.counted: set[int] = set()
        self.handles = []
        for name, module in model.named_modules():
            if next(module.children(), None) is None or next(module.parameters(recurse=False), None) is not None:
                self.handles.append(module.register_forward_pre_hook(self._pre(name or type(module).__name__)))
                self.handles.append(module.register_forward_hook(self._post))

    def _pre(self, name: str):
        def hook(module: nn.Module, args) -> None:
            first = id(module) not in self.counted
            self.counted.add(id(module))
            own = list(module.parameters(recurse=False)) if first else []
            call = {"name": name, "kind": type(module).__name__, "shape": None, "macs": 0,
                    "trainable": sum(p.numel() for p in own if p.requires_grad),
                    "frozen": sum(p.numel() for p in own if not p.requires_grad)}
            self.calls.append(call)
            self.open.append(call)
            _check_fits(module, args)
        return hook

    def _post(self, module: nn.Module, args, output) -> None:
        call = self.open.pop()
        if isinstance(output, torch.Tensor):
            call["shape"], call["macs"] = tuple(output.shape), layer_macs(module, output)

    def current(self) -> str:
        return self.open[-1]["name"] if self.open else "(before the first layer)"

    def rows(self) -> list[LayerRow]:
        return [LayerRow(c["name"], c["kind"], c["shape"], c["trainable"], c["frozen"], c["macs"])
                for c in self.calls]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _check_fits(module: nn.Module, args) -> None:
    """Before a plain conv or pool runs: does its window fit the map it gets? (Clearer than torch's error.)"""
    if type(module) not in (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d) or not args or args[0].ndim != 4:
        return
    pairs = [_as_pair(getattr(module, attr, 1)) for attr in ("kernel_size", "stride", "padding", "dilation")]
    if isinstance(module.padding, str):  # nn.Conv2d(padding='same'/'valid')
        pairs[2] = (0, 0) if module.padding == "valid" else (-1, -1)
    for axis, n in enumerate(args[0].shape[-2:]):
        k, s, p, d = (pair[axis] for pair in pairs)
        if p >= 0 and n + 2 * p < d * (k - 1) + 1:
            raise ModelError(f"its kernel {k} (stride {s}, padding {p}, dilation {d}) does not fit its "
                             f"{tuple(args[0].shape[-2:])} input map: (W - F + 2P) / S + 1 < 1")


def _as_pair(value) -> tuple:
    return (value, value) if isinstance(value, (int, str)) else tuple(value)


def load_for_summary(model: str) -> tuple[nn.Module, str, tuple[int, int]]:
    """A timm model name (random weights: shapes and counts do not depend on them), a fine-tuning run, or a
    probe (its backbone, at the size its codes were made).

    Returns the model, a one-line description, and its natural input size (pretrained, or the run's).
    """
    import timm
    import timm.data

    if Path(model).is_dir():
        from transferkit.finetune.loop import freeze_until, resolve_stage
        from transferkit.finetune.rundir import load_finetuned
        from transferkit.probe.ensemble import refuse_ensemble
        from transferkit.probe.saved import is_probe_dir, load_probe_meta

        refuse_ensemble(model, "summary")
        if is_probe_dir(model):
            extra = load_probe_meta(model)
            net, _, natural = load_for_summary(extra["model"])
            size = extra.get("image_size")
            title = (f"probe '{model}': a linear SVM on the {extra['key']} codes of {extra['model']} (the backbone, "
                     "weights random: shapes, parameter counts and MACs do not depend on them)")
            return net, title, natural if size is None else tuple(_as_pair(size))
        net, meta = load_finetuned(model)
        config = meta["config"]
        freeze_until(net, resolve_stage(net, config["freeze_until"]))  # trainable/frozen as in training
        title = (f"run '{model}': {config['model']}, head {config['head']}, frozen until {config['freeze_until']}, "
                 f"weights from {net.weights_info.location}")
        return net, title, tuple(meta["transform"]["input_size"][-2:])
    from transferkit.models.backbones import check_model_name

    check_model_name(model)
    net = timm.create_model(model, pretrained=False).eval()  # what create_backbone(weights="random") builds
    title = f"{model} (weights: random; shapes, parameter counts and MACs do not depend on them)"
    return net, title, tuple(timm.data.resolve_model_data_config(net)["input_size"][-2:])


def summarize_model(model: str, image_size: int | tuple[int, int] | None = None) -> ModelSummary:
    """What `transferkit summary` prints: MODEL by name or run directory, at `image_size` (None: its own)."""
    net, title, natural = load_for_summary(model)
    return summarize(net, natural if image_size is None else image_size, title)

