"""Where and in what precision torch runs: the default device, 'auto' precision by what this CPU runs
natively, and autocast."""

from __future__ import annotations

import contextlib

import torch

from transferkit.errors import ParameterError
from transferkit.runtime.params import PRECISIONS, StrOptions, validate


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bf16 natively here (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> what is fast and accurate enough for codes on `device` (bench/inference_variants.py)."""
    validate({"precision": [StrOptions(PRECISIONS)]}, {"precision": precision}, "resolve_precision")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "fp16"
    return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision context for `precision`; fp32 runs as is."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "int8":
        raise ParameterError("The 'precision' parameter must not be int8 here: int8 runs in ONNX Runtime, for "
                             "extracting codes on a CPU (extract, probe); use fp32 or bf16", param="precision")
    if precision == "fp16" and device.type != "cuda":
        raise ParameterError("The 'precision' parameter must not be fp16 here: fp16 needs a CUDA device; use bf16 on "
                             "CPU", param="precision")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
