"""CNN codes: pooled backbone activations, as a scikit-learn transformer (files on disk: transferkit.codes.extract)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from transferkit.codes.engine import Engine, check_choice
from transferkit.codes.params import EXTRACTOR, as_views_error, parse_pools, parse_views
from transferkit.codes.pooling import pooled_dim, select_pairs
from transferkit.codes.spec import CodeSpec, key_name
from transferkit.data.datasets import ImageDataset
from transferkit.data.decode import DecodeTarget, collate, decode_ahead, load_image, threaded_batches
from transferkit.data.transforms import MIRROR, SHIFT_COPY, build_transform, decode_target, describe_transform
from transferkit.errors import DataError, ParameterError
from transferkit.models.backbones import create_backbone
from transferkit.models.layers import resolve_layers
from transferkit.models.params import DEFAULT_MODEL, PRE_LOGITS
from transferkit.runtime.device import default_device
from transferkit.runtime.params import sklearn_constraints, validate
from transferkit.runtime.progress import progress_bar

log = logging.getLogger(__name__)


class _Images(torch.utils.data.Dataset):
    """In-memory images (paths, PIL images or uint8 arrays) behind the same interface as ImageDataset."""

    def __init__(self, items: Sequence, transform, target: DecodeTarget | None) -> None:
        self.items, self.transform, self.target = items, transform, target

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        if isinstance(item, (str, Path)):
            try:
                img = load_image(item, self.target)
            except DataError as e:
                return None, -1, i, str(e)
        elif isinstance(item, Image.Image):
            img = item.convert("RGB")
        else:
            arr = np.asarray(item)
            img = Image.fromarray(arr.astype(np.uint8)).convert("RGB")
        if self.target is not None and not isinstance(item, (str, Path)):
            img = self.target.reduce(img)  # decoded already: only the box reduction is left to save
        return self.transform(img), -1, i, ""


class FeatureExtractor(TransformerMixin, BaseEstimator):
    """Pooled activations of a pretrained backbone, as a scikit-learn transformer.

    `transform` takes an ImageDataset, a list of image paths or PIL images, or a uint8 array of
    shape (N, H, W) or (N, H, W, 3), and returns (N, D) float32 codes; with several layers or
    pools the codes are concatenated in (layer, pool) order; with `views` ('blocks.2|4x4,blocks.4|catavgmax': a
    combination, `layer` and `pool` left at their defaults) exactly those views, in that order.
    """

    _parameter_constraints: dict = sklearn_constraints(EXTRACTOR)  # the limits live in transferkit.codes.params

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        weights: str = "auto",
        layer: str | int = PRE_LOGITS,
        pool: str = "avg",
        views: str | Sequence | None = None,
        image_size: int | None = None,
        batch_size: int = 64,
        precision: str = "auto",
        num_workers: int = 0,
        fold_bn: bool = True,
        engine: str = "auto",
        exact_decode: bool = False,
        decode_threads: int | None = None,
        progress: bool = False,
        mirror: bool = False,
        shift_copy: int = 0,
    ) -> None:
        self.model = model
        self.weights = weights
        self.layer = layer
        self.pool = pool
        self.views = views
        self.image_size = image_size
        self.batch_size = batch_size
        self.precision = precision
        self.num_workers = num_workers
        self.fold_bn = fold_bn
        self.engine = engine
        self.exact_decode = exact_decode
        self.decode_threads = decode_threads
        self.progress = progress
        self.mirror = mirror  # codes of each image's horizontal mirror (flip-augmented probes), cached apart
        self.shift_copy = shift_copy  # k >= 1: codes of copy k of the shifted images (transforms.ShiftCopy), apart

    def fit(self, X=None, y=None) -> FeatureExtractor:
        """Build the backbone (the weights are pretrained: nothing is learned from X).

        What makes it fast (BatchNorm folding, bf16 weights, the engine) waits for `prepare`, which the
        first batch calls: a run served from the code cache never pays for it.
        """
        import timm.data

        validate(self._parameter_constraints, self.get_params(deep=False), type(self).__name__)
        views = None if self.views is None else parse_views(self.views)
        if views is not None and (self.layer, self.pool) != (PRE_LOGITS, "avg"):
            raise ParameterError(f"The 'views' parameter names the layers and pools itself: leave 'layer' and 'pool' "
                                 f"at their defaults. Got views={self.views!r} with layer={self.layer!r}, "
                                 f"pool={self.pool!r} instead.", param="views")
        self.pools_ = parse_pools(self.pool) if views is None else list(dict.fromkeys(p for _, p in views))
        self.device_ = default_device()
        check_choice(self.precision, self.engine, self.device_)  # before the (slow) backbone is built
        self.backbone_ = create_backbone(self.model, self.weights)
        self.data_config_ = timm.data.resolve_model_data_config(self.backbone_)
        if self.mirror:  # part of the preprocessing: build_transform flips, describe_transform (the CodeSpec) says so
            self.data_config_ = {**self.data_config_, MIRROR: True}
        if self.shift_copy:  # likewise: build_transform shifts, describe_transform says which copy
            self.data_config_ = {**self.data_config_, SHIFT_COPY: self.shift_copy}
        self.transform_ = build_transform(self.data_config_, self.image_size)
        self.decode_ = build_transform(self.data_config_, self.image_size, uint8=True)
        # decode image files no larger than decode_ needs (JPEG DCT scaling, then box reduction); None: exactly
        self.decode_target_ = None if self.exact_decode else decode_target(self.data_config_, self.image_size)
        cfg = describe_transform(self.data_config_, self.image_size)
        self.side_ = cfg["input_size"][-1]
        self.mean_, self.std_ = (torch.tensor(cfg[k]).reshape(1, -1, 1, 1) for k in ("mean", "std"))
        if views is None:
            self.pairs_ = select_pairs(resolve_layers(self.backbone_, self.layer), self.pools_, self.side_)
        else:
            self.pairs_ = [pair for layer, pool in views for pair in select_pairs(
                _one_layer(self.backbone_, layer, self.views), [pool], self.side_)]
        self.keys_ = [key_name(la.name, p) for la, p in self.pairs_]
        self.n_features_out_ = sum(pooled_dim(la, p) for la, p in self.pairs_)
        self._engine = Engine(self)  # how runs execute the network: planned and prepared per run, not fitted
        return self

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = []  # codes are float32, whatever the images' dtype
        return tags

    def plan(self, n_images: int | None) -> FeatureExtractor:
        """Settle the engine and precision for a run over `n_images` images (None: unknown); see `Engine.plan`."""
        if not hasattr(self, "backbone_"):
            self.fit()
        self._engine.plan(n_images)
        return self

    def adopt(self, choice: dict) -> FeatureExtractor:
        """Run the engine another process chose (`engine_choice_` of rank 0 under torchrun), timing nothing."""
        if not hasattr(self, "backbone_"):
            self.fit()
        self._engine.adopt(choice)
        return self

    def prepare(self, n_images: int | None = None) -> FeatureExtractor:
        """Make the network fast to run, for about `n_images` images; see `Engine.prepare`."""
        self.plan(n_images)  # fits first if needed
        self._engine.prepare(n_images)
        return self

    # What a run settled (transferkit.codes.engine): read through, so transform leaves the fitted attributes alone
    @property
    def precision_(self) -> str:
        """The precision of the codes: the resolved one, after `plan` the run's ('fp32', 'bf16', 'fp16', 'int8')."""
        return self._engine.precision

    @property
    def engine_(self) -> str | None:
        """'torch' or 'onnxruntime' once prepared; None before (e.g. when every code came from the cache)."""
        return self._engine.name

    @property
    def folded_(self) -> int | None:
        """BatchNorms folded into the network that runs (None until prepared)."""
        return self._engine.folded

    @property
    def int8_cosine_(self) -> float | None:
        """For int8: the mean cosine of its codes to fp32's, measured when it was quantized."""
        return self._engine.int8_cosine

    @property
    def engine_choice_(self) -> dict | None:
        """What `plan` chose, why, and each candidate's timing ({'chosen', 'why', 'candidates'}); None before."""
        return None if self._engine.choice is None else self._engine.choice.to_dict()

    def code_specs(self, precision: str | None = None) -> dict[str, CodeSpec]:
        """{'layer|pool': CodeSpec} of the codes this fitted extractor makes (`precision`: another than its own)."""
        return CodeSpec.per_key(self, precision)

    def code_spec(self) -> CodeSpec:
        """The CodeSpec of what `transform` returns: its views' codes side by side (one view: that view's spec)."""
        return CodeSpec.combine(self.code_specs().values())

    def engine_path(self, precision: str = "fp32") -> Path:
        """Where the exported (fp32) or quantized (int8) engine of exactly these codes and input size is cached."""
        return self._engine.path(precision)

    def iter_batches(self, data) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, list]]:
        """Yield (codes by key, labels, item indices, bad items) per batch, in item order.

        Workers (or threads) only decode and resize to uint8; scaling and normalising happen once per batch.
        How images are decoded: see `_decoded`.
        """
        self.prepare(len(data))
        strict = not getattr(data, "skip_bad", False)
        if isinstance(data, ImageDataset):
            dataset = data.with_transform(self.decode_, self.decode_target_)
            dataset.skip_bad = True  # errors travel back as data, so a worker's failure is raised here, in one line
        else:
            dataset = _Images(data, self.decode_, self.decode_target_)
        loader = self._decoded(dataset)
        for x, y, idx, bad in _progress(loader, len(dataset), self.progress):
            if bad and strict:
                raise DataError(bad[0][1])
            if x is None:
                yield {}, np.empty(0, np.int64), np.empty(0, np.int64), bad
                continue
            if self.device_.type == "cuda":  # uint8 from pinned memory: a quarter of the float bytes to copy
                x = x.to(self.device_, non_blocking=True)
            codes = self.model_codes(self.normalize(x))
            _check_finite(codes, idx.numpy(), data, self.engine_, self.precision_)
            yield codes, y.numpy(), idx.numpy(), bad

    def _decoded(self, dataset) -> Iterator:
        """Collated batches of `dataset`, decoded as fast as this machine allows.

        DataLoader workers when `num_workers` asks for them (or on a GPU: pinned pages let the host-to-device
        copy overlap the compute). Else the first batch is decoded here, and the time the caller then spends on
        it (the model) decides the rest: slower than decoding, and `decode_threads` threads decode in parallel
        (default one per core: Pillow releases the GIL); faster, and ONNX Runtime runs one batch while a thread
        decodes the next (decode_ahead), the torch engine decodes in turn, as its thread pool lost more to the
        decoding thread than it gained (bench/extract_speed.py). The choice is `decode_threads_`.
        """
        if self.num_workers > 0 or self.device_.type == "cuda":
            self._engine.decode_threads = 0
            yield from torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                                                   collate_fn=collate, pin_memory=self.device_.type == "cuda")
            return
        size = self.batch_size
        batches = [range(i, min(i + size, len(dataset))) for i in range(0, len(dataset), size)]
        if not batches:
            return
        start = time.perf_counter()
        first = collate([dataset[i] for i in batches[0]])
        decoding = time.perf_counter() - start
        start = time.perf_counter()
        yield first
        threads = self.decode_threads or ((os.cpu_count() or 1) if decoding > time.perf_counter() - start else 1)
        self._engine.decode_threads = threads
        if threads > 1:
            yield from threaded_batches(dataset, batches[1:], threads)
            return
        rest = (collate([dataset[i] for i in b]) for b in batches[1:])
        yield from decode_ahead(rest) if self._engine.ort is not None else rest  # measured: helps ORT, not torch

    @property
    def decode_threads_(self) -> int | None:
        """Threads that decoded the last run's images after its first batch (0: DataLoader; None: no run yet)."""
        return self._engine.decode_threads

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) from `decode_` -> the float input `transform_` would give, bit for bit."""
        return x.float().div_(255).sub_(self.mean_.to(x.device)).div_(self.std_.to(x.device))

    def model_codes(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """Codes of one preprocessed float batch (B, 3, H, W): the model's share of the work."""
        return self._engine(x)

    def transform(self, X) -> np.ndarray:
        """(N, D) float32 codes of the images in X."""
        check_is_fitted(self, "backbone_")
        parts = [np.concatenate([c[k] for k in self.keys_], axis=1) for c, *_ in self.iter_batches(X) if c]
        if not parts:
            return np.empty((0, self.n_features_out_), np.float32)
        return np.concatenate(parts)

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        """Names like 'blocks.4|avg:17' for each output column."""
        names = []
        for layer, pool in self.pairs_:
            names += [f"{key_name(layer.name, pool)}:{i}" for i in range(pooled_dim(layer, pool))]
        return np.asarray(names, dtype=object)


def _one_layer(model: torch.nn.Module, layer: str, views: object) -> list:
    """The one layer a view names, as resolve_layers finds it ('all' names several: refused, naming `views`)."""
    try:
        found = resolve_layers(model, layer)
    except ParameterError as err:
        raise as_views_error(err, views) from None
    if len(found) != 1:
        raise ParameterError(f"The 'views' parameter must name one layer per view. Got {layer!r} in {views!r} "
                             "instead.", param="views")
    return found


def _check_finite(codes: dict[str, np.ndarray], index: np.ndarray, data, engine: str | None, precision: str) -> None:
    """Stop on codes that are NaN or infinite, naming the first such image: they are never cached or written."""
    finite = np.logical_and.reduce([np.isfinite(c.reshape(len(c), -1)).all(1) for c in codes.values()])
    if finite.all():
        return
    i = int(index[np.argmin(finite)])
    name = data.sources[i] if isinstance(data, ImageDataset) else f"item {i}"
    raise DataError(f"the codes of '{name}' are not finite (NaN or inf; engine {engine}, precision {precision}); "
                    f"nothing was written. Try precision 'fp32' and engine 'torch'")


def _progress(loader, total: int, enabled: bool):
    """Batches with a tqdm bar counting images (so the rate reads img/s)."""
    with progress_bar(total=total, unit="img", desc="extract", enabled=enabled) as bar:
        for batch in loader:
            yield batch
            bar.update(len(batch[2]) + len(batch[3]))
