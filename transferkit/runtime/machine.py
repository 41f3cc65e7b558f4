"""What this machine is, for what depends on it: which engine runs fastest (transferkit.codes.timing) and the
line printed next to every benchmark figure (bench/machine.py).

These machines differ from session to session (an AVX2-only EPYC, an AVX-512 EPYC with bf16/VNNI, a Xeon with
AMX), and what is fastest differs with them, so a timing is only reused on the same CPU model, SIMD flags,
thread count and library versions.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from pathlib import Path

# The flags that change which kernels torch (oneDNN) and ONNX Runtime run
FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16", "amx_int8",
         "amx_tile")


@functools.cache
def cpu() -> tuple[str, tuple[str, ...]]:
    """(CPU model name, the FLAGS it has), read from /proc/cpuinfo (elsewhere: platform.processor(), no flags)."""
    model, flags = "", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    return model or platform.processor() or "unknown CPU", tuple(f for f in FLAGS if f in flags)


def describe_cpu() -> str:
    """'AMD EPYC, 2 cores, flags: avx2 fma ...': the CPU part of every benchmark line."""
    model, flags = cpu()
    return f"{model}, {os.cpu_count()} cores, flags: {' '.join(flags) or 'none of ' + '/'.join(FLAGS)}"


def identity(threads: int) -> dict[str, object]:
    """What a speed measurement with `threads` threads holds for: CPU, flags, cores, threads and the versions of
    the libraries that run the network."""
    import torch

    try:
        import onnxruntime

        ort = onnxruntime.__version__
    except ImportError:  # pragma: no cover - a core dependency
        ort = None
    model, flags = cpu()
    return {"cpu": model, "flags": list(flags), "cores": os.cpu_count(), "threads": threads,
            "torch": torch.__version__, "onnxruntime": ort}


def identity_id(ident: dict[str, object]) -> str:
    """A short stable name for `identity(...)`, for file names."""
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
