"""What bounds `transferkit extract` against the plain timm loop on this machine: the parts of a run measured one by
one, side by side in one run, and the best whole-process ratio they allow (issue 16's speed bars).

Parts: the start-up of a fresh process (the imports, one by one, and `transferkit -q extract` on two images:
imports, model build, writing); decoding alone (load + eval transform to uint8) in 1 and 2 threads, under the
JPEG draft rule extract uses (`decode.REDUCING_GAP` 2: DCT scaling to >= 2x the target) and the one before
2026-11-27 (1x: the smallest DCT scale still >= the target); the model alone (torch bf16, the engine extract
runs for these run sizes, batch 64) in 1 and 2 threads; and the pipeline (`FeatureExtractor.transform`, decoding
in threads while the model runs) under both rules. Sets: 12 MP phone JPEGs (bench/photo_speed.py's) and
Fashion-MNIST PNGs at 224 px (bench/extract_speed.py's). The bound for a fresh run of n images is
n / (start-up + n / pipeline rate) against the plain loop's n / rate: start-up counted once, engines as they run.

    python bench/photo_ceiling.py            # ~6 min on 2 cores, nothing else running
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from extract_speed import plain_timm_loop, write_pngs  # noqa: E402
from machine import machine_lines, write_section  # noqa: E402
from photo_speed import cli_seconds, make_photos  # noqa: E402

import transferkit.data.decode as decode  # noqa: E402
from transferkit.codes.extractor import FeatureExtractor, _Images  # noqa: E402

IMPORTS = ["torch", "torchvision", "timm", "sklearn.base", "transferkit.jobs"]


def import_seconds() -> list[tuple[str, float]]:
    """Seconds each of IMPORTS adds in a fresh process, in that order (each after the ones before it)."""
    code = ("import time, importlib\n"
            f"for name in {IMPORTS!r}:\n"
            "    s = time.perf_counter(); importlib.import_module(name); print(name, time.perf_counter() - s)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return [(line.split()[0], float(line.split()[1])) for line in out.splitlines()]


def rate(n: int, fn, *args) -> float:
    """Images/s of `fn(*args)` over `n` images."""
    start = time.perf_counter()
    fn(*args)
    return n / (time.perf_counter() - start)


def drain(batches) -> None:
    for _ in batches:
        pass


def parts(files: list[Path], fe: FeatureExtractor) -> dict[str, float]:
    """Images/s of decoding alone, the model alone and the pipeline on `files`."""
    out = {}
    batches = [range(i, min(i + 64, len(files))) for i in range(0, len(files), 64)]
    for gap in (1, 2):
        decode.REDUCING_GAP = gap
        data = _Images(files, fe.decode_, fe.decode_target_)
        for threads in (1, 2):
            out[f"decode {gap}x, {threads} thread(s)"] = rate(
                len(files), drain, decode.threaded_batches(data, batches, threads))
    decode.REDUCING_GAP = 2
    xs = [fe.normalize(b[0]) for b in decode.threaded_batches(_Images(files, fe.decode_, fe.decode_target_),
                                                              batches, 2)]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        fe.model_codes(xs[0])  # warm-up at this thread count
        out[f"model, {threads} thread(s)"] = rate(len(files), lambda: [fe.model_codes(x) for x in xs])
    for gap in (1, 2):
        decode.REDUCING_GAP = gap
        out[f"pipeline {gap}x"] = rate(len(files), fe.transform, files)
    decode.REDUCING_GAP = 2
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "transferkit-photo-bench")
    parser.add_argument("--n", type=int, default=160, help="images per set for the rates")
    parser.add_argument("--doc", type=Path, default=Path(__file__).resolve().parents[1] / "docs/benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    sets = {"JPEG 4032x3024": make_photos(args.work / f"p12-{args.n}", args.n, (4032, 3024)),
            "PNG 28x28 at 224 px": write_pngs(args.work / f"png-{args.n}", args.n // 10)}
    imports = import_seconds()
    print(imports, flush=True)
    two = args.work / "two"  # a data set needs two classes: one image each
    for name in ("a", "b"):
        (two / name).mkdir(parents=True, exist_ok=True)
        (two / name / "x.png").write_bytes(next(sets["PNG 28x28 at 224 px"].rglob("*.png")).read_bytes())
    startup = min(cli_seconds(["extract", str(two), "-o", str(args.work / "two-out"), "--no-cache"],
                              Path(tempfile.mkdtemp(dir=args.work))) for _ in range(2))
    print(f"start-up {startup:.2f} s", flush=True)
    fe = FeatureExtractor(weights="package", engine="torch", progress=False).fit()
    fe.prepare(args.n)
    rows = []
    for name, root in sets.items():
        files = sorted(p for p in root.rglob("*") if p.suffix in (".jpg", ".png"))
        plain = plain_timm_loop(root, None)
        fe.transform(files[:16])  # warm-up
        got = parts(files, fe)
        best = max(got["pipeline 1x"], got["pipeline 2x"]) if name.startswith("JPEG") else got["pipeline 2x"]
        bound = {n: n / (startup + n / got["pipeline 2x"]) / plain for n in (1000, 10_000)}
        rows.append(f"| {name} | {plain:.1f} | " + " | ".join(f"{v:.1f}" for v in got.values())
                    + f" | {got['pipeline 2x'] / plain:.1f}x ({best / plain:.1f}x) | {bound[1000]:.1f}x | "
                    f"{bound[10_000]:.1f}x |")
        print(rows[-1], flush=True)
        header = list(got)
    imp = ", ".join(f"{name} {s:.2f} s" for name, s in imports)
    body = "\n".join([
        "## What bounds extract against the plain loop (bench/photo_ceiling.py)",
        "",
        *machine_lines(),
        f"- images per set: {args.n}; engine: torch {fe.precision_} (what extract runs below 2,000 images at 224 px);"
        " batch 64",
        "",
        f"Start-up of a fresh process: `transferkit -q extract` on two images, whole wall time **{startup:.2f} s**"
        f" (best of 2). Its imports, each after those before it: {imp}.",
        "",
        "Images per second (plain: the plain timm loop, exact decoding, fp32, 2 threads; decode Nx: load + eval"
        " transform to uint8 with JPEGs drafted to >= N x the target; pipeline: `FeatureExtractor.transform`,"
        " decoding in threads while the model runs). Steady: pipeline (2x, extract's rule) / plain, in brackets"
        " the faster rule's. Bound n: a fresh run of n images at the 2x pipeline rate plus the start-up (torch"
        " bf16 throughout: at 10,000 extract may time and build ONNX Runtime int8, bench/engine_choice.py),"
        " against the plain loop's n images (its own start-up not counted).",
        "",
        "| set | plain | " + " | ".join(header) + " | steady | bound 1,000 | bound 10,000 |",
        "|---" * (len(header) + 5) + "|",
        *rows,
    ])
    write_section(args.doc, "photo-ceiling", body)
    print(body)


if __name__ == "__main__":
    main()
