"""Decoding at the size needed vs exact decoding on a labelled task with large JPEGs (issue 16's probe bar):
Fashion-MNIST items upscaled into phone-size JPEGs, encoded both ways, a linear probe trained and tested on each.
Written to docs/benchmarks.md (section decode-fidelity).

Images: as bench/photo_speed.py makes them: the 28x28 item upscaled (bicubic) to the canvas height, centred on
a 4:3 grey-0 canvas (1600x1200 by default), sensor-like Gaussian noise (sigma 3; each image a window of one
noise field, at an offset seeded by the image's index, so the files do not depend on how many processes write
them), JPEG quality 92. Written under --work (a temporary
folder) and deleted at the end unless --keep.

Codes: `extract_features(..., exact_decode=False | True)`, default model, layer (pre-logits) and image size,
fp32 on ONNX Runtime for both (one engine, so only decoding differs), no code cache. Probe: `LinearProbe()`
with its defaults (C by 5-fold CV), as `transferkit probe` fits it, trained on each set of training codes and
tested on the same images' codes of the same decoding. Reported: both accuracies, the paired difference with
a 95% bootstrap interval over test images (10,000 resamples) and McNemar's exact test, the same at one fixed
C (the exact probe's), the cosine of the two codes of each test image, the pixel difference of the two
decodings after the eval transform (uint8, of 255), and decode + transform ms/image in one thread (rough on a
shared machine).

    python bench/decode_fidelity.py --train-per-class 300   # 3,000 train, the 10,000 official test images:
                                                            # ~65 min on 2 shared cores (20 to write the JPEGs)
    python bench/decode_fidelity.py --train-per-class 200 --test-per-class 100   # a quick look
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_lines, write_section  # noqa: E402

from transferkit.recipes.demo import fashion_mnist  # noqa: E402

_NOISE: dict[tuple[int, int], np.ndarray] = {}


def _noise(h: int, w: int) -> np.ndarray:
    """A (2h, 2w) field of floor(N(0, 3)) samples, made once per process: each image takes a window of it at a
    random offset (drawing 2 M normal samples per image took as long as the rest of the image)."""
    if (h, w) not in _NOISE:
        _NOISE[h, w] = np.floor(np.random.default_rng(0).normal(0, 3, (2 * h, 2 * w))).astype(np.int16)
    return _NOISE[h, w]


def _write_one(job: tuple[np.ndarray, tuple[int, int], int, str]) -> None:
    """One item as a phone-size JPEG (photo_speed.fmnist_jpegs' recipe; its noise a window of `_noise`)."""
    pixels, (w, h), seed, path = job
    item = Image.fromarray(pixels).resize((h, h), Image.Resampling.BICUBIC)
    canvas = Image.new("L", (w, h))
    canvas.paste(item, ((w - h) // 2, 0))
    y, x = np.random.default_rng(seed).integers(0, (h, w))
    noisy = np.asarray(canvas, dtype=np.int16) + _noise(h, w)[y: y + h, x: x + w]  # = floor(canvas + N(0, 3))
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).convert("RGB").save(path, quality=92)


def make_jpegs(root: Path, split: str, per_class: int | None, size: tuple[int, int], seed: int) -> Path:
    """An ImageFolder of Fashion-MNIST `split` items as large JPEGs (all of them if `per_class` is None)."""
    if (root / "done").exists():
        return root
    data = fashion_mnist(split, per_class=per_class)
    jobs = []
    for i in range(len(data)):
        folder = root / data.classes[data.targets[i]]
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((data._pixels[i], size, seed * 1_000_000 + i, str(folder / f"{i:05d}.jpg")))
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_write_one, jobs, chunksize=64))
    (root / "done").write_text("")
    return root


def encode(train: Path, test: Path, out: Path, exact: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                        np.ndarray, list[str]]:
    """Pre-logits codes of `train` and `test` (decoded exactly or at the size needed): Xtr, ytr, Xte, yte, sources.
    Codes already in `out` (a kept --work) are read, not made again."""
    from transferkit.codes.store import FeatureStore
    from transferkit.jobs import extract_features

    opts = {"progress": False, "cache": False, "exact_decode": exact, "precision": "fp32", "engine": "onnxruntime"}
    if not (out / "test" / "meta.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        extract_features(train, out / "train", **opts)
        extract_features(test, out / "test", like=out / "train", progress=False, cache=False)
    a, b = FeatureStore(out / "train"), FeatureStore(out / "test")
    key = a.key()
    return a.load(key), a.labels, b.load(key), b.labels, b.sources


def probe(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, C: float | str = "auto") -> tuple[np.ndarray, float]:
    """Test predictions and C of a LinearProbe with its defaults (C by 5-fold CV unless given)."""
    from transferkit.probe.linear import LinearProbe

    fitted = LinearProbe(C=C).fit(x, y)
    return fitted.predict(x_test), float(fitted.best_C_)


def paired(a: np.ndarray, b: np.ndarray, resamples: int = 10_000) -> tuple[float, float, float, int, int, float]:
    """Accuracy difference a - b (points) of per-image correctness, its 95% paired bootstrap interval, the
    discordant counts (a right only, b right only) and McNemar's exact two-sided p."""
    from scipy.stats import binomtest

    d = a.astype(np.float64) - b.astype(np.float64)
    rng = np.random.default_rng(0)
    means = np.array([d[rng.integers(0, len(d), len(d))].mean() for _ in range(resamples)])
    lo, hi = np.percentile(means, [2.5, 97.5])
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    p = binomtest(only_a, only_a + only_b).pvalue if only_a + only_b else 1.0
    return 100 * d.mean(), 100 * lo, 100 * hi, only_a, only_b, float(p)


def draft_to_target(path: Path, target) -> Image.Image:
    """The rule before 2026-11-27 ("jpeg draft, reduce to 2x"): the DCT scale drafted right down to the target."""
    with Image.open(path) as img:
        img.draft("RGB", target.size_for(img.size))
        img.load()
        return target.reduce(img).convert("RGB")


def pixels_and_speed(files: list[Path], n: int) -> list[tuple[str, float, float, float, float]]:
    """On `n` of `files`, for exact decoding, the rule before 2026-11-27 and the current rule: decode + eval
    transform ms/image in one thread, then against exact decoding the mean |difference| of the transform's
    uint8 output, its 99.9th percentile, and the sharpness ratio (mean squared gradient)."""
    import timm.data

    from transferkit.data.decode import DECODE, load_image
    from transferkit.data.transforms import build_transform, decode_target
    from transferkit.models.backbones import create_backbone

    config = timm.data.resolve_model_data_config(create_backbone("tf_efficientnet_lite0", "package"))
    tf, target = build_transform(config, uint8=True), decode_target(config)
    rules = {"exact": lambda f: load_image(f), "draft to 1x (before 2026-11-27)": lambda f: draft_to_target(f, target),
             f"current: {DECODE}": lambda f: load_image(f, target)}
    files = files[:: max(1, len(files) // n)][:n]
    out = {name: [] for name in rules}
    seconds = dict.fromkeys(rules, 0.0)
    for f in files:
        for name, decode in rules.items():
            start = time.perf_counter()
            out[name].append(tf(decode(f)).float())
            seconds[name] += time.perf_counter() - start

    def sharpness(x: torch.Tensor) -> float:
        return float(((x[:, 1:] - x[:, :-1]) ** 2).mean() + ((x[:, :, 1:] - x[:, :, :-1]) ** 2).mean())

    rows = []
    for name in rules:
        diff = torch.cat([(a - b).abs().flatten() for a, b in zip(out["exact"], out[name])]).numpy()
        sharp = np.mean([sharpness(b) / sharpness(a) for a, b in zip(out["exact"], out[name])])
        rows.append((name, 1000 * seconds[name] / len(files), float(diff.mean()), float(np.percentile(diff, 99.9)),
                     float(sharp)))
    return rows


def photos_12mp(root: Path, n: int) -> list[Path]:
    """`n` real photos as 12 MP phone JPEGs (bench/photo_speed.py's make_photos), for decode times."""
    from photo_speed import make_photos

    return sorted(make_photos(root, n, (4032, 3024)).rglob("*.jpg"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "transferkit-decode-fidelity")
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=None, help="default: the whole official test set")
    parser.add_argument("--size", default="1600x1200", help="JPEG width x height")
    parser.add_argument("--pixels", type=int, default=200, help="test images for pixel differences and times")
    parser.add_argument("--photos", type=int, default=12, help="12 MP photos for decode times")
    parser.add_argument("--keep", action="store_true", help="keep the JPEGs and codes in --work")
    parser.add_argument("--doc", type=Path, default=Path(__file__).resolve().parents[1] / "docs/benchmarks.md")
    parser.add_argument("--no-doc", action="store_true", help="print only")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    size = tuple(int(v) for v in args.size.split("x"))
    work = args.work
    start = time.perf_counter()
    train = make_jpegs(work / f"train-{args.train_per_class}-{args.size}", "train", args.train_per_class, size, 1)
    test = make_jpegs(work / f"test-{args.test_per_class}-{args.size}", "t10k", args.test_per_class, size, 2)
    files = sorted(test.rglob("*.jpg"))
    mb = sum(f.stat().st_size for f in files) / len(files) / 2**20
    print(f"images written in {time.perf_counter() - start:.0f} s; test files {mb:.2f} MB on average", flush=True)
    codes = {}
    from transferkit.data.decode import DECODE

    for name, exact in (("draft", False), ("exact", True)):
        start = time.perf_counter()
        folder = "codes-exact" if exact else "codes-" + "".join(c if c.isalnum() else "-" for c in DECODE)
        codes[name] = encode(train, test, work / folder, exact)
        print(f"{name}: encoded in {time.perf_counter() - start:.0f} s", flush=True)
    (xd, yd, td, ytd, src_d), (xe, ye, te, yte, src_e) = codes["draft"], codes["exact"]
    assert src_d == src_e and np.array_equal(yd, ye) and np.array_equal(ytd, yte), "the two runs saw other images"
    cos = (td * te).sum(1) / np.linalg.norm(td, axis=1) / np.linalg.norm(te, axis=1)
    pred_e, c_e = probe(xe, ye, te)
    pred_d, c_d = probe(xd, yd, td)
    pred_dc, _ = probe(xd, yd, td, C=c_e)  # the draft probe at the exact probe's C: C's choice left out
    ok_e, ok_d, ok_dc = pred_e == yte, pred_d == yte, pred_dc == yte
    diff = paired(ok_d, ok_e)
    diff_c = paired(ok_dc, ok_e)
    n_train, n_test = len(yd), len(yte)
    row = (f"| {args.size} | {DECODE} | {n_train:,} | {n_test:,} | {100 * ok_e.mean():.2f}% (C={c_e:g}) | "
           f"{100 * ok_d.mean():.2f}% (C={c_d:g}) | **{diff[0]:+.2f}** [{diff[1]:+.2f}, {diff[2]:+.2f}] | "
           f"{diff[3]} / {diff[4]}, p={diff[5]:.2f} | {100 * ok_dc.mean():.2f}%: {diff_c[0]:+.2f} "
           f"[{diff_c[1]:+.2f}, {diff_c[2]:+.2f}] | {cos.mean():.4f} / {cos.min():.4f} |")
    print(row, flush=True)
    pixel_rows = []
    for what, pics in ((f"{args.size} items ({mb:.2f} MB)", files), ("4032x3024 photos", photos_12mp(
            work / "p12", args.photos))):
        for name, ms, mad, p999, sharp in pixels_and_speed(pics, args.pixels):
            pixel_rows.append(f"| {what} | {name} | {ms:.1f} | {mad:.3f} | {p999:.0f} | {sharp:.3f} |")
            print(pixel_rows[-1], flush=True)
    body = "\n".join([
        "## Decoding at the size needed: probe accuracy on large JPEGs (bench/decode_fidelity.py)",
        "",
        *machine_lines(),
        "- setup: Fashion-MNIST items upscaled into JPEGs (item bicubic to the canvas height, centred, noise sigma 3, "
        "quality 92); `tf_efficientnet_lite0` packaged weights, pre-logits codes at the default 224 px (resize 256,"
        " centre crop), fp32 ONNX Runtime for both decodings, no cache; `LinearProbe()` defaults (C by 5-fold CV)."
        " Difference: draft minus exact, points, 95% paired bootstrap interval over the test images; McNemar:"
        " test images only the draft probe / only the exact probe got right, exact two-sided p.",
        "",
        "| JPEGs | draft rule (`DECODE`) | train | test | exact decoding | draft decoding | difference [95% CI] |"
        " McNemar | draft at exact's C: difference | test code cosine mean / worst |",
        "|---|---|---:|---:|---:|---:|---|---|---|---|",
        row,
        "",
        f"Decode + eval transform in one thread (ms/image, rough: machine shared), and the transform's uint8 output"
        f" against exact decoding (of 255), on {args.pixels} of the test images and {args.photos} real photos as 12 MP"
        " JPEGs (bench/photo_speed.py's):",
        "",
        "| JPEGs | decoding | ms/image | mean abs diff | 99.9th pct abs diff | sharpness / exact |",
        "|---|---|---:|---:|---:|---:|",
        *pixel_rows,
    ])
    print(body, flush=True)
    if not args.no_doc:
        write_section(args.doc, "decode-fidelity", body)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
