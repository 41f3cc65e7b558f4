"""Model-only throughput of the fast-path choices, side by side in one run: which ones win on this machine?

Random inputs (no decoding), `tf_efficientnet_lite0` with the packaged weights, forward_features (the
codes' work), median of several timed repeats after a warm-up. Variants add one choice at a time:
NCHW fp32 (timm's default) -> channels_last -> BatchNorm folded -> bf16 (autocast, or bf16 weights),
and torch.compile where asked. Also a square GEMM in fp32 and bf16: this machine's practical peak.

    python bench/inference_variants.py                 # 224 and 64 px, batch 64; ~3 min
    python bench/inference_variants.py --compile       # also torch.compile (slow to compile)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_lines, write_section  # noqa: E402

from transferkit.models.backbones import create_backbone  # noqa: E402
from transferkit.models.fold_bn import fold_batchnorm  # noqa: E402

GMACS_224 = 0.385  # transferkit summary tf_efficientnet_lite0 --image-size 224 224 (conv + linear MACs)


def timed(fn, x: torch.Tensor, repeats: int, min_seconds: float = 2.0) -> float:
    """Images per second: median of `repeats` timings, each of enough calls to last about min_seconds / repeats."""
    with torch.inference_mode():
        fn(x)
        start = time.perf_counter()
        fn(x)
        one = time.perf_counter() - start
        calls = max(1, int(min_seconds / repeats / max(one, 1e-6)))
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                fn(x)
            rates.append(calls * len(x) / (time.perf_counter() - start))
    return statistics.median(rates)


def gemm_rate(dtype: torch.dtype, n: int = 2048) -> float:
    """GMAC/s of an n x n x n matmul (int8: torch._int_mm, int8 x int8 -> int32, VNNI where the CPU has it)."""
    if dtype == torch.int8:
        a, b = (torch.randint(-128, 128, (n, n), dtype=torch.int8) for _ in range(2))
        return timed(lambda x: torch._int_mm(a, b), torch.empty(1), repeats=5) * n**3 / 1e9
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return timed(lambda x: a @ b, torch.empty(1), repeats=5) * n**3 / 1e9


def variants(use_compile: bool) -> dict[str, tuple]:
    base = create_backbone("tf_efficientnet_lite0", "package").eval()
    cl = copy.deepcopy(base).to(memory_format=torch.channels_last)
    folded = copy.deepcopy(cl)
    fold_batchnorm(folded)
    bf16 = copy.deepcopy(folded).to(torch.bfloat16)

    def autocast(model):
        def run(x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model.forward_features(x)
        return run

    out = {
        "NCHW fp32 (timm default)": (base.forward_features, torch.contiguous_format, torch.float32),
        "channels_last fp32": (cl.forward_features, torch.channels_last, torch.float32),
        "channels_last + BN folded fp32": (folded.forward_features, torch.channels_last, torch.float32),
        "... + bf16 autocast": (autocast(folded), torch.channels_last, torch.float32),
        "... + bf16 weights": (bf16.forward_features, torch.channels_last, torch.bfloat16),
    }
    if use_compile:
        out["... fp32 + torch.compile"] = (torch.compile(folded.forward_features), torch.channels_last, torch.float32)
        out["... bf16 weights + torch.compile"] = (torch.compile(bf16.forward_features), torch.channels_last,
                                                   torch.bfloat16)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="224,64")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args()
    torch.manual_seed(0)
    sizes = [int(s) for s in args.sizes.split(",")]
    runs = variants(args.compile)
    gemm = {"fp32": gemm_rate(torch.float32), "bf16": gemm_rate(torch.bfloat16)}
    rows = []
    for name, (fn, fmt, dtype) in runs.items():
        rates = []
        try:
            for size in sizes:
                x = torch.randn(args.batch_size, 3, size, size).to(dtype).contiguous(memory_format=fmt)
                rates.append(timed(fn, x, args.repeats))
        except Exception as exc:  # noqa: BLE001 - e.g. torch.compile without a C++ compiler: report, go on
            print(f"{name}: failed: {exc!r:.200}", flush=True)
            continue
        rows.append((name, rates))
        print(name, [f"{r:.0f}" for r in rates], flush=True)
    base = rows[0][1]
    lines = [
        f"Model only (random inputs, no decoding), `forward_features` of `tf_efficientnet_lite0`, batch "
        f"{args.batch_size}, images/s (median of {args.repeats}); each row adds one choice to the row above it.",
        "",
        "| variant | " + " | ".join(f"{s}x{s} img/s | vs default" for s in sizes) + " |",
        "|---|" + "---|---|" * len(sizes),
    ]
    for name, rates in rows:
        lines.append(f"| {name} | " + " | ".join(f"{r:.0f} | {r / b:.2f}x" for r, b in zip(rates, base)) + " |")
    best224 = max(r[0] for _, r in rows) if sizes[0] == 224 else None
    lines += ["", f"GEMM 2048^3: fp32 {gemm['fp32']:.0f} GMAC/s, bf16 {gemm['bf16']:.0f} GMAC/s."]
    if best224:
        lines.append(f"At 224 px the fastest variant does {best224 * GMACS_224:.0f} GMAC/s "
                     f"({GMACS_224} GMACs per image): {100 * best224 * GMACS_224 / gemm['bf16']:.0f}% of the bf16 "
                     f"GEMM rate, {100 * best224 * GMACS_224 / gemm['fp32']:.0f}% of the fp32 one (depthwise convs "
                     "do few MACs per byte moved, so they cannot reach GEMM rates).")
    lines += ["", *machine_lines()]
    body = "## Inference variants (model only)\n\n" + "\n".join(lines)
    write_section(args.doc, "inference-variants", body)
    print(body)


if __name__ == "__main__":
    main()
