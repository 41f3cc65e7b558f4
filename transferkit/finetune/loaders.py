"""What a fine-tuning run trains on: the validation hold-out, transforms, loaders (shuffled or class-balanced), the
frozen-prefix cache swap."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from transferkit.data.datasets import ImageDataset
from transferkit.data.decode import collate
from transferkit.data.transforms import build_transform, describe_transform
from transferkit.errors import DataError, ParameterError
from transferkit.finetune.config import FinetuneConfig
from transferkit.finetune.prefix_cache import CachedDataset, PrefixCache, collate_cached, frozen_prefix
from transferkit.runtime.distributed import ShardSampler, World

log = logging.getLogger(__name__)


def split_train_val(train: ImageDataset, val: ImageDataset | None, config: FinetuneConfig):
    """The given val set, or a stratified hold-out of `train` (at least one image per class; multi-label data: a
    random one, since an image belongs to several classes)."""
    if val is not None or config.val_fraction == 0:
        return train, val
    from sklearn.model_selection import train_test_split

    n_val = max(round(config.val_fraction * len(train)), len(train.classes))
    try:
        fit_idx, val_idx = train_test_split(np.arange(len(train)), test_size=n_val, random_state=config.seed,
                                            stratify=None if train.multilabel else train.targets)
    except ValueError as e:
        raise DataError(f"cannot hold out a stratified validation split of '{train.root}': {e}") from e
    return train.select(np.sort(fit_idx)), train.select(np.sort(val_idx))


# Below this many validation images, one image is worth more than a point of accuracy and the binomial standard
# error of an accuracy near 90%, sqrt(0.9 * 0.1 / n), is over 3 points: more than late epochs differ by.
MIN_VAL_IMAGES = 100


def small_val_warning(n_val: int, *, given: bool) -> str | None:
    """Why a best epoch picked on `n_val` validation images is mostly noise, and what to do instead; None when
    there is no validation set or it is large enough (MIN_VAL_IMAGES). `given`: a val set, not a hold-out."""
    if not 0 < n_val < MIN_VAL_IMAGES:
        return None
    se = 100 * math.sqrt(0.9 * 0.1 / n_val)
    more = "a larger val set" if given else "a larger val_fraction (--val-fraction) or a val set"
    instead = ("Keep the last epoch instead (no val set)" if given else
               "Train on every image and keep the last epoch (val_fraction=0, --val-fraction 0)")
    return (f"the validation set has only {n_val} images: one image moves accuracy by {100 / n_val:.1f} points and "
            f"its standard error at 90% accuracy is {se:.1f} points, more than epochs usually differ by, so the best "
            f"epoch is picked largely by noise. {instead}, validate on {more} of at least {MIN_VAL_IMAGES} images, "
            f"or compare settings by k-fold cross-validation.")


def _transforms(model: nn.Module, config: FinetuneConfig):
    import timm.data

    data_config = timm.data.resolve_model_data_config(model)
    eval_tf = build_transform(data_config, config.image_size)
    augment = dict(scale=tuple(config.crop_scale), hflip=0.5, color_jitter=None, re_prob=config.random_erasing)
    train_tf = build_transform(data_config, config.image_size, train=True, **augment) if config.augment else eval_tf
    return data_config, train_tf, eval_tf


def epoch_size(config: FinetuneConfig, epoch: int) -> int | None:
    """The training images' size at `epoch` under progressive resizing (fastai's): `start_size` at epoch 1,
    growing linearly to `image_size` at the last epoch, so early epochs cost less and the last trains at the size
    the model is evaluated at. Sizes between are rounded to a multiple of 8: convolutions use the cores better
    there (lite0 training, 2026-11-28: 689 / 447 / 426 img/s at 32 / 34 / 40 px). None without `start_size`."""
    if config.start_size is None:
        return None
    if epoch >= config.epochs:
        return config.image_size
    if epoch <= 1:
        return config.start_size
    size = config.start_size + (epoch - 1) / (config.epochs - 1) * (config.image_size - config.start_size)
    return min(max(8 * math.floor(size / 8 + 0.5), config.start_size), config.image_size)


def resize_train(loader: torch.utils.data.DataLoader, model: nn.Module, config: FinetuneConfig, epoch: int) -> None:
    """Give `loader`'s images the training transform of `epoch`'s size (`epoch_size`); a new iterator over the
    loader (each epoch's) reads them at that size."""
    _, train_tf, _ = _transforms(model, replace(config, image_size=epoch_size(config, epoch)))
    loader.dataset.transform = train_tf


def eval_loader(model: nn.Module, dataset: ImageDataset, config: FinetuneConfig) -> torch.utils.data.DataLoader:
    """`dataset` in order through the eval transform (no augmentation), in batches of at least 128."""
    _, _, eval_tf = _transforms(model, config)
    return torch.utils.data.DataLoader(dataset.with_transform(eval_tf), batch_size=max(config.batch_size, 128),
                                       collate_fn=collate, num_workers=config.num_workers)


def make_loaders(model: nn.Module, train: ImageDataset, val: ImageDataset | None, config: FinetuneConfig, world: World):
    """Train loader (shuffled per epoch by DistributedSampler, sharded per rank); val loader; transforms."""
    data_config, train_tf, eval_tf = _transforms(model, config)
    train_set = train.with_transform(train_tf)
    loader = _train_loader(train_set, config, world, collate)
    val_loader = None
    if val is not None:
        val_set = val.with_transform(eval_tf)
        val_loader = torch.utils.data.DataLoader(val_set, batch_size=config.batch_size, collate_fn=collate,
                                                 num_workers=config.num_workers,
                                                 sampler=ShardSampler(len(val_set), world))
    train_steps = [str(t) for t in getattr(train_tf, "transforms", [train_tf])]
    sizes = {} if config.start_size is None else {"train_sizes": [epoch_size(config, e)
                                                                   for e in range(1, config.epochs + 1)]}
    return loader, val_loader, {"transform": describe_transform(data_config, config.image_size),
                                "train_transform": train_steps, **sizes, "n_train": len(train),
                                "n_val": len(val or [])}


def balanced_weights(targets: np.ndarray, n_classes: int) -> np.ndarray:
    """scikit-learn's class_weight='balanced': n / (n_classes x count) per class (0 for a class with no images)."""
    counts = np.bincount(targets, minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(n_classes)
    weights[present] = len(targets) / (present.sum() * counts[present])
    return weights


def positive_weights(targets: np.ndarray) -> np.ndarray:
    """Multi-label class_weight='balanced': per label, negatives / positives (BCE's pos_weight; 1 for a label
    with no positive image), so each label's positives weigh as much as its negatives."""
    positives = targets.sum(0).astype(np.float64)
    return np.where(positives > 0, (len(targets) - positives) / np.maximum(positives, 1), 1.0)


class BalancedSampler(torch.utils.data.Sampler):
    """Draws len(targets) indices per epoch with replacement, each class equally likely; sharded across ranks.

    Like DistributedSampler, the draw depends on (seed, epoch) only, so a resumed run draws the same batches.
    """

    def __init__(self, targets: np.ndarray, world: World, seed: int = 0):
        targets = np.asarray(targets)
        self.p = torch.from_numpy(balanced_weights(targets, int(targets.max()) + 1)[targets])
        self.world, self.seed, self.epoch = world, seed, 0
        self.per_rank = math.ceil(len(targets) / world.size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        drawn = torch.multinomial(self.p, self.per_rank * self.world.size, replacement=True, generator=g)
        return iter(drawn[self.world.rank::self.world.size].tolist())

    def __len__(self) -> int:
        return self.per_rank


def _train_loader(dataset, config: FinetuneConfig, world: World, collate_fn) -> torch.utils.data.DataLoader:
    if config.sampler == "balanced":
        if dataset.targets.ndim == 2:
            raise ParameterError("The 'sampler' parameter 'balanced' draws one class per image; multi-label data "
                                 "has several: use class_weight='balanced' instead.", param="sampler")
        sampler = BalancedSampler(dataset.targets, world, config.seed)
    else:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world.size, rank=world.rank,
                                                      shuffle=True, seed=config.seed)
    per_rank = len(sampler)
    return torch.utils.data.DataLoader(
        dataset, batch_size=config.batch_size, sampler=sampler, num_workers=config.num_workers,
        collate_fn=collate_fn, drop_last=per_rank > config.batch_size,  # a 1-image batch breaks BatchNorm
    )


def maybe_cache(model, config: FinetuneConfig, train, val, loader, val_loader, out: Path, device, world: World,
                 progress: bool):
    """Swap the loaders for cached frozen-prefix activations when that gives the same training."""
    none = {"names": [], "modules": []}
    prefix = frozen_prefix(model)
    if not (config.cache and prefix):
        return loader, val_loader, none
    why_not = ("progressive resizing (start_size) changes the input size every epoch" if config.start_size else
               "augmentation is on; with augment=False (--no-augment) frozen stages run once, not every epoch"
               if config.augment else
               "train_bn updates frozen BatchNorms; train_bn=False (no --train-bn) lets them be cached"
               if config.train_bn else "mixup/cutmix mix the input images, not a stage's activations"
               if config.mixup or config.cutmix else "several processes" if world.distributed else None)
    if why_not:
        log.info("frozen-prefix cache off: %s", why_not)
        return loader, val_loader, none
    cache = PrefixCache(model, prefix)
    _, _, eval_tf = _transforms(model, config)
    probe_x = collate([train.with_transform(eval_tf)[i] for i in range(min(4, len(train)))])[0]
    try:
        err = cache.check(probe_x.to(device, memory_format=torch.channels_last))
    except ValueError as e:
        log.warning("frozen-prefix cache off: %s", e)
        return loader, val_loader, none
    log.info("frozen-prefix cache: %s..%s (%d units), max split error %.2g", cache.names[0], cache.names[-1],
             len(prefix), err)

    def activations(dataset, name):
        return cache.compute(eval_loader(model, dataset, config), len(dataset), out / f"prefix-cache-{name}.npy",
                             config.cache_memory_gb, device, progress)

    start = time.perf_counter()
    cached_train = CachedDataset(activations(train, "train"), train.targets)
    loader = _train_loader(cached_train, config, world, collate_cached)
    if val is not None:
        cached_val = CachedDataset(activations(val, "val"), val.targets)
        val_loader = torch.utils.data.DataLoader(cached_val, batch_size=config.batch_size, collate_fn=collate_cached)
    log.info("frozen-prefix cache built in %.1f s", time.perf_counter() - start)
    return loader, val_loader, {"names": cache.names, "modules": [m for _, m in prefix]}
