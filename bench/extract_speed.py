"""Feature-extraction speed, side by side in one run: the plain timm loop a user would write vs transferkit.

(a) the plain loop: the model from timm (here with the packaged ImageNet weights, as nothing can be
    downloaded), eval, fp32, NCHW, torchvision ImageFolder with the model's own timm transform,
    DataLoader(batch_size=32), forward_features + forward_head(pre_logits=True) under no_grad.
(b) `transferkit extract` with its defaults (cache off, so the model does the work), with the engine files
    already built (int8 here: the one-time export and quantization are timed and reported separately);
(c) the same with `--precision fp32` (ONNX Runtime, fp32), (d) with `--engine torch` (bf16 weights on this
    CPU, the torch fast path), (e) with `--num-workers 1`.
All read the same PNG files (Fashion-MNIST training images written to disk): 2,000 at 224x224 and
10,000 at the 64x64 the recipes use (more there, so the fixed start-up cost does not dominate).
Also: a GEMM in fp32 and bf16 (this machine's practical peak), probe accuracy
with the fast paths vs fp32 on Fashion-MNIST 1,000/class, re-extraction from the code cache vs the first
run on 10,000 images, and peak RSS of extracting 6,000 vs 60,000 images.

    python bench/extract_speed.py            # ~25 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from inference_variants import GMACS_224, gemm_rate  # noqa: E402
from machine import machine_lines, write_section  # noqa: E402

from transferkit.recipes.demo import fashion_mnist  # noqa: E402


def write_pngs(root: Path, per_class: int) -> Path:
    """Fashion-MNIST training images as an ImageFolder of PNG files (what users usually have)."""
    from PIL import Image

    if (root / "done").exists():
        return root
    data = fashion_mnist("train", per_class=per_class)
    for i in range(len(data)):
        folder = root / data.classes[data.targets[i]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(data._pixels[i]).save(folder / f"{i:05d}.png")
    (root / "done").write_text("")
    return root


def plain_timm_loop(root: Path, size: int | None) -> float:
    """Images/s of the loop a user would write."""
    import timm.data
    import torchvision

    from transferkit.models.backbones import create_backbone

    model = create_backbone("tf_efficientnet_lite0", "package").eval()  # timm.create_model(..., pretrained=True)
    cfg = timm.data.resolve_data_config({}, model=model)
    if size is not None:
        cfg = {**cfg, "input_size": (3, size, size), "crop_pct": 1.0}
    dataset = torchvision.datasets.ImageFolder(str(root), transform=timm.data.create_transform(**cfg))
    loader = torch.utils.data.DataLoader(dataset, batch_size=32)
    start = time.perf_counter()
    n = 0
    with torch.no_grad():
        for x, _ in loader:
            model.forward_head(model.forward_features(x), pre_logits=True)
            n += len(x)
    return n / (time.perf_counter() - start)


def transferkit_extract(root: Path, size: int | None, out: Path, **kwargs) -> tuple[float, dict]:
    """Images/s of `extract_features` with its defaults (wall time of the call, model build included)."""
    from transferkit.jobs import extract_features

    start = time.perf_counter()
    store = extract_features(root, out, image_size=size, progress=False, **{"cache": False, **kwargs})
    return len(store) / (time.perf_counter() - start), store.meta


def engine_seconds(size: int | None) -> tuple[float, float]:
    """Seconds of the one-time ONNX export (plus its parity check), then of the int8 quantization from it
    (calibration, quantization, check), for extract's default codes at `size`."""
    from transferkit.codes.extractor import FeatureExtractor

    fe = FeatureExtractor(image_size=size, precision="fp32", engine="onnxruntime").fit()
    fe.engine_path().unlink(missing_ok=True)
    fe.engine_path("int8").unlink(missing_ok=True)
    start = time.perf_counter()
    fe.prepare()
    export = time.perf_counter() - start
    start = time.perf_counter()
    FeatureExtractor(image_size=size, precision="int8").fit().prepare()
    return export, time.perf_counter() - start


def probe_accuracy(work: Path, **kwargs) -> tuple[float, str]:
    """Fashion-MNIST, 1,000/class: codes of blocks.4|4x4 at 64 px (or as `kwargs` say), LinearSVC at the core
    issue's C."""
    from transferkit.jobs import extract_features, train_probe

    train, test = fashion_mnist("train", per_class=1000), fashion_mnist("t10k")
    opts = {"layer": "blocks.4", "pool": "4x4", "image_size": 64, "progress": False, "cache": False, **kwargs}
    meta = extract_features(train, work / "train", **opts).meta
    extract_features(test, work / "test", like=work / "train", progress=False, cache=False)
    acc = train_probe(work / "train", work / "probe", test=work / "test", C=0.001).evaluation.accuracy
    return acc, f"{meta['engine']}, {meta['precision']}"


def cache_times(work: Path) -> tuple[float, float]:
    """Seconds to extract 10,000 images with extract's defaults (224 px, pre-logits) into an empty code cache,
    then again from it; each call whole, model build included."""
    from transferkit.jobs import extract_features

    data = fashion_mnist("train", per_class=1000)
    os.environ["TRANSFERKIT_CACHE"] = str(work / "cache")
    engine_seconds(None)  # the engine files into this cache root first: the first run times encoding, not export
    times = []
    for name in ("first", "again"):
        start = time.perf_counter()
        extract_features(data, work / name, progress=False)
        times.append(time.perf_counter() - start)
    return times[0], times[1]


def peak_rss(n_per_class: int | None, work: Path) -> float:
    """Peak RSS in MiB of a fresh process extracting n_per_class images per class (None: all 60,000),
    both with the ONNX Runtime engine (auto picks torch for 6,000 images at 64 px: not like for like).

    Read as VmHWM from /proc: getrusage's ru_maxrss survives exec on Linux, so a child started from this
    (large) process would report at least this process's size.
    """
    code = (
        "from transferkit.recipes.demo import fashion_mnist\n"
        "from transferkit.jobs import extract_features\n"
        f"data = fashion_mnist('train', per_class={n_per_class!r})\n"
        f"extract_features(data, {str(work / 'rss')!r}, image_size=64, layer='blocks.4', pool='4x4', "
        "progress=False, cache=False, engine='onnxruntime')\n"
        "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(proc.stdout.split()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="per class, for the 224 px speed runs (x10 images)")
    parser.add_argument("--images-64", type=int, default=1000, help="per class, for the 64 px speed runs")
    parser.add_argument("--work", type=Path, default=Path("bench/.work/speed"))
    parser.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    fresh = tempfile.TemporaryDirectory(dir=args.work)  # an empty cache root: what a fresh machine would do
    os.environ["TRANSFERKIT_CACHE"] = fresh.name
    roots = {None: write_pngs(args.work / f"png-{args.images}", args.images),
             64: write_pngs(args.work / f"png-{args.images_64}", args.images_64)}
    gemm = {"fp32": gemm_rate(torch.float32), "bf16": gemm_rate(torch.bfloat16), "int8": gemm_rate(torch.int8)}
    rows, engines = {}, {}
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        tmp = Path(tmp)
        for size, root in roots.items():
            engines[size or 224] = engine_seconds(size)
            plain = plain_timm_loop(root, size)
            fast, meta = transferkit_extract(root, size, tmp / f"tk-{size}")
            fp32, meta_f = transferkit_extract(root, size, tmp / f"tk-{size}-f", precision="fp32")
            torch_path, meta_t = transferkit_extract(root, size, tmp / f"tk-{size}-t", engine="torch")
            workers, _ = transferkit_extract(root, size, tmp / f"tk-{size}-w", num_workers=1)
            rows[size or 224] = (plain, fast, meta, workers, torch_path, meta_t, meta["dataset"]["n_items"], fp32,
                                 meta_f)
            print(f"{size or 224}px: plain {plain:.0f} img/s, transferkit {fast:.0f} img/s ({meta['engine']}, "
                  f"{meta['precision']}), fp32 {fp32:.0f} img/s ({meta_f['engine']}), torch engine "
                  f"{torch_path:.0f} img/s, {workers:.0f} with 1 DataLoader worker", flush=True)
        first, again = cache_times(tmp)
        print(f"cache: {first:.1f} s then {again:.2f} s", flush=True)
        peak_rss(60, tmp)  # exports the engine into this cache root if needed, so neither run below pays for it
        rss = {n: peak_rss(n, tmp) for n in (600, None)}
        print(f"peak RSS {rss}", flush=True)
        # accuracy last: it does not depend on what else runs on the machine
        os.environ["TRANSFERKIT_CACHE"] = str(tmp / "probe-cache")  # no engine files: what a first run does
        acc = {"fast": probe_accuracy(tmp / "fast"),
               "fp32": probe_accuracy(tmp / "fp32", precision="fp32", fold_bn=False, engine="torch"),
               "int8": probe_accuracy(tmp / "int8", precision="int8")}
        at224 = {"layer": "pre_logits", "pool": "avg", "image_size": None}
        acc |= {"fp32-224": probe_accuracy(tmp / "fp32-224", precision="fp32", **at224),
                "int8-224": probe_accuracy(tmp / "int8-224", precision="int8", **at224)}
        print(f"probe {acc}", flush=True)
    meta224 = rows[224][2]
    lines = [
        "`tf_efficientnet_lite0`, packaged ImageNet weights, Fashion-MNIST training images as PNG files, pre-logits "
        "codes; (a) the plain timm loop (fp32, NCHW, batch 32, the model's own transform, torchvision ImageFolder + "
        "DataLoader, no workers); (b) `transferkit extract` defaults (cache off; engine "
        f"{meta224['engine']}, precision {meta224['precision']}, {meta224['folded_batchnorms']} BatchNorms folded, "
        f"batch {meta224['batch_size']}, uint8 decode + one normalisation per batch), with the engine files already "
        "built; (c) `--precision fp32` (ONNX Runtime fp32); (d) `--engine torch` (its precision auto: bf16 weights "
        "here, channels_last). Same run, same files; wall time of the whole call, model build included. The GMAC/s "
        "and GEMM shares are (b)'s: its int8 convolutions are best compared with the int8 GEMM.",
        "",
        "| input | images | (a) plain timm loop | (b) transferkit | (b)/(a) | (b) GMAC/s "
        "| share of fp32 / bf16 / int8 GEMM | (c) `--precision fp32` | (d) `--engine torch` "
        "| (b) with `--num-workers 1` | one-time export + int8 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size, (plain, fast, meta, workers, torch_path, meta_t, n, fp32, meta_f) in rows.items():
        macs = GMACS_224 * (size / 224) ** 2
        lines.append(f"| {size}x{size} | {n:,} | {plain:.0f} img/s | {fast:.0f} img/s ({meta['engine']}, "
                     f"{meta['precision']}) | **{fast / plain:.1f}x** | {fast * macs:.0f} | "
                     f"{100 * fast * macs / gemm['fp32']:.0f}% / {100 * fast * macs / gemm['bf16']:.0f}% / "
                     f"{100 * fast * macs / gemm['int8']:.0f}% | "
                     f"{fp32:.0f} img/s ({meta_f['engine']}, {fp32 / plain:.1f}x) | "
                     f"{torch_path:.0f} img/s ({meta_t['precision']}, {torch_path / plain:.1f}x) | {workers:.0f} img/s "
                     f"| {engines[size][0]:.1f} s + {engines[size][1]:.1f} s |")
    (fast, how), fp32 = acc["fast"], acc["fp32"][0]
    lines += [
        "",
        f"GEMM 2048^3 in the same run: fp32 {gemm['fp32']:.0f} GMAC/s, bf16 {gemm['bf16']:.0f} GMAC/s, int8 "
        f"{gemm['int8']:.0f} GMAC/s (`torch._int_mm`) "
        f"({GMACS_224} GMACs per 224x224 image, scaled by area for 64x64).",
        "",
        f"- Probe accuracy, Fashion-MNIST 1,000/class, official test set, C=0.001. blocks.4|4x4 at 64 px: "
        f"torch fp32 eager, unfolded {100 * fp32:.2f}%; defaults ({how}, fresh cache) {100 * fast:.2f}% "
        f"({100 * (fast - fp32):+.2f} points); `--precision int8` {100 * acc['int8'][0]:.2f}% "
        f"({100 * (acc['int8'][0] - fp32):+.2f}). Pre-logits at 224 px: fp32 ({acc['fp32-224'][1]}) "
        f"{100 * acc['fp32-224'][0]:.2f}%, int8 {100 * acc['int8-224'][0]:.2f}% "
        f"({100 * (acc['int8-224'][0] - acc['fp32-224'][0]):+.2f}).",
        f"- Code cache, 10,000 images, extract's defaults (224 px, pre-logits): first run {first:.1f} s, "
        f"again {again:.2f} s "
        f"(**{first / again:.0f}x**).",
        f"- Peak RSS extracting 6,000 vs 60,000 images (64 px, blocks.4|4x4, ONNX Runtime): {rss[600]:.0f} MiB vs "
        f"{rss[None]:.0f} MiB (**{rss[None] / rss[600]:.2f}x**).",
        "",
        *machine_lines(),
    ]
    body = "## Code extraction speed\n\n" + "\n".join(lines)
    (args.work / "result.json").write_text(json.dumps({
        "rows": {k: [v[0], v[1], v[3], v[4], v[7]] for k, v in rows.items()}, "engines": engines, "gemm": gemm,
        "acc": acc,
        "cache": [first, again], "rss": [rss[600], rss[None]]}, indent=1))
    write_section(args.doc, "extract-speed", body)
    print(body)


if __name__ == "__main__":
    main()
