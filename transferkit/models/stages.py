"""What fine-tuning trains and how fast: coarse layer stages, freezing, a new head, per-stage learning rates."""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from transferkit.errors import ModelError, ParameterError
from transferkit.models.params import HEAD, HEADS, PRE_LOGITS  # noqa: F401  (HEADS: re-exported)
from transferkit.runtime.params import validate

log = logging.getLogger(__name__)

LOCAL_CHANNELS = 32  # filters per location of the local head


@dataclass(frozen=True)
class Stage:
    """A coarse layer group: what --freeze-until and per-stage learning rates count in."""

    name: str
    index: int
    n_params: int


def _param_labels(model: nn.Module, coarse: bool) -> tuple[dict[str, int], dict[str, str]]:
    """timm's group id of every parameter, and a readable label ('stem', 'blocks.3', 'head')."""
    if not hasattr(model, "group_matcher"):
        raise ModelError(f"{type(model).__name__} has no timm group_matcher(); cannot split it into stages")
    from timm.models import group_parameters
    from timm.models._manipulate import MATCH_PREV_GROUP

    matcher = model.group_matcher(coarse=coarse)
    ids = group_parameters(model, matcher, reverse=True)
    specs = []  # (group key, regex, suffix) in the order timm tries them
    for key, spec in matcher.items() if isinstance(matcher, dict) else []:
        pairs = spec if isinstance(spec, (list, tuple)) else [(spec, None)] if spec else []
        specs += [(key, re.compile(regex), suffix) for regex, suffix in pairs]
    head = model.pretrained_cfg.get("classifier") or ()
    head = (head,) if isinstance(head, str) else tuple(head)
    labels = {}
    for name, gid in ids.items():
        key, m, suffix = next(((k, m, s) for k, r, s in specs if (m := r.match(name))), (None, None, None))
        if name.startswith(tuple(h + "." for h in head)) or (specs and m is None):
            labels[name] = "head"  # unmatched: after the trunk, as in timm's own ordering
        elif suffix is not None and suffix[-1] == MATCH_PREV_GROUP[0]:
            labels[name] = "head"  # e.g. conv_head/bn2: timm files them with the last block; they follow it
        else:
            labels[name] = f"group.{gid}" if m is None else m.group(0) if m.groups() else key
    return ids, labels


def stage_map(model: nn.Module) -> tuple[list[Stage], dict[str, int]]:
    """Stages in network order (head last) and the stage index of every parameter name (what
    transferkit.models.layers builds the one vocabulary of layers on)."""
    ids, labels = _param_labels(model, coarse=True)
    trunk = sorted({gid for name, gid in ids.items() if labels[name] != "head"})
    names = {gid: next(labels[n] for n in ids if ids[n] == gid and labels[n] != "head") for gid in trunk}
    index = {gid: i for i, gid in enumerate(trunk)}
    stage_of = {n: len(trunk) if labels[n] == "head" else index[ids[n]] for n in ids}
    sizes = [0] * (len(trunk) + 1)
    for n, p in model.named_parameters():
        sizes[stage_of[n]] += p.numel()
    return [*(Stage(names[g], i, sizes[i]) for g, i in index.items()), Stage("head", len(trunk), sizes[-1])], stage_of


def list_stages(model: nn.Module) -> list[Stage]:
    """The model's coarse stages, stem first and head last, with parameter counts."""
    return stage_map(model)[0]


def resolve_stage(model: nn.Module, spec: str | int) -> int:
    """Parse `freeze_until`: 'none' (train all), 'head' (head only), a stage index or a stage name."""
    stages = list_stages(model)
    known = {"none": 0, **{str(s.index): s.index for s in stages}, **{s.name: s.index for s in stages}}
    if str(spec).strip() in known:
        return known[str(spec).strip()]
    why = ("'pre_logits' is the head's pooled features, not a stage: 'head' trains the head only. "
           if str(spec).strip().replace("-", "_") == PRE_LOGITS else "")
    from transferkit.models.layers import remember_vocabulary  # layers builds on stages: imported when refusing

    remember_vocabulary(model)  # the next bad value is refused before torch loads
    raise stage_refusal(stages, spec, why)


def stage_refusal(stages: list[Stage], spec: object, why: str = "") -> ParameterError:
    """The error for a `freeze_until` value that names no stage (`why`: the reason, when there is one)."""
    valid = ", ".join(f"{s.index} ({s.name})" for s in stages)
    return ParameterError(f"The 'freeze_until' parameter must be 'none', 'head', a stage index or a stage name: "
                          f"{valid}. {why}Got '{spec}' instead.", param="freeze_until")


def freeze_until(model: nn.Module, stage: int) -> nn.Module:
    """Train only stages >= `stage` (in place), and record which modules are now wholly frozen."""
    _, stage_of = stage_map(model)
    for name, param in model.named_parameters():
        param.requires_grad = stage_of[name] >= stage
    model.frozen_modules = _fully_frozen(model)
    return model


def _fully_frozen(model: nn.Module) -> frozenset[str]:
    params = {name: list(m.parameters(recurse=False)) for name, m in model.named_modules()}
    return frozenset(n for n, ps in params.items() if ps and not any(p.requires_grad for p in ps))


def set_train_mode(model: nn.Module, train_bn: bool = False) -> nn.Module:
    """model.train(), but frozen BatchNorms stay in eval() so their running statistics do not move."""
    frozen = getattr(model, "frozen_modules", None)
    frozen = () if train_bn else _fully_frozen(model) if frozen is None else frozen
    for name, module in model.train().named_modules():
        if isinstance(module, _BatchNorm) and name in frozen:
            module.eval()
    return model


def replace_head(model: nn.Module, num_classes: int, class_counts: np.ndarray | None = None, head: str = "linear",
                 dropout: float = 0.2, hidden: int = 512, image_size: int | tuple[int, int] | None = None,
                 n_images: int | None = None) -> nn.Module:
    """A new classifier (in place) whose bias is the log class prior: early steps need not learn the balance.

    With `n_images` the head is multi-label (one sigmoid per class): `class_counts` are each label's positive
    images among `n_images`, and each bias is that label's log-odds.

    head='local' works on the unpooled final map, whose size depends on the input: `image_size` is the
    training image size (None: the model's pretrained input size).
    """
    validate({"head": HEAD}, {"head": head}, "replace_head")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ParameterError(f"The 'num_classes' parameter must be an integer >= 1. Got {num_classes!r} instead.",
                             param="num_classes")
    model.reset_classifier(num_classes)
    final = model.get_classifier()
    if head == "mlp":
        where = model.pretrained_cfg.get("classifier")
        if not isinstance(where, str):
            raise ModelError(f"cannot place an mlp head: pretrained_cfg['classifier'] is {where!r}")
        first, final = nn.Linear(final.in_features, hidden), nn.Linear(hidden, num_classes)
        nn.init.kaiming_normal_(first.weight, nonlinearity="relu")
        nn.init.zeros_(first.bias)
        parent, _, attr = where.rpartition(".")
        setattr(model.get_submodule(parent), attr, nn.Sequential(first, nn.ReLU(), nn.Dropout(dropout), final))
    elif head == "local":
        final = _local_head(model, num_classes, image_size)
    nn.init.kaiming_normal_(final.weight, nonlinearity="linear")
    with torch.no_grad():
        prior = _log_prior(class_counts, num_classes) if n_images is None else _log_odds(class_counts, n_images)
        final.bias.copy_(torch.from_numpy(prior))
    return model


def _log_odds(positives: np.ndarray | None, n_images: int) -> np.ndarray:
    """Per label log(p / (1 - p)), p its share of images (smoothed by half an image, so never 0 or 1)."""
    p = (np.asarray(positives, dtype=np.float64) + 0.5) / (n_images + 1)
    return np.log(p / (1 - p)).astype(np.float32)


def _local_head(model: nn.Module, num_classes: int, image_size: int | tuple[int, int] | None) -> nn.Linear:
    """Pooling removed; LocallyConnected2d(C, 32, 3, padding=1) -> ReLU -> flatten -> Linear on the final map.

    Returns the final Linear. Only for timm models whose forward_head is global_pool -> (dropout) ->
    classifier: the map must reach the classifier as (B, C, h, w), which is checked with a dry run.
    """
    from transferkit.models.locally_connected import LocallyConnected2d

    arch = model.pretrained_cfg.get("architecture", type(model).__name__)
    where, pool = model.pretrained_cfg.get("classifier"), getattr(model, "global_pool", None)
    if not isinstance(where, str) or not isinstance(pool, nn.Module) or not hasattr(model, "forward_head"):
        raise ParameterError(f"The 'head' parameter 'local' needs a timm CNN with a top-level global_pool and one "
                             f"classifier module (EfficientNet, ResNet, ...); {arch} has none. Use 'linear' or 'mlp'.",
                             param="head")
    size = _pair_size(model, image_size)
    with eval_no_grad(model):
        device = next(model.parameters()).device
        features = model.forward_features(torch.zeros(1, 3, *size, device=device))  # (1, C, h, w)
    channels, map_size = features.shape[1], tuple(features.shape[-2:])
    parent, _, attr = where.rpartition(".")
    old = model.get_submodule(parent), getattr(model.get_submodule(parent), attr)
    local = LocallyConnected2d(channels, LOCAL_CHANNELS, 3, input_size=map_size, padding=1)
    final = nn.Linear(LOCAL_CHANNELS * map_size[0] * map_size[1], num_classes)
    model.global_pool = nn.Identity()
    setattr(old[0], attr, nn.Sequential(local, nn.ReLU(), nn.Flatten(1), final))
    if not _reaches_unpooled(model, local, features):
        model.global_pool = pool
        setattr(old[0], attr, old[1])
        raise ParameterError(f"The 'head' parameter 'local' cannot be placed on {arch}: its final map "
                             f"{tuple(features.shape)} does not reach the classifier unpooled. Use 'linear' or 'mlp'.",
                             param="head")
    log.info("local head on the %dx%d final map of %s: %s parameters", *map_size, arch,
             f"{sum(p.numel() for p in local.parameters()) + sum(p.numel() for p in final.parameters()):,}")
    return final


def _reaches_unpooled(model: nn.Module, local: nn.Module, features: torch.Tensor) -> bool:
    """Dry run of forward_head: does `local` receive the final map exactly as forward_features left it?"""
    seen = []
    hook = local.register_forward_pre_hook(lambda _, args: seen.append(tuple(args[0].shape)))
    try:
        with eval_no_grad(model):
            model.forward_head(features)
    except (RuntimeError, ModelError):
        pass  # e.g. a flattened map refused by LocallyConnected2d: `seen` tells
    finally:
        hook.remove()
    return seen == [tuple(features.shape)]


def _pair_size(model: nn.Module, image_size: int | tuple[int, int] | None) -> tuple[int, int]:
    """(H, W) of the training images: an int, a pair, or None for the model's pretrained input size."""
    if image_size is None:
        import timm.data

        image_size = tuple(timm.data.resolve_model_data_config(model)["input_size"][-2:])
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else ()
    if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size):
        raise ParameterError(f"The 'image_size' parameter must be an integer >= 1, (H, W) or None. "
                             f"Got {image_size!r} instead.", param="image_size")
    return size


@contextlib.contextmanager
def eval_no_grad(model: nn.Module) -> Iterator[None]:  # also transferkit.models.layers' dry run
    """Within the block: eval mode and no autograd; every module's previous mode comes back after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def _log_prior(class_counts: np.ndarray | None, num_classes: int) -> np.ndarray:
    if class_counts is None:
        return np.zeros(num_classes, np.float32)
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.shape != (num_classes,) or (counts < 0).any():
        raise ModelError(f"class_counts must be {num_classes} non-negative counts. Got {class_counts!r} instead.")
    counts = np.maximum(counts, 1.0)  # a class absent from the training split keeps a finite bias
    return np.log(counts / counts.sum()).astype(np.float32)


def param_groups(model: nn.Module, lr: float, *, layer_decay: float | None = None,
                 lr_range: tuple[float, float] | None = None, weight_decay: float = 0.05) -> list[dict]:
    """Optimizer groups with explicit 'lr' (head highest), no decay on 1-D params, frozen params left out.

    `layer_decay`: timm's geometric decay over the model's (fine) group_matcher, its 'lr_scale' folded
    into 'lr' since only timm schedulers read 'lr_scale' (timm PR #2532). `lr_range=(lo, hi)`: fastai's
    slice(lo, hi), geometric over the trainable stages (`lr` unused). Neither: `lr` everywhere.
    """
    if layer_decay is not None and lr_range is not None:
        raise ModelError("pass layer_decay or lr_range, not both")
    if layer_decay is not None:
        return _layer_decay_groups(model, lr, layer_decay, weight_decay)
    stages, stage_of = stage_map(model)
    trainable = sorted({stage_of[n] for n, p in model.named_parameters() if p.requires_grad})
    stage_lr = dict.fromkeys(trainable, lr)
    if lr_range is not None:
        lo, hi = lr_range
        if not 0 < lo <= hi:
            raise ParameterError(f"The 'lr_range' parameter must be (lo, hi) with 0 < lo <= hi. Got {lr_range!r} "
                                 f"instead.", param="lr_range")
        last = max(len(trainable) - 1, 1)
        stage_lr = {s: hi * (lo / hi) ** ((len(trainable) - 1 - j) / last) for j, s in enumerate(trainable)}
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay = p.ndim > 1 and weight_decay > 0
            key = f"{stages[stage_of[name]].name}/{'decay' if decay else 'no_decay'}"
            s_lr = stage_lr[stage_of[name]]
            g = groups.setdefault(key, dict(params=[], lr=s_lr, lr_scale=s_lr / max(stage_lr.values()), name=key))
            g["weight_decay"] = weight_decay if decay else 0.0
            g["params"].append(p)
    return list(groups.values())


def _layer_decay_groups(model: nn.Module, lr: float, layer_decay: float, weight_decay: float) -> list[dict]:
    """timm's layer-decay groups with lr_scale folded into lr, named after their first parameter's block."""
    if not 0 < layer_decay <= 1:
        raise ParameterError(f"The 'layer_decay' parameter must be in (0, 1]. Got {layer_decay!r} instead.",
                             param="layer_decay")
    from timm.optim import param_groups_layer_decay

    label = _param_labels(model, coarse=False)[1]
    name_of = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=layer_decay)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]  # explicit, so torch schedulers (which ignore lr_scale) keep the ratios
        g["name"] = f"{label[name_of[id(g['params'][0])]]}/{'decay' if g['weight_decay'] else 'no_decay'}"
    return groups


def lr_table(groups: list[dict]) -> str:
    """Per-group learning rates, as logged when training starts."""
    rows = [f"{'group':<26} {'params':>10} {'lr':>10} {'scale':>7} {'wd':>6}"]
    for g in groups:
        n, scale = sum(p.numel() for p in g["params"]), g.get("lr_scale", 1.0)
        rows.append(f"{g['name']:<26} {n:>10,} {g['lr']:>10.3g} {scale:>7.3g} {g['weight_decay']:>6.3g}")
    return "\n".join(rows)


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR factor: linear warmup to 1 over `warmup` steps, then cosine to 0 at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


