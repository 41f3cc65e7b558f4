"""FinetuneConfig's limits, as plain data (transferkit.runtime.params): `FinetuneConfig.validate`, the CLI's
choices and the recipe validator all read this table. Light: no torch, no sklearn."""

from __future__ import annotations

from numbers import Integral, Real
from os import PathLike

from transferkit.codes.params import BATCH_SIZE, NUM_WORKERS
from transferkit.data.params import IMAGE_SIZE
from transferkit.models.params import HEAD
from transferkit.probe.params import CLASS_WEIGHTS
from transferkit.runtime.params import Interval, Pair, StrOptions

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "onecycle")
PRECISIONS = ("fp32", "bf16", "fp16")  # int8 is for codes only (ONNX Runtime)
HEAD_INITS = ("prior", "probe")  # prior: random weights, bias the log class prior; probe: a fitted linear probe (LP-FT)
SAMPLERS = ("balanced",)  # each epoch draws len(train) images, every class equally likely (with replacement)
_AT_LEAST_1 = Interval(Integral, 1, None, closed="left")
_AT_LEAST_0 = Interval(Real, 0, None, closed="left")

FINETUNE = {
    "model": [str],
    "weights": [str, PathLike],
    "freeze_until": [str, Integral],  # 'none', 'head', a stage index or name: resolved against the network
    "epochs": [_AT_LEAST_1],
    "batch_size": BATCH_SIZE,
    "image_size": IMAGE_SIZE,
    "start_size": IMAGE_SIZE,  # and at most image_size (FinetuneConfig.validate)
    "lr": [Interval(Real, 0, None, closed="neither")],
    "layer_decay": [Interval(Real, 0, 1, closed="right"), None],
    "lr_range": [Pair(0), None],
    "weight_decay": [_AT_LEAST_0],
    "optimizer": [StrOptions(OPTIMIZERS)],
    "schedule": [StrOptions(SCHEDULES)],
    "warmup_epochs": [_AT_LEAST_0],
    "label_smoothing": [Interval(Real, 0, 1, closed="left")],
    "clip_grad": [_AT_LEAST_0, None],
    "head": HEAD,
    "train_bn": ["boolean"],
    "augment": ["boolean"],
    "crop_scale": [Pair(0, 1)],
    "random_erasing": [Interval(Real, 0, 1, closed="both")],
    "precision": [StrOptions(PRECISIONS)],
    "num_workers": NUM_WORKERS,
    "seed": [Interval(Integral, 0, None, closed="left")],
    "val_fraction": [Interval(Real, 0, 1, closed="left")],  # a stratified hold-out; 0: none
    "early_stop": [_AT_LEAST_1, None],
    "cache": ["boolean"],
    "cache_memory_gb": [Interval(Real, 0, None, closed="neither")],
    "class_weight": [StrOptions(CLASS_WEIGHTS), None],  # as the probe's: the loss weighted by inverse frequency
    "sampler": [StrOptions(SAMPLERS), None],
    "ema_decay": [Interval(Real, 0, 1, closed="neither"), None],
    "mixup": [_AT_LEAST_0],  # Beta(alpha, alpha) of timm's Mixup; 0: off
    "cutmix": [_AT_LEAST_0],
    "head_init": [StrOptions(HEAD_INITS)],
}
