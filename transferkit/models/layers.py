"""One vocabulary for the places in a network: its stages, as `--layer`, `--freeze-until`, the sweep and recipes
name and count them, and how to read each stage's feature map.

The stages are timm's coarse layer groups (`group_matcher(coarse=True)`: stem, blocks, head; transferkit.models.
stages), so index i is the same stage for every command. A stage's feature map is the output of its last module:
read through timm's `forward_intermediates` where timm lists the stage in `feature_info` (the layers codes were
always read from, bit for bit as before), else through a forward hook on that module. The head has no feature map
of its own: its pooled features are the named layer 'pre_logits'.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from transferkit.errors import ModelError, ParameterError
from transferkit.models.params import PRE_LOGITS
from transferkit.models.stages import eval_no_grad, list_stages, stage_map, stage_refusal
from transferkit.models.vocabulary import SPEC, write_vocabulary

ALL = "all"  # timm's feature_info stages and pre_logits: what `--layer auto` sweeps
DRY_RUN_SIDE = 64  # input side of the dry run that measures hooked maps: a multiple of every usual stride (32)


@dataclass(frozen=True)
class Layer:
    """A stage of the network (or pre_logits) and, where it has one, its feature map."""

    name: str  # the stage name ('blocks.4', 'layer2', 'stem', 'head') or 'pre_logits'
    stage: int | None  # the stage index (list_stages, --freeze-until); None for pre_logits
    channels: int | None  # None: no feature map (the head, a ViT's token stem)
    reduction: int | None  # input pixels per feature-map cell along one side
    n_params: int | None = None  # the stage's parameters; None for pre_logits (they belong to 'head')
    feature: int | None = None  # index into timm's feature_info: read with forward_intermediates
    module: str | None = None  # else the module whose output is the map (read with a forward hook)

    @property
    def has_map(self) -> bool:
        """Whether codes can be pooled from this layer."""
        return self.channels is not None


def model_layers(model: nn.Module, measure: bool = True) -> list[Layer]:
    """Every stage in network order (stem first, head last), then pre_logits.

    `measure=False` skips the dry run that sizes the maps of stages outside feature_info (their channels and
    reduction stay None until `_measured`): resolving a feature_info layer needs no forward pass."""
    stages, stage_of = stage_map(model)
    module_stage = _module_stages(model, stage_of)
    features: dict[int, tuple[int, dict]] = {}  # stage -> (feature_info index, entry); the last entry wins
    for i, d in enumerate(_feature_info(model)):
        s = module_stage.get(d["module"])
        if s is not None and s < len(stages) - 1:  # an entry in the head (e.g. a final norm) is pre_logits' map
            features[s] = (i, d)
    hooked = {s.index: _output_module(model, s.name, s.index, module_stage) for s in stages[:-1]
              if s.index not in features}
    shapes = _map_shapes(model, [m for m in hooked.values() if m is not None]) if measure else {}
    layers = []
    for s in stages:
        if s.index in features:
            i, d = features[s.index]
            layers.append(Layer(s.name, s.index, d["num_chs"], d["reduction"], s.n_params, feature=i))
        else:
            module = hooked.get(s.index)
            channels, reduction = shapes.get(module, (None, None))
            layers.append(Layer(s.name, s.index, channels, reduction, s.n_params, module=module))
    info = _feature_info(model)
    return [*layers, Layer(PRE_LOGITS, None, model.num_features, info[-1]["reduction"] if info else 32)]


def _feature_info(model: nn.Module) -> list[dict]:
    info = getattr(model, "feature_info", None) or []
    return info.get_dicts() if hasattr(info, "get_dicts") else list(info)


def feature_module(model: nn.Module, index: int) -> str:
    """The module of entry `index` of timm's feature_info: the layer files written before the stages were the one
    vocabulary meant by that index (codes were named after it)."""
    info = _feature_info(model)
    if not -len(info) <= index < len(info):
        raise ModelError(f"{type(model).__name__} has {len(info)} feature_info stages; there is no stage {index}")
    return info[index]["module"]


def _module_stages(model: nn.Module, stage_of: dict[str, int]) -> dict[str, int]:
    """The stage of every module: the last of its parameters' stages; a module without parameters (an activation,
    a pool) belongs to the stage of the parameters registered before it."""
    stages, current = {}, 0
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        own = [stage_of[prefix + n] for n, _ in module.named_parameters() if prefix + n in stage_of]
        stages[name] = max(own) if own else current
        direct = [stage_of[prefix + n] for n, _ in module.named_parameters(recurse=False) if prefix + n in stage_of]
        current = max(direct) if direct else current
    return stages


def _output_module(model: nn.Module, name: str, stage: int, module_stage: dict[str, int]) -> str | None:
    """The module whose output is the stage's: the module of the stage's name ('blocks.3'), else the last
    top-level module in that stage (a stem of conv_stem, bn1: 'bn1')."""
    modules = dict(model.named_modules())
    if name in modules:
        return name
    own = [n for n, m in model.named_children() if module_stage.get(n) == stage and any(True for _ in m.parameters())]
    return own[-1] if own else None


def _map_shapes(model: nn.Module, modules: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(channels, reduction) of each module's output, from a dry run; a module whose output is not a
    (B, C, H, W) map (a ViT's tokens) is left out.

    The run is at 64 px (a twelfth of the work at 224), or the model's own input size where it needs that."""
    if not modules:
        return {}
    own = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    for size in ((own[0], DRY_RUN_SIDE, DRY_RUN_SIDE), own):
        try:
            seen = _outputs(model, modules, size)
            break
        except (RuntimeError, AssertionError, ValueError):  # e.g. a ViT's fixed patch grid
            if size == own:
                raise
    shapes = {m: tuple(out.shape) for m, out in seen.items() if torch.is_tensor(out) and out.ndim == 4}
    return {m: (shape[1], size[-1] // shape[-1]) for m, shape in shapes.items() if _channels_first(shape, size)}


def _outputs(model: nn.Module, modules: Sequence[str], size: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The output of each of `modules` when the network runs on one zero image of `size` (C, H, W)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(m).register_forward_hook(_keep(seen, m)) for m in modules]
    p = next(model.parameters())
    try:
        with eval_no_grad(model):
            model.forward_features(torch.zeros(1, *size, dtype=p.dtype, device=p.device))
    finally:
        for h in handles:
            h.remove()
    return seen


def _channels_first(shape: tuple[int, ...], size: tuple[int, ...]) -> bool:
    """Whether (B, ?, ?, ?) is a (B, C, H, W) map of an (H, W) input: the same whole stride along both sides (a
    ViT's (B, H, W, C) patch grid is not)."""
    h, w = shape[-2:]
    return size[-2] % h == 0 and size[-1] % w == 0 and size[-2] // h == size[-1] // w


def _keep(into: dict[str, torch.Tensor], name: str):
    """A forward hook that stores the module's output under `name` (and returns None: the output is unchanged)."""
    def hook(_module: nn.Module, _args, out) -> None:
        into[name] = out
    return hook


def resolve_layers(model: nn.Module, spec: str | int) -> list[Layer]:
    """Parse `layer`: a stage index or name (as `transferkit layers` lists them), 'pre_logits', 'all' (timm's
    feature stages and pre_logits: what the sweep tries), or a comma list of these."""
    layers = model_layers(model, measure=False)
    text = str(spec).strip()
    if "," in text:
        chosen = {la.name: la for part in text.split(",") for la in resolve_layers(model, part)}
        order = {la.name: i for i, la in enumerate(layers)}
        last = len(layers)  # a legacy name of a map timm files under the head (DenseNet's final norm): at the end
        return sorted(chosen.values(), key=lambda la: (order.get(la.name, last if la.stage is None else la.stage),
                                                       la.stage is None))
    if text == ALL:
        return [la for la in layers if la.feature is not None or la.name == PRE_LOGITS]
    if text.replace("_", "-") == "pre-logits":
        return [layers[-1]]
    stages = layers[:-1]
    found = next((la for la in stages if text == la.name), None)
    if found is None and text.isascii() and text.isdigit() and int(text) < len(stages):  # as --freeze-until counts
        found = stages[int(text)]
    if found is None:
        found = _legacy_name(model, layers, text)
    if found is not None and found.module is not None:
        found = _measured(model, found)
    if found is not None and found.has_map:
        return [found]
    why = (f"'{found.name}' has no feature map (its pooled features are 'pre_logits'); " if found is not None and
           found.name == stages[-1].name else f"'{found.name}' has no feature map; " if found is not None else "")
    remember_vocabulary(model)  # a refused value: the next bad one is refused before torch loads
    raise layer_refusal(model, spec, why)


def layer_refusal(model: nn.Module, spec: object, why: str = "") -> ParameterError:
    """The error for a `layer` value `model` does not have (`why`: the reason, when it names a stage)."""
    choices = ", ".join(f"{la.stage} ({la.name})" for la in model_layers(model)[:-1] if la.has_map)
    return ParameterError(f"The 'layer' parameter must be a stage index or name of {_arch(model)}: {choices}; or "
                          f"'pre_logits', 'all', or a comma list. {why}Got '{spec}' instead.", param="layer")


def _arch(model: nn.Module) -> str:
    return model.pretrained_cfg.get("architecture", type(model).__name__)


def remember_vocabulary(model: nn.Module) -> None:
    """Write `model`'s vocabulary under the cache root (models.vocabulary), so the CLI refuses an unknown value
    next time without torch."""
    write_vocabulary(vocabulary(model))


def vocabulary(model: nn.Module) -> dict:
    """The `layer` and `freeze_until` values `model` accepts, and the messages for the rest. Stage names without
    a map are kept as accepted: the library refuses them with its reason."""
    stages = list_stages(model)
    names = [*(s.name for s in stages), *(str(s.index) for s in stages)]
    accepted = {"layer": [*names, *(d["module"] for d in _feature_info(model))], "freeze_until": names}
    messages = {"layer": str(layer_refusal(model, SPEC)), "freeze_until": str(stage_refusal(stages, SPEC))}
    return {"model": _arch(model), "accepted": accepted, "messages": messages}


def _measured(model: nn.Module, layer: Layer) -> Layer:
    """`layer` (a hooked stage) with the channels and reduction of its map, if its output is one."""
    channels, reduction = _map_shapes(model, [layer.module]).get(layer.module, (None, None))
    return replace(layer, channels=channels, reduction=reduction)


def _legacy_name(model: nn.Module, layers: list[Layer], name: str) -> Layer | None:
    """A timm feature_info module named otherwise than its stage (ResNet's 'act1' is stage 'stem'), as files
    written before the stages were the one vocabulary name it: the same codes, under the name they were saved as."""
    for i, d in enumerate(_feature_info(model)):
        if d["module"] == name:
            stage = next((la.stage for la in layers if la.feature == i), None)
            return Layer(name, stage, d["num_chs"], d["reduction"], None, feature=i)
    return None


def layer_table(model: nn.Module) -> str:
    """The stages `--layer` and `--freeze-until` accept, one row each (`transferkit layers`, `--list-stages`).

    '*' marks the layers `--layer all` / `auto` extract and the sweep ranks.
    """
    remember_vocabulary(model)  # who reads the table may type a value next: it is checked before torch loads
    rows = [f"{'index':>5}  {'name':<24} {'channels':>8} {'stride':>6} {'params':>12}  sweep"]
    for la in model_layers(model):
        swept = "*" if la.feature is not None or la.name == PRE_LOGITS else ""
        index, params = "" if la.stage is None else la.stage, "" if la.n_params is None else f"{la.n_params:,}"
        channels, stride = ("-", "-") if la.channels is None else (la.channels, la.reduction)
        rows.append(f"{index:>5}  {la.name:<24} {channels:>8} {stride:>6} {params:>12}  {swept}".rstrip())
    return "\n".join(rows)


def forward_layers(model: nn.Module, x: torch.Tensor, layers: Sequence[Layer],
                   final: bool) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """One forward pass -> (the final feature map if `final`, else None; {layer name: its feature map}).

    Layers timm lists in feature_info come from `forward_intermediates` (stopping after the last one when
    nothing later is needed), the others from forward hooks on their output modules.
    """
    indexed = {la.feature: la.name for la in layers if la.feature is not None}
    hooked = {la.module: la.name for la in layers if la.feature is None and la.name != PRE_LOGITS}
    maps: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(m).register_forward_hook(_keep(maps, name)) for m, name in hooked.items()]
    try:
        last = None
        if indexed:
            idx = sorted(indexed)
            early = not final and not hooked  # a hooked module may come after the last index
            out = model.forward_intermediates(x, indices=idx, intermediates_only=not final, stop_early=early)
            last, inter = out if final else (None, out)
            maps.update({indexed[i]: fmap for i, fmap in zip(idx, inter)})
        elif final or hooked:
            last = model.forward_features(x)
    finally:
        for h in handles:
            h.remove()
    return (last if final else None), maps
