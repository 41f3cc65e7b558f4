"""Real photos: `transferkit extract` on phone-size JPEGs vs the plain timm loop, and what decoding at the size
needed costs in fidelity. Side by side in one run, written to docs/benchmarks.md (section photo-speed).

Photos: random 4:3 crops (and mirrors) of real photos (scikit-learn's two samples and scikit-image's
astronaut, coffee, chelsea, rocket), resized to 4032x3024 (12 MP) or 1600x1200, with sensor-like Gaussian
noise (sigma 3) so the JPEG files (quality 92) have a realistic size.

(a) the plain loop a user would write: torchvision ImageFolder with the model's timm eval transform,
    DataLoader(batch_size=32), fp32 forward_features + forward_head(pre_logits=True);
(b) `transferkit extract DIR -o OUT --no-cache` as a fresh process (whole wall time: start-up, model build,
    engine export/quantization if it pays, decoding, writing), with an empty cache root (no engine files);
(c) the same again with the engine files built (warm); (d) (b) with `--exact-decode`.
Decode-only rates: one image at a time, load + the eval transform to uint8, exact vs at the size needed.
Fidelity: cosine of draft-decoded codes to exactly decoded codes per layer on the 12 MP photos; and a linear
probe on Fashion-MNIST items upscaled into 1600x1200 JPEGs (100 per class to train, 100 per class to test).

    python bench/photo_speed.py              # ~25 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from extract_speed import plain_timm_loop  # noqa: E402
from machine import machine_lines, write_section  # noqa: E402

from transferkit.recipes.demo import fashion_mnist  # noqa: E402


def source_photos() -> list[Image.Image]:
    """Real photos that ship with scikit-learn and scikit-image (the bench extra)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    photos += [Image.fromarray(getattr(skimage.data, n)()).convert("RGB")
               for n in ("astronaut", "coffee", "chelsea", "rocket")]
    return photos


def phone_jpeg(photo: Image.Image, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A random 4:3 crop (at least half the photo's width), maybe mirrored, at `size`, with sensor noise."""
    w = int(photo.width * rng.uniform(0.5, 1.0))
    h = min(photo.height, w * 3 // 4)
    w = h * 4 // 3
    x, y = rng.integers(0, photo.width - w + 1), rng.integers(0, photo.height - h + 1)
    crop = photo.crop((x, y, x + w, y + h))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    big = np.asarray(crop.resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
    return Image.fromarray(np.clip(big + rng.normal(0, 3, big.shape), 0, 255).astype(np.uint8))


def _write_photos(root: Path, indices: range, size: tuple[int, int]) -> None:
    photos = source_photos()
    for i in indices:
        folder = root / f"photo{i % len(photos)}"
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([0, i])  # per photo: the same files whichever process writes them
        phone_jpeg(photos[i % len(photos)], size, rng).save(folder / f"{i:05d}.jpg", quality=92)


def make_photos(root: Path, n: int, size: tuple[int, int]) -> Path:
    """An ImageFolder of `n` phone JPEGs, one class per source photo (cached in `root`), written by one process
    per core."""
    if (root / "done").exists():
        return root
    from concurrent.futures import ProcessPoolExecutor

    workers = os.cpu_count() or 1
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_photos, [root] * workers, [range(k, n, workers) for k in range(workers)],
                      [size] * workers))
    (root / "done").write_text("")
    return root


def fmnist_jpegs(root: Path, split: str, per_class: int) -> Path:
    """Fashion-MNIST items upscaled into 1600x1200 JPEGs (the item centred on a 4:3 canvas), an ImageFolder."""
    if (root / "done").exists():
        return root
    data = fashion_mnist(split, per_class=per_class)
    rng = np.random.default_rng(1)
    for i in range(len(data)):
        folder = root / data.classes[data.targets[i]]
        folder.mkdir(parents=True, exist_ok=True)
        item = Image.fromarray(data._pixels[i]).resize((1200, 1200), Image.Resampling.BICUBIC)
        canvas = Image.new("L", (1600, 1200))
        canvas.paste(item, (200, 0))
        x = np.asarray(canvas, dtype=np.float32) + rng.normal(0, 3, (1200, 1600))
        Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).convert("RGB").save(folder / f"{i:05d}.jpg", quality=92)
    (root / "done").write_text("")
    return root


def cli_seconds(args: list[str], cache_root: Path) -> float:
    """Wall seconds of `transferkit -q ARGS` as a fresh process with cache root `cache_root`."""
    env = {**os.environ, "TRANSFERKIT_CACHE": str(cache_root)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "transferkit", "-q", *args], check=True, env=env)
    return time.perf_counter() - start


def decode_rates(root: Path, n: int = 40) -> tuple[float, float]:
    """Images/s of load + eval transform (to uint8), one thread, exactly and at the size needed."""
    import timm.data

    from transferkit.data.decode import load_image
    from transferkit.data.transforms import build_transform, decode_target
    from transferkit.models.backbones import create_backbone

    config = timm.data.resolve_model_data_config(create_backbone("tf_efficientnet_lite0", "package"))
    tf, target = build_transform(config, uint8=True), decode_target(config)
    files = sorted(root.rglob("*.jpg"))[:n]
    rates = []
    for t in (None, target):
        start = time.perf_counter()
        for f in files:
            tf(load_image(f, t))
        rates.append(len(files) / (time.perf_counter() - start))
    return rates[0], rates[1]


def fidelity(root: Path, n: int = 60) -> list[str]:
    """Cosine of draft-decoded codes to exactly decoded codes, per layer, on `n` of the photos."""
    from transferkit.codes.extractor import FeatureExtractor

    files = sorted(root.rglob("*.jpg"))[:n]
    kw = {"weights": "package", "layer": "blocks.2,blocks.4,pre_logits", "precision": "fp32", "engine": "torch"}
    draft = FeatureExtractor(**kw).fit()
    exact = FeatureExtractor(**kw, exact_decode=True).fit()
    a, b = draft.transform(files), exact.transform(files)
    lines, names = [], np.array([name.rsplit(":", 1)[0] for name in draft.get_feature_names_out()])
    for key in draft.keys_:
        x, y = a[:, names == key], b[:, names == key]
        cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
        name = key.replace("|", "\\|")  # a pipe inside a markdown table cell
        lines.append(f"| {name} | {cos.mean():.4f} | {cos.min():.4f} | {files[int(np.argmin(cos))].name} |")
    return lines


def probe_accuracies(work: Path, per_class: int) -> tuple[float, float]:
    """Test accuracy of a linear probe (pre-logits, C by CV) on the upscaled Fashion-MNIST JPEGs: draft, exact."""
    from transferkit.jobs import extract_features, train_probe

    train = fmnist_jpegs(work / f"fm-train-{per_class}", "train", per_class)
    test = fmnist_jpegs(work / f"fm-test-{per_class}", "t10k", per_class)
    accs = []
    for name, exact in (("draft", False), ("exact", True)):
        opts = {"progress": False, "cache": False, "exact_decode": exact, "precision": "fp32"}
        extract_features(train, work / f"{name}-train", **opts)
        extract_features(test, work / f"{name}-test", like=work / f"{name}-train", progress=False, cache=False)
        report = train_probe(work / f"{name}-train", work / f"{name}-probe", test=work / f"{name}-test", cv=3)
        accs.append(report.evaluation.accuracy)
    return accs[0], accs[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "transferkit-photo-bench")
    parser.add_argument("--n12", type=int, default=240, help="12 MP photos")
    parser.add_argument("--n2", type=int, default=1000, help="1600x1200 photos")
    parser.add_argument("--per-class", type=int, default=100, help="Fashion-MNIST JPEGs per class (train, test)")
    parser.add_argument("--doc", type=Path, default=Path(__file__).resolve().parents[1] / "docs/benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    work = args.work
    sets = {"4032x3024": make_photos(work / f"p12-{args.n12}", args.n12, (4032, 3024)),
            "1600x1200": make_photos(work / f"p2-{args.n2}", args.n2, (1600, 1200))}
    rows = []
    for name, root in sets.items():
        n = sum(1 for _ in root.rglob("*.jpg"))
        mb = sum(f.stat().st_size for f in root.rglob("*.jpg")) / n / 2**20
        plain = plain_timm_loop(root, None)
        cache_root = Path(tempfile.mkdtemp(dir=work))
        out = work / f"out-{name}"
        fresh = cli_seconds(["extract", str(root), "-o", str(out), "--no-cache"], cache_root)
        warm = cli_seconds(["extract", str(root), "-o", str(out), "--no-cache"], cache_root)
        exact = cli_seconds(["extract", str(root), "-o", str(out), "--no-cache", "--exact-decode"],
                            Path(tempfile.mkdtemp(dir=work)))
        d_exact, d_draft = decode_rates(root)
        rows.append(f"| {name} | {n} | {mb:.1f} MB | {plain:.1f} | {n / fresh:.1f} ({n / fresh / plain:.1f}x) | "
                    f"{n / warm:.1f} ({n / warm / plain:.1f}x) | {n / exact:.1f} ({n / exact / plain:.1f}x) | "
                    f"{d_exact:.1f} | {d_draft:.1f} |")
        print(rows[-1], flush=True)
    cosines = fidelity(sets["4032x3024"])
    print("\n".join(cosines), flush=True)
    draft_acc, exact_acc = probe_accuracies(work, args.per_class)
    print(f"probe draft {draft_acc:.4f} exact {exact_acc:.4f}", flush=True)
    body = "\n".join([
        "## Real photos: decoding at the size needed (bench/photo_speed.py)",
        "",
        *machine_lines(),
        "",
        "Images per second, whole process (`transferkit -q extract DIR -o OUT --no-cache`, a fresh process: start-up,"
        " model build, any engine export or quantization, decoding and writing), against the plain timm loop on"
        " the same files in the same run. Fresh: empty cache root (no engine files). Warm: engine files built."
        " Decode-only: load + eval transform, one thread, exact vs at the size needed.",
        "",
        "| photos | n | mean file | plain timm loop | extract, fresh | extract, warm | extract --exact-decode, fresh "
        "| decode exact | decode at size |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Fidelity of draft decoding: cosine of its codes to exactly decoded codes, 60 of the 12 MP photos, fp32 torch:",
        "",
        "| codes | mean cosine | worst | worst image |",
        "|---|---|---|---|",
        *cosines,
        "",
        f"Linear probe on Fashion-MNIST items upscaled into 1600x1200 JPEGs ({10 * args.per_class:,} train, "
        f"{10 * args.per_class:,} test, pre-logits,"
        f" C by 3-fold CV): draft decoding **{100 * draft_acc:.2f}%**, exact decoding **{100 * exact_acc:.2f}%**"
        f" ({100 * (draft_acc - exact_acc):+.2f} points).",
    ])
    write_section(args.doc, "photo-speed", body)
    print(body)


if __name__ == "__main__":
    main()
