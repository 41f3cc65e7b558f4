"""What a fine-tuning run depends on (FinetuneConfig, validated against finetune.params), and building its
network from it."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, ClassVar

from transferkit.errors import ParameterError
from transferkit.finetune.params import FINETUNE
from transferkit.runtime.params import validate

if TYPE_CHECKING:  # the config itself is plain data: recipe files validate against it without torch
    import numpy as np
    from torch import nn


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything a fine-tuning run depends on; saved to config.json, compared on --resume."""

    _parameter_constraints: ClassVar[dict] = FINETUNE  # the limits live in transferkit.finetune.params

    model: str = "tf_efficientnet_lite0"
    weights: str = "auto"
    freeze_until: str = "none"  # 'none', 'head', a stage index or name (see models.layers.layer_table)
    epochs: int = 5
    batch_size: int = 64  # per process under torchrun
    image_size: int | None = None  # None: the model's pretrained input size
    start_size: int | None = None  # progressive resizing: epoch 1 trains at this size, growing to image_size
    lr: float = 3e-3  # head LR; lower stages get less via layer_decay or lr_range
    layer_decay: float | None = 0.9  # per fine timm group_matcher layer (18 on lite0): stem gets 0.9^17 = 17%
    lr_range: tuple[float, float] | None = None  # (first trainable stage, head), geometric; replaces layer_decay
    weight_decay: float = 0.05
    optimizer: str = "adamw"  # or "sgd" (momentum 0.9, nesterov)
    schedule: str = "cosine"  # linear warmup then cosine to 0, or "onecycle" (torch OneCycleLR); per batch
    warmup_epochs: float = 0.5  # cosine: warmup length; onecycle: the rising part
    label_smoothing: float = 0.1
    clip_grad: float | None = 1.0  # max global grad norm
    head: str = "linear"  # or "mlp" (512 hidden, ReLU, dropout 0.2), "local" (LocallyConnected2d, unpooled map)
    train_bn: bool = False  # False: BatchNorms of frozen stages keep their running statistics
    augment: bool = True  # random resized crop (crop_scale), horizontal flip, random erasing
    crop_scale: tuple[float, float] = (0.35, 1.0)  # fastai's min_scale; timm's 0.08 destroys small images
    random_erasing: float = 0.25  # probability per image (timm RandomErasing, per-pixel noise)
    precision: str = "fp32"
    num_workers: int = 0
    seed: int = 0
    val_fraction: float = 0.1  # stratified hold-out when no val set is given; 0: none
    early_stop: int | None = None  # epochs without val improvement
    cache: bool = True  # frozen-prefix cache when it applies (frozen stages, no augmentation, one process)
    cache_memory_gb: float = 4.0  # larger caches are memory-mapped files in the run directory
    class_weight: str | None = None  # 'balanced': cross-entropy weighted by n / (n_classes x class count)
    sampler: str | None = None  # 'balanced': class-balanced sampling (with replacement) instead of a shuffle
    ema_decay: float | None = None  # per-step cap of an EMA of the weights (timm ModelEmaV3, warmup); validated, saved
    mixup: float = 0.0  # alpha of timm's Mixup (mixed pairs of images, mixed targets); 0: off
    cutmix: float = 0.0  # alpha of timm's CutMix (a box pasted from another image); with mixup, half the batches each
    head_init: str = "prior"  # 'probe': the head starts as a logistic regression fitted on frozen codes (LP-FT)

    def validate(self) -> FinetuneConfig:
        """Fail on a setting outside its limits (naming it) before anything is built; return self."""
        validate(self._parameter_constraints, {f.name: getattr(self, f.name) for f in fields(self)},
                 type(self).__name__)
        if self.head_init == "probe" and self.head != "linear":
            raise ParameterError(f"The 'head_init' parameter 'probe' fits a linear head; head={self.head!r} is not "
                                 "one. Use head='linear' or head_init='prior'.", param="head_init")
        if self.start_size is not None and (self.image_size is None or self.start_size > self.image_size
                                            or self.head == "local"):
            raise ParameterError(f"The 'start_size' parameter ({self.start_size}) starts progressive resizing, which "
                                 "grows the training images to image_size: it needs an image_size at least as "
                                 f"large (got {self.image_size}) and a head that takes any size (got "
                                 f"head={self.head!r}).", param="start_size")
        if self.precision == "fp16":  # needs CUDA: ask torch only then
            from transferkit.runtime.device import autocast, default_device

            autocast(self.precision, default_device())
        return self

    @classmethod
    def from_dict(cls, d: dict) -> FinetuneConfig:
        known = {f.name for f in fields(cls)}
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known}
        return cls(**d)


DEFAULT_CONFIG = FinetuneConfig()


def build_model(config: FinetuneConfig, classes: list[str], counts: np.ndarray | None,
                n_images: int | None = None) -> nn.Module:
    """Backbone + new head + frozen stages, exactly as a run (or its reload) needs it. `n_images`: multi-label
    (counts are each label's positives; the head's biases start at their log-odds)."""
    from transferkit.models.backbones import create_backbone
    from transferkit.models.stages import freeze_until, replace_head, resolve_stage

    model = create_backbone(config.model, config.weights)
    replace_head(model, len(classes), counts, config.head, image_size=config.image_size,  # None: pretrained size
                 n_images=n_images)
    freeze_until(model, resolve_stage(model, config.freeze_until))
    return model
