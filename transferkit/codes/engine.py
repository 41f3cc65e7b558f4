"""How a fitted FeatureExtractor's network runs: the engine and precision of a run (the pays-off rules), BatchNorm
folding, bf16 weights and the ONNX Runtime engine files (fp32 export, int8 quantization).

Kept apart from the extractor so that what the extractor *is* (model, layers, pools, transform: fitted once)
stays apart from how one run executes it (planned per run, prepared on first use): `transform` changes nothing
of the first, and the prepared network is a copy, so `backbone_` stays the pretrained network as built.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from transferkit.codes import ort_engine
from transferkit.codes.pooling import compute_codes
from transferkit.codes.spec import engine_file
from transferkit.errors import ModelError
from transferkit.models.fold_bn import fold_checked
from transferkit.runtime.device import autocast, resolve_precision

if TYPE_CHECKING:
    from transferkit.codes.extractor import FeatureExtractor

# Images at 224 px (scaled by area) from which a first run with the ONNX export is no slower than torch:
# the export took ~6 s and ONNX Runtime saved ~1.6 ms per 224 px image (bench/extract_speed.py, 2 cores)
ORT_PAYS_OFF = 4000
# Likewise for the int8 engine: export 6.4 s + calibration and quantization 39.9 s at 224 px, then 313 img/s end
# to end against 162 for ONNX Runtime fp32 and 112 for torch bf16 (bench/extract_speed.py): it repays the 39.9 s
# against fp32 after ~13,400 images and all 46.3 s against torch after ~8,100; 12,000 lies between
INT8_PAYS_OFF = 12000


def check_choice(precision: str, engine: str, device: torch.device) -> str:
    """Refuse precision/engine pairs that cannot run on `device`; return the precision a run starts from."""
    if precision == "int8" or engine == "onnxruntime":
        what = "precision 'int8'" if precision == "int8" else "engine 'onnxruntime'"
        if device.type != "cpu" or precision not in ("auto", "fp32", "int8"):
            raise ModelError(f"{what} runs ONNX Runtime on the CPU, in fp32 or int8; "
                             "use precision 'auto', 'fp32' or 'int8' without a GPU")
        if engine == "torch":
            raise ModelError("precision 'int8' runs in ONNX Runtime; use engine 'auto' (or 'onnxruntime')")
        return "int8" if precision == "int8" else "fp32"
    autocast(precision, device)  # validates
    return resolve_precision(precision, device)


class Engine:
    """One fitted extractor's network, made fast to run: planned (`plan`), then prepared (`prepare`), then called.

    `name` is None until prepared, then 'torch' or 'onnxruntime'; `precision` is the run's ('fp32', 'bf16',
    'fp16' or 'int8'); `folded` the BatchNorms folded into what runs (None until known); `int8_cosine` the mean
    cosine of int8 codes to fp32's, measured when the int8 file was built.
    """

    def __init__(self, extractor: FeatureExtractor) -> None:
        self.extractor = extractor
        self.precision = check_choice(extractor.precision, extractor.engine, extractor.device_)
        self.name: str | None = None
        self.planned: str | None = None
        self.folded: int | None = None
        self.int8_cosine: float | None = None
        self.ort: ort_engine.OrtEngine | None = None
        self.net: torch.nn.Module | None = None
        self.input_dtype: torch.dtype | None = None
        self._unfolded: torch.nn.Module | None = None
        self.decode_threads: int | None = None  # how the last run decoded (FeatureExtractor._decoded)

    def path(self, precision: str = "fp32") -> Path:
        """Where the exported (fp32) or quantized (int8) engine of exactly these codes and input size is cached."""
        fe = self.extractor
        return engine_file(fe.code_specs(precision).values(), fe.side_)

    def plan(self, n_images: int | None) -> Engine:
        """Settle the engine and precision for a run over `n_images` images (None: unknown), before any runs.

        On a CPU with ONNX Runtime installed, precision 'auto' runs int8 there when its file is cached or
        the run repays calibrating it (INT8_PAYS_OFF); else fp32 there when that file is cached or the run
        repays the export (ORT_PAYS_OFF); else torch, in `resolve_precision`'s choice (bf16 weights on CPUs
        with native bf16). Measured in bench/extract_speed.py. Called by extract before the code cache is
        consulted, since the precision is part of the cache key; a missing int8 file is built here, so a
        failed quantization can still fall back to fp32 (with a warning) before any code is keyed.
        """
        if self.name is not None or self.planned is not None:
            return self
        fe = self.extractor
        ort = fe.engine == "onnxruntime" or (fe.engine == "auto" and self._ort_pays(n_images))
        self.planned = "onnxruntime" if ort else "torch"
        if ort:
            self.precision = "fp32"
        if self._int8_pays(n_images) and (self.path("int8").is_file() or self._int8_engine()):
            self.planned, self.precision = "int8", "int8"
        elif fe.precision == "int8":
            raise ModelError(f"precision 'int8': {fe.model} could not be quantized (see the warning); "
                             "use precision 'fp32'")
        return self

    def _ort_runs(self) -> bool:
        fe = self.extractor
        return fe.device_.type == "cpu" and fe.engine != "torch"  # onnxruntime is a core dependency

    def _ort_pays(self, n_images: int | None) -> bool:
        fe = self.extractor
        if not self._ort_runs() or fe.precision not in ("auto", "fp32"):
            return False
        return self.path().is_file() or (n_images or 0) * fe.side_ ** 2 >= ORT_PAYS_OFF * 224 ** 2

    def _int8_pays(self, n_images: int | None) -> bool:
        fe = self.extractor
        if fe.precision != "auto" or not self._ort_runs():
            return fe.precision == "int8"
        return self.path("int8").is_file() or (n_images or 0) * fe.side_ ** 2 >= INT8_PAYS_OFF * 224 ** 2

    def _int8_engine(self) -> ort_engine.OrtEngine | None:
        """The cached int8 engine, or one quantized now from the fp32 engine (exported first if need be)."""
        fe, path, threads = self.extractor, self.path("int8"), torch.get_num_threads()
        if self.ort is None and path.is_file():
            self.ort = ort_engine.open_verified(path, fe.keys_, threads, fe.side_)
        if self.ort is None:
            fp32 = ort_engine.load_or_export(self._export_net, fe.keys_, fe.side_, self.path(), threads)
            if fp32 is not None:
                n = ort_engine.INT8["crops"]
                crops = ort_engine.calibration_crops(n + 32, ort_engine.INT8["seed"])  # the last 32: the check
                x = fe.normalize(torch.stack([fe.decode_(c) for c in crops])).numpy()
                self.ort = ort_engine.quantize(fp32, path, x[:n], x[n:], threads)
        return self.ort

    def prepare(self, n_images: int | None = None) -> Engine:
        """Make the network fast to run, for about `n_images` images (see `plan`).

        Folds BatchNorm (kept only if the output is unchanged, transferkit.models.fold_bn), casts to bf16 where
        that is the precision, and loads (or exports once) the ONNX Runtime engine where `plan` chose it.
        """
        self.plan(n_images)
        if self.name is not None:
            return self
        fe = self.extractor
        if self.planned == "int8":  # its file exists (plan built it); rebuilt if it no longer loads
            if self._int8_engine() is None:
                raise ModelError(f"the int8 engine of {fe.model} could not be loaded or rebuilt (see the warning); "
                                 "use precision 'fp32'")
            self.name, self.folded, self.int8_cosine = "onnxruntime", self.ort.folded, self.ort.cosine
            return self
        if self.planned == "onnxruntime":
            self.ort = ort_engine.load_or_export(self._export_net, fe.keys_, fe.side_, self.path(),
                                                 torch.get_num_threads())
            if self.ort is not None:  # a cached engine never needs the torch network
                self.name, self.folded = "onnxruntime", self.ort.folded
                return self
            if fe.engine == "onnxruntime":
                raise ModelError(f"engine 'onnxruntime': {fe.model} could not be exported (see the warning); "
                                 "use engine 'torch'")
        net = self._folded()
        if net is fe.backbone_:
            net = copy.deepcopy(net)  # the casts below change a module in place; backbone_ stays as built
        # bf16 on CPU: cast the weights once; autocast would re-cast them on every call (10% slower here)
        if self.precision == "bf16" and fe.device_.type == "cpu":
            self.input_dtype = torch.bfloat16
            net = net.to(torch.bfloat16)
        self.net = net.to(fe.device_).to(memory_format=torch.channels_last)  # oneDNN's layout
        self.name = "torch"
        return self

    def _folded(self) -> torch.nn.Module:
        """BatchNorm folded into the convs once: exact algebra, kept only if the network's output is unchanged."""
        fe = self.extractor
        if self._unfolded is None:
            self._unfolded, self.folded = fe.backbone_, 0
            if fe.fold_bn:
                example = torch.randn(2, 3, fe.side_, fe.side_, generator=torch.Generator().manual_seed(0))
                self._unfolded, self.folded = fold_checked(fe.backbone_, example)
        return self._unfolded

    def _export_net(self) -> tuple[ort_engine.CodesNet, int]:
        """The folded network as one graph of codes, for ONNX export (only when no engine file is cached)."""
        net = self._folded()
        return ort_engine.CodesNet(net, compute_codes, self.extractor.pairs_), self.folded

    def __call__(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """Codes of one preprocessed float batch (B, 3, H, W)."""
        if self.name is None:
            self.prepare()
        if self.ort is not None:
            return self.ort(x)
        fe = self.extractor
        mixed = autocast(self.precision, fe.device_) if self.input_dtype is None else contextlib.nullcontext()
        with torch.inference_mode(), mixed:
            x = x.to(fe.device_, dtype=self.input_dtype, memory_format=torch.channels_last, non_blocking=True)
            codes = compute_codes(self.net, x, fe.pairs_)
        return {k: v.cpu().numpy() for k, v in codes.items()}
