"""How a fitted FeatureExtractor's network runs: the engine and precision of a run (chosen by timing the
candidates on this machine: transferkit.codes.timing), BatchNorm folding, bf16 weights and the ONNX Runtime
engine files (fp32 export, int8 quantization).

Kept apart from the extractor so that what the extractor *is* (model, layers, pools, transform: fitted once)
stays apart from how one run executes it (planned per run, prepared on first use): `transform` changes nothing
of the first, and the prepared network is a copy, so `backbone_` stays the pretrained network as built.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from transferkit.codes import ort_engine
from transferkit.codes.pooling import compute_codes
from transferkit.codes.spec import engine_file
from transferkit.codes.timing import STEPS, Choice, Timings, choose, time_calls
from transferkit.errors import ModelError
from transferkit.models.fold_bn import fold_checked
from transferkit.runtime.cache_root import default_root
from transferkit.runtime.device import autocast, resolve_precision

if TYPE_CHECKING:
    from transferkit.codes.extractor import FeatureExtractor

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
        self._unfolded: torch.nn.Module | None = None
        self._nets: dict[str, torch.nn.Module] = {}  # precision -> prepared torch network (timed or run)
        self._orts: dict[str, ort_engine.OrtEngine | None] = {}  # 'fp32'/'int8' -> loaded engine
        self.choice: Choice | None = None  # what plan chose and why (transferkit.codes.timing)
        self.decode_threads: int | None = None  # how the last run decoded (FeatureExtractor._decoded)

    def path(self, precision: str = "fp32") -> Path:
        """Where the exported (fp32) or quantized (int8) engine of exactly these codes and input size is cached."""
        fe = self.extractor
        return engine_file(fe.code_specs(precision).values(), fe.side_)

    def candidates(self) -> list[str]:
        """The engines and precisions this run may choose from: 'torch fp32', 'torch bf16', 'onnxruntime fp32',
        'onnxruntime int8', as far as the extractor's `engine`, `precision` and device allow."""
        fe = self.extractor
        if fe.device_.type != "cpu":
            return [f"torch {self.precision}"]
        names = []
        if fe.engine in ("auto", "torch") and fe.precision != "int8":
            auto = resolve_precision("auto", fe.device_)
            names += [f"torch {p}" for p in dict.fromkeys(("fp32", auto) if fe.precision == "auto" else
                                                          (fe.precision,))]
        if fe.engine in ("auto", "onnxruntime") and fe.precision in ("auto", "fp32", "int8"):
            names += [f"onnxruntime {p}" for p in ("fp32", "int8") if fe.precision in ("auto", p)]
        return names

    def plan(self, n_images: int | None) -> Engine:
        """Settle the engine and precision for a run over `n_images` images (None: unknown), before any runs.

        The candidates are timed on this machine and the one predicted to finish the run first, one-time costs
        included, is chosen (transferkit.codes.timing; the choice and why: `choice`). Called by extract before
        the code cache is consulted, since the precision is part of the cache key; an int8 file is built here,
        so a failed quantization can still fall back (with a warning) before any code is keyed.
        """
        if self.name is not None or self.planned is not None:
            return self
        fe = self.extractor
        return self._settle(choose(self.candidates(), n_images, fe.side_,
                                   Timings(default_root(), self.path().stem, torch.get_num_threads()), self))

    def adopt(self, choice: dict) -> Engine:
        """Take another process's plan (`Choice.to_dict`; rank 0's under torchrun), so all make the same codes."""
        if choice["chosen"] not in self.candidates():
            raise ModelError(f"cannot run '{choice['chosen']}' here (candidates: {', '.join(self.candidates())})")
        self._settle(Choice(choice["chosen"], f"chosen by rank 0: {choice['why']}", choice["candidates"]))
        if self.choice.name != choice["chosen"]:  # int8 built there but not here: codes would differ
            raise ModelError(f"could not run '{choice['chosen']}' as rank 0 does (see the warning)")
        return self

    def _settle(self, choice: Choice) -> Engine:
        fe, self.choice = self.extractor, choice
        if self.choice.precision == "int8" and self._int8_engine() is None:
            if fe.precision == "int8":
                raise ModelError(f"precision 'int8': {fe.model} could not be quantized (see the warning); "
                                 "use precision 'fp32'")
            self.choice = Choice(self.default([n for n in self.candidates() if "int8" not in n]),
                                 "int8 could not be built here (see the warning); the default")
        self.planned = "int8" if self.choice.precision == "int8" else self.choice.engine
        self.precision = self.choice.precision
        return self

    # What transferkit.codes.timing.choose asks of an engine
    def step_done(self, step: str) -> bool:
        """Whether the one-time `step` ('export', 'quantize') has its file cached."""
        return self.path("int8" if step == "quantize" else "fp32").is_file()

    def default(self, names: Sequence[str]) -> str:
        """The choice without timings: a cached engine file (int8 first), else torch at resolve_precision's."""
        for name in ("onnxruntime int8", "onnxruntime fp32"):
            if name in names and self.step_done(STEPS[name][-1]):
                return name
        fe = self.extractor
        torch_default = f"torch {resolve_precision(fe.precision, fe.device_)}"
        return torch_default if torch_default in names else names[0]

    def measure(self, name: str, timings: Timings) -> float | None:
        """Model-only images/s of candidate `name` on a batch of this input size, building its engine file
        first if need be (the one-time cost recorded in `timings`); None if it cannot be built here."""
        fe = self.extractor
        x = torch.randn(min(fe.batch_size, 8), 3, fe.side_, fe.side_, generator=torch.Generator().manual_seed(0))
        engine, precision = name.split()
        if engine == "torch":
            net = self._torch_net(precision)
            return time_calls(lambda b: self._torch_codes(net, precision, b), x)
        for step in STEPS[name]:
            if not self.step_done(step):
                start = time.perf_counter()
                built = self._fp32_engine() if step == "export" else self._int8_engine()
                if built is None:
                    return None
                timings.setup[step] = time.perf_counter() - start
        ort = self._fp32_engine() if precision == "fp32" else self._int8_engine()
        return None if ort is None else time_calls(ort, x.numpy())

    def _fp32_engine(self) -> ort_engine.OrtEngine | None:
        """The cached fp32 ONNX Runtime engine, or one exported now; None if the network does not export."""
        fe = self.extractor
        if self._orts.get("fp32") is None:
            self._orts["fp32"] = ort_engine.load_or_export(self._export_net, fe.keys_, fe.side_, self.path(),
                                                           torch.get_num_threads())
        return self._orts["fp32"]

    def _int8_engine(self) -> ort_engine.OrtEngine | None:
        """The cached int8 engine, or one quantized now from the fp32 engine (exported first if need be)."""
        fe, path, threads = self.extractor, self.path("int8"), torch.get_num_threads()
        if self._orts.get("int8") is None and path.is_file():
            self._orts["int8"] = ort_engine.open_verified(path, fe.keys_, threads, fe.side_)
        if self._orts.get("int8") is None and (fp32 := self._fp32_engine()) is not None:
            recipe = ort_engine.int8_recipe(fe.side_)
            n = recipe["crops"]
            crops = ort_engine.calibration_crops(n + 32, recipe["seed"])  # the last 32: the check
            x = fe.normalize(torch.stack([fe.decode_(c) for c in crops])).numpy()
            self._orts["int8"] = ort_engine.quantize(fp32, path, x[:n], x[n:], threads)
        return self._orts.get("int8")

    def prepare(self, n_images: int | None = None) -> Engine:
        """Make the network fast to run, for about `n_images` images (see `plan`).

        Loads (or builds once) the ONNX Runtime engine where `plan` chose it; for torch, folds BatchNorm (kept
        only if the output is unchanged, transferkit.models.fold_bn) and casts to bf16 where that is the
        precision.
        """
        self.plan(n_images)
        if self.name is not None:
            return self
        fe = self.extractor
        if self.planned == "int8":  # its file exists (plan built it); rebuilt if it no longer loads
            if self._int8_engine() is None:
                raise ModelError(f"the int8 engine of {fe.model} could not be loaded or rebuilt (see the warning); "
                                 "use precision 'fp32'")
            self.ort = self._orts["int8"]
            self.name, self.folded, self.int8_cosine = "onnxruntime", self.ort.folded, self.ort.cosine
            return self
        if self.planned == "onnxruntime":
            self.ort = self._fp32_engine()
            if self.ort is not None:  # a cached engine never needs the torch network
                self.name, self.folded = "onnxruntime", self.ort.folded
                return self
            if fe.engine == "onnxruntime":
                raise ModelError(f"engine 'onnxruntime': {fe.model} could not be exported (see the warning); "
                                 "use engine 'torch'")
        self.net = self._torch_net(self.precision)
        self._nets.clear()
        self.name = "torch"
        return self

    def _torch_net(self, precision: str) -> torch.nn.Module:
        """The folded network, ready to run in `precision` on the device (a copy: backbone_ stays as built).

        bf16 on CPU: the weights are cast once (autocast would re-cast them on every call: 10% slower here)."""
        fe = self.extractor
        if precision not in self._nets:
            net = copy.deepcopy(self._folded())
            if precision == "bf16" and fe.device_.type == "cpu":
                net = net.to(torch.bfloat16)
            self._nets[precision] = net.to(fe.device_).to(memory_format=torch.channels_last)  # oneDNN's layout
        return self._nets[precision]

    def _torch_codes(self, net: torch.nn.Module, precision: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
        fe = self.extractor
        cast = precision == "bf16" and fe.device_.type == "cpu"  # weights cast in _torch_net: inputs too
        mixed = contextlib.nullcontext() if cast else autocast(precision, fe.device_)
        with torch.inference_mode(), mixed:
            x = x.to(fe.device_, dtype=torch.bfloat16 if cast else None, memory_format=torch.channels_last,
                     non_blocking=True)
            return compute_codes(net, x, fe.pairs_)

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
        return {k: v.cpu().numpy() for k, v in self._torch_codes(self.net, self.precision, x).items()}
