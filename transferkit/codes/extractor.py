"""CNN codes: pooled backbone activations, as a scikit-learn transformer (files on disk: transferkit.codes.extract)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from transferkit.codes import ort_engine
from transferkit.codes.params import EXTRACTOR
from transferkit.codes.pooling import compute_codes, parse_pools, pooled_dim, select_pairs
from transferkit.codes.spec import CodeSpec, engine_file, key_name
from transferkit.data.datasets import ImageDataset
from transferkit.data.decode import collate, decode_ahead, load_image
from transferkit.data.transforms import build_transform, describe_transform
from transferkit.errors import DataError, ModelError
from transferkit.models.backbones import DEFAULT_MODEL, PRE_LOGITS, create_backbone, resolve_layers
from transferkit.models.fold_bn import fold_checked
from transferkit.runtime.device import autocast, default_device, resolve_precision
from transferkit.runtime.params import sklearn_constraints, validate

log = logging.getLogger(__name__)

# Images at 224 px (scaled by area) from which a first run with the ONNX export is no slower than torch:
# the export took ~6 s and ONNX Runtime saved ~1.6 ms per 224 px image (bench/extract_speed.py, 2 cores)
ORT_PAYS_OFF = 4000
# Likewise for the int8 engine: export 6.4 s + calibration and quantization 39.9 s at 224 px, then 313 img/s end
# to end against 162 for ONNX Runtime fp32 and 112 for torch bf16 (bench/extract_speed.py): it repays the 39.9 s
# against fp32 after ~13,400 images and all 46.3 s against torch after ~8,100; 12,000 lies between
INT8_PAYS_OFF = 12000


class _Images(torch.utils.data.Dataset):
    """In-memory images (paths, PIL images or uint8 arrays) behind the same interface as ImageDataset."""

    def __init__(self, items: Sequence, transform) -> None:
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        if isinstance(item, (str, Path)):
            try:
                img = load_image(item)
            except DataError as e:
                return None, -1, i, str(e)
        elif isinstance(item, Image.Image):
            img = item.convert("RGB")
        else:
            arr = np.asarray(item)
            img = Image.fromarray(arr.astype(np.uint8)).convert("RGB")
        return self.transform(img), -1, i, ""


class FeatureExtractor(TransformerMixin, BaseEstimator):
    """Pooled activations of a pretrained backbone, as a scikit-learn transformer.

    `transform` takes an ImageDataset, a list of image paths or PIL images, or a uint8 array of
    shape (N, H, W) or (N, H, W, 3), and returns (N, D) float32 codes; with several layers or
    pools the codes are concatenated in (layer, pool) order.
    """

    _parameter_constraints: dict = sklearn_constraints(EXTRACTOR)  # the limits live in transferkit.codes.params

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        weights: str = "auto",
        layer: str | int = PRE_LOGITS,
        pool: str = "avg",
        image_size: int | None = None,
        batch_size: int = 64,
        precision: str = "auto",
        num_workers: int = 0,
        fold_bn: bool = True,
        engine: str = "auto",
        progress: bool = False,
    ) -> None:
        self.model = model
        self.weights = weights
        self.layer = layer
        self.pool = pool
        self.image_size = image_size
        self.batch_size = batch_size
        self.precision = precision
        self.num_workers = num_workers
        self.fold_bn = fold_bn
        self.engine = engine
        self.progress = progress

    def fit(self, X=None, y=None) -> FeatureExtractor:
        """Build the backbone (the weights are pretrained: nothing is learned from X).

        What makes it fast (BatchNorm folding, bf16 weights, the engine) waits for `prepare`, which the
        first batch calls: a run served from the code cache never pays for it.
        """
        import timm.data

        validate(self._parameter_constraints, self.get_params(deep=False), type(self).__name__)
        self.pools_ = parse_pools(self.pool)
        self.device_ = default_device()
        if self.precision == "int8" or self.engine == "onnxruntime":
            ort = ("precision int8" if self.precision == "int8" else "engine onnxruntime")
            if self.device_.type != "cpu" or self.precision not in ("auto", "fp32", "int8"):
                raise ModelError(f"{ort} runs ONNX Runtime on the CPU, in fp32 or int8; "
                                 "use precision auto, fp32 or int8 without a GPU")
            if self.engine == "torch":
                raise ModelError("precision int8 runs in ONNX Runtime; use engine auto (or onnxruntime)")
        else:
            autocast(self.precision, self.device_)  # validates
        self.precision_ = "int8" if self.precision == "int8" else resolve_precision(self.precision, self.device_)
        if self.engine == "onnxruntime":
            self.precision_ = "fp32"
        self.backbone_ = create_backbone(self.model, self.weights)
        self.data_config_ = timm.data.resolve_model_data_config(self.backbone_)
        self.transform_ = build_transform(self.data_config_, self.image_size)
        self.decode_ = build_transform(self.data_config_, self.image_size, uint8=True)
        cfg = describe_transform(self.data_config_, self.image_size)
        self.side_ = cfg["input_size"][-1]
        self.mean_, self.std_ = (torch.tensor(cfg[k]).reshape(1, -1, 1, 1) for k in ("mean", "std"))
        self.pairs_ = select_pairs(resolve_layers(self.backbone_, self.layer), self.pools_, self.side_)
        self.keys_ = [key_name(la.name, p) for la, p in self.pairs_]
        self.n_features_out_ = sum(pooled_dim(la, p) for la, p in self.pairs_)
        self.folded_, self.engine_, self.input_dtype_, self._ort, self._planned = None, None, None, None, None
        self.int8_cosine_ = None  # for int8: mean cosine of its codes to fp32's, measured when it was quantized
        return self

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = []  # codes are float32, whatever the images' dtype
        return tags

    def plan(self, n_images: int | None) -> FeatureExtractor:
        """Settle the engine and precision for a run over `n_images` images (None: unknown), before any runs.

        On a CPU with ONNX Runtime installed, precision 'auto' runs int8 there when its file is cached or
        the run repays calibrating it (INT8_PAYS_OFF); else fp32 there when that file is cached or the run
        repays the export (ORT_PAYS_OFF); else torch, in `resolve_precision`'s choice (bf16 weights on CPUs
        with native bf16). Measured in bench/extract_speed.py. Called by extract before the code cache is
        consulted, since the precision is part of the cache key; a missing int8 file is built here, so a
        failed quantization can still fall back to fp32 (with a warning) before any code is keyed.
        """
        if not hasattr(self, "backbone_"):
            self.fit()
        if self.engine_ is None and self._planned is None:
            ort = self.engine == "onnxruntime" or (self.engine == "auto" and self._ort_pays(n_images))
            self._planned = "onnxruntime" if ort else "torch"
            if ort:
                self.precision_ = "fp32"
            if self._int8_pays(n_images) and (self.engine_path("int8").is_file() or self._int8_engine()):
                self._planned, self.precision_ = "int8", "int8"
            elif self.precision == "int8":
                raise ModelError(f"--precision int8: {self.model} could not be quantized (see the warning); "
                                 "use --precision fp32")
        return self

    def _ort_runs(self) -> bool:
        return self.device_.type == "cpu" and self.engine != "torch"  # onnxruntime is a core dependency

    def _ort_pays(self, n_images: int | None) -> bool:
        if not self._ort_runs() or self.precision not in ("auto", "fp32"):
            return False
        return self.engine_path().is_file() or (n_images or 0) * self.side_ ** 2 >= ORT_PAYS_OFF * 224 ** 2

    def _int8_pays(self, n_images: int | None) -> bool:
        if self.precision != "auto" or not self._ort_runs():
            return self.precision == "int8"
        return self.engine_path("int8").is_file() or (n_images or 0) * self.side_ ** 2 >= INT8_PAYS_OFF * 224 ** 2

    def _int8_engine(self) -> ort_engine.OrtEngine | None:
        """The cached int8 engine, or one quantized now from the fp32 engine (exported first if need be)."""
        path, threads = self.engine_path("int8"), torch.get_num_threads()
        if self._ort is None and path.is_file():
            self._ort = ort_engine.open_verified(path, self.keys_, threads, self.side_)
        if self._ort is None:
            fp32 = ort_engine.load_or_export(self._export_net, self.keys_, self.side_, self.engine_path(), threads)
            if fp32 is not None:
                n = ort_engine.INT8["crops"]
                crops = ort_engine.calibration_crops(n + 32, ort_engine.INT8["seed"])  # the last 32: the check
                x = self.normalize(torch.stack([self.decode_(c) for c in crops])).numpy()
                self._ort = ort_engine.quantize(fp32, path, x[:n], x[n:], threads)
        return self._ort

    def prepare(self, n_images: int | None = None) -> FeatureExtractor:
        """Make the fitted backbone fast to run, for about `n_images` images (see `plan`).

        Folds BatchNorm (kept only if the output is unchanged, transferkit.models.fold_bn), casts to bf16 where
        that is the precision, and loads (or exports once) the ONNX Runtime engine where `plan` chose it.
        """
        self.plan(n_images)  # fits first if needed
        if self.engine_ is not None:
            return self
        self.engine_ = "torch"
        if self._planned == "int8":  # its file exists (plan built it); rebuilt if it no longer loads
            if self._int8_engine() is None:
                raise ModelError(f"the int8 engine of {self.model} could not be loaded or rebuilt (see the warning); "
                                 "use --precision fp32")
            self.engine_, self.folded_, self.int8_cosine_ = "onnxruntime", self._ort.folded, self._ort.cosine
            return self
        if self._planned == "onnxruntime":
            self._ort = ort_engine.load_or_export(self._export_net, self.keys_, self.side_, self.engine_path(),
                                                  torch.get_num_threads())
            if self._ort is not None:  # the torch network stays as built: a cached engine never needs it
                self.engine_, self.folded_ = "onnxruntime", self._ort.folded
                return self
            if self.engine == "onnxruntime":
                raise ModelError(f"--engine onnxruntime: {self.model} could not be exported (see the warning); "
                                 "use --engine torch")
        self._fold()
        # bf16 on CPU: cast the weights once; autocast would re-cast them on every call (10% slower here)
        if self.precision_ == "bf16" and self.device_.type == "cpu":
            self.input_dtype_ = torch.bfloat16
            self.backbone_ = self.backbone_.to(torch.bfloat16)
        self.backbone_ = self.backbone_.to(self.device_).to(memory_format=torch.channels_last)  # oneDNN layout
        return self

    def _fold(self) -> None:
        """Fold BatchNorm into the convs once: exact algebra, kept only if the network's output is unchanged."""
        if self.folded_ is not None:
            return
        self.folded_ = 0
        if self.fold_bn:
            example = torch.randn(2, 3, self.side_, self.side_, generator=torch.Generator().manual_seed(0))
            self.backbone_, self.folded_ = fold_checked(self.backbone_, example)

    def _export_net(self) -> tuple[ort_engine.CodesNet, int]:
        """The folded network as one graph of codes, for ONNX export (only when no engine file is cached)."""
        self._fold()
        return ort_engine.CodesNet(self.backbone_, compute_codes, self.pairs_), self.folded_

    def code_specs(self, precision: str | None = None) -> dict[str, CodeSpec]:
        """{'layer|pool': CodeSpec} of the codes this fitted extractor makes (`precision`: another than its own)."""
        return CodeSpec.per_key(self, precision)

    def engine_path(self, precision: str = "fp32") -> Path:
        """Where the exported (fp32) or quantized (int8) engine of exactly these codes and input size is cached."""
        return engine_file(self.code_specs(precision).values(), self.side_)

    def iter_batches(self, data) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, list]]:
        """Yield (codes by key, labels, item indices, bad items) per batch, in item order.

        Workers only decode and resize to uint8; scaling and normalising happen once per batch. Without
        workers, ONNX Runtime runs one batch while a thread decodes the next (decode_ahead); the torch
        engine decodes in turn, as its thread pool lost more to the decoding thread than it gained
        (bench/extract_speed.py).
        """
        self.prepare(len(data))
        strict = not getattr(data, "skip_bad", False)
        if isinstance(data, ImageDataset):
            dataset = data.with_transform(self.decode_)
            dataset.skip_bad = True  # errors travel back as data, so a worker's failure is raised here, in one line
        else:
            dataset = _Images(data, self.decode_)
        loader = torch.utils.data.DataLoader(  # pinned pages: the host-to-GPU copy can overlap the compute
            dataset, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate,
            pin_memory=self.device_.type == "cuda",
        )
        if self.num_workers == 0 and self._ort is not None:  # measured: helps ONNX Runtime, not torch
            loader = decode_ahead(loader)
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

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) from `decode_` -> the float input `transform_` would give, bit for bit."""
        return x.float().div_(255).sub_(self.mean_.to(x.device)).div_(self.std_.to(x.device))

    def model_codes(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """Codes of one preprocessed float batch (B, 3, H, W): the model's share of the work."""
        if self.engine_ is None:
            self.prepare()
        if self._ort is not None:
            return self._ort(x)
        mixed = autocast(self.precision_, self.device_) if self.input_dtype_ is None else contextlib.nullcontext()
        with torch.inference_mode(), mixed:
            x = x.to(self.device_, dtype=self.input_dtype_, memory_format=torch.channels_last, non_blocking=True)
            codes = compute_codes(self.backbone_, x, self.pairs_)
        return {k: v.cpu().numpy() for k, v in codes.items()}

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


def _check_finite(codes: dict[str, np.ndarray], index: np.ndarray, data, engine: str | None, precision: str) -> None:
    """Stop on codes that are NaN or infinite, naming the first such image: they are never cached or written."""
    finite = np.logical_and.reduce([np.isfinite(c.reshape(len(c), -1)).all(1) for c in codes.values()])
    if finite.all():
        return
    i = int(index[np.argmin(finite)])
    name = data.sources[i] if isinstance(data, ImageDataset) else f"item {i}"
    raise DataError(f"the codes of '{name}' are not finite (NaN or inf; engine {engine}, precision {precision}); "
                    f"nothing was written. Try --precision fp32 --engine torch")


def _progress(loader, total: int, enabled: bool):
    """Batches with a tqdm bar counting images (so the rate reads img/s)."""
    if not enabled:
        yield from loader
        return
    from tqdm import tqdm

    with tqdm(total=total, unit="img", desc="extract", dynamic_ncols=True, mininterval=0.5) as bar:
        for batch in loader:
            yield batch
            bar.update(len(batch[2]) + len(batch[3]))
