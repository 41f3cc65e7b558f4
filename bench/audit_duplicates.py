"""Planted near-duplicates in Fashion-MNIST: does `transferkit audit` find copies of training images in the test set?

A seeded sample of training images (default 10,000) is DATA; the official test set (10,000) plus COPIES transformed
copies of DATA images is TEST. Each copy gets one transform, drawn at random (seeded, an equal number of each):
resized down to 60-90% and back up (bilinear), re-encoded as JPEG at quality 60-90, a 90% crop at a random
position resized back, or brightness x 0.85-0.95 or 1.05-1.15. The audit's duplicate step runs on the audit's
codes (tf_efficientnet_lite0 pre_logits avg at 64 px, from the code cache) twice: on the unplanted sets, then with
the copies. A reported pair is
- a hit: a copy with its original;
- native: a pair also reported on the unplanted sets (Fashion-MNIST's own duplicates and look-alikes);
- via a copy: a copy with an image its original forms a native pair with;
- false: anything else.
Recall is hits / COPIES; the false share is false / all reported pairs (native ones included, since the audit
reports them too). Writes docs/benchmarks.md (section 'audit-duplicates') and docs/images/audit-native-pairs.png.

    TRANSFERKIT_CACHE=/work/tkcache-fmnist python bench/audit_duplicates.py [--train 10000] [--copies 200]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_lines, write_section  # noqa: E402

from transferkit.auditing import duplicates as dup  # noqa: E402
from transferkit.auditing.params import NEAR_CANDIDATES, NEAR_THRESHOLD  # noqa: E402
from transferkit.auditing.run import _codes, find_duplicates  # noqa: E402
from transferkit.data.datasets import ImageDataset  # noqa: E402
from transferkit.jobs import read_sweep  # noqa: E402
from transferkit.recipes.demo import fashion_mnist  # noqa: E402

KINDS = ("resize", "jpeg", "crop", "brightness")
THRESHOLDS = (0.975, 0.98, 0.985, 0.99, 0.995)
ROOT = Path(__file__).resolve().parent.parent


def transformed(img: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """One near-duplicate of `img` (grayscale), made by `kind`."""
    w, h = img.size
    if kind == "resize":
        f = rng.uniform(0.6, 0.9)
        return img.resize((round(w * f), round(h * f)), Image.Resampling.BILINEAR).resize((w, h),
                                                                                          Image.Resampling.BILINEAR)
    if kind == "jpeg":
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(60, 91)))
        return Image.open(io.BytesIO(buf.getvalue())).convert(img.mode)
    if kind == "crop":
        cw, ch = 0.9 * w, 0.9 * h
        x, y = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
        return img.resize((w, h), Image.Resampling.BILINEAR, box=(x, y, x + cw, y + ch))
    return ImageEnhance.Brightness(img).enhance(1 + rng.choice([-1, 1]) * rng.uniform(0.05, 0.15))


def planted(train: ImageDataset, test: ImageDataset, n: int, seed: int) -> tuple[ImageDataset, np.ndarray, np.ndarray]:
    """TEST plus `n` transformed copies of DATA images at its end; the originals' indices and the transforms."""
    rng = np.random.default_rng(seed)
    originals = rng.choice(len(train), n, replace=False)
    kinds = rng.permutation(np.resize(np.arange(len(KINDS)), n))
    copies = np.stack([np.asarray(transformed(Image.fromarray(train._pixels[i]), KINDS[k], rng).convert("L"))
                       for i, k in zip(originals, kinds)])
    return (ImageDataset(test.sources + [f"planted#{j}" for j in range(n)],
                         np.concatenate([test.targets, train.targets[originals]]), test.classes,
                         root=f"{test.root}+planted", kind="idx", pixels=np.concatenate([test._pixels, copies])),
            originals, kinds)


def montage(pairs: list[tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    """Pairs side by side (a above b), 2x size, on grey."""
    canvas = Image.new("L", (len(pairs) * 64, 124), 128)
    for j, (a, b) in enumerate(pairs):
        canvas.paste(Image.fromarray(a).resize((56, 56)), (j * 64 + 4, 4))
        canvas.paste(Image.fromarray(b).resize((56, 56)), (j * 64 + 4, 64))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=10_000, help="DATA: this many training images (seeded)")
    ap.add_argument("--copies", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--layer", default="auto", help="the audit's codes (default: its default, the sweep's pick)")
    ap.add_argument("--pool", default="avg")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    train_all, test = fashion_mnist("train"), fashion_mnist("t10k")
    train = train_all.select(np.sort(rng.choice(len(train_all), min(args.train, len(train_all)), replace=False)))
    test_planted, originals, kinds = planted(train, test, args.copies, args.seed + 1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        store, test_store = _codes(train, test_planted, Path(tmp), layer=args.layer, pool=args.pool, cache=True,
                                   model="tf_efficientnet_lite0", weights="auto", image_size=args.image_size,
                                   batch_size=64, precision="auto", progress=False)
        key = read_sweep(store) or store.keys[0]
        codes, test_codes = store.load(key), test_store.load(key)
    encode = time.perf_counter() - start
    n, n_test = len(train), len(test)
    low = min(THRESHOLDS + (NEAR_THRESHOLD,))
    start = time.perf_counter()
    native = find_duplicates(train, test, codes, test_codes[:n_test], near_threshold=low)
    seconds_native = time.perf_counter() - start
    start = time.perf_counter()
    found = find_duplicates(train, test_planted, codes, test_codes, near_threshold=low)
    seconds = time.perf_counter() - start

    copy_of = {n + n_test + j: int(o) for j, o in enumerate(originals)}
    native_score = {(p["a"], p["b"]): p["similarity"] for p in native}
    rows = []
    for t in sorted(set(THRESHOLDS + (NEAR_THRESHOLD,))):
        reported = [p for p in found if p["kind"] == dup.EXACT or p["similarity"] >= t]
        hits = {p["b"] for p in reported if copy_of.get(p["b"]) == p["a"]}
        nat = [p for p in reported if native_score.get((p["a"], p["b"]), -1) >= (1 if p["kind"] == dup.EXACT else t)]
        via = [p for p in reported if p["b"] in copy_of and copy_of[p["b"]] != p["a"]
               and native_score.get(tuple(sorted((copy_of[p["b"]], p["a"]))), -1) >= t]  # copy of a native pair
        false = len(reported) - len(hits) - len(nat) - len(via)
        per_kind = ", ".join(f"{k} {sum(kinds[b - n - n_test] == i for b in hits)}"
                             for i, k in enumerate(KINDS))
        rows.append(f"| {t}{' (default)' if t == NEAR_THRESHOLD else ''} | {len(hits) / len(originals):.3f} "
                    f"({per_kind}) | {len(reported)} | {len(nat)} + {len(via)} | {false} "
                    f"| {false / max(len(reported), 1):.2%} |")
    exact = [p for p in native if p["kind"] == dup.EXACT]
    near_native = sorted((p for p in native if p["kind"] == dup.NEAR and p["similarity"] >= NEAR_THRESHOLD),
                         key=lambda p: -p["similarity"])
    pixels = np.concatenate([train._pixels, test_planted._pixels])
    montage([(pixels[p["a"]], pixels[p["b"]]) for p in near_native[:12]],
            ROOT / "docs" / "images" / "audit-native-pairs.png")
    body = "\n".join([
        "## Audit: planted near-duplicates",
        "",
        f"DATA: {n:,} Fashion-MNIST training images (seeded sample); TEST: the official {n_test:,} test images plus "
        f"{len(originals)} transformed copies of DATA images, one transform each ({len(originals) // len(KINDS)} "
        "each: resize down to 60-90% and up, JPEG quality 60-90, 90% crop anywhere, brightness +-5-15%). The "
        f"audit's duplicate step (codes: {key} at {args.image_size} px; {NEAR_CANDIDATES} candidates per image by "
        "codes and by 8 px thumbnails, verified by `auditing.copies`). **native**: reported on the unplanted "
        "sets too; **via a copy**: a copy with a native partner of its original; **false**: none of these (a copy with "
        "a look-alike of its original, a new pair among originals); false share = false / reported.",
        "",
        "| copy score >= | recall (hits per transform) | reported pairs | native + via a copy | false | false share |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"- Native pairs at the default: {len(exact)} exact (pixel-identical, same content hash) and "
        f"{len(near_native)} near; the 12 highest near pairs (DATA above, TEST or DATA below): "
        "![native pairs](images/audit-native-pairs.png)",
        f"- Time of the duplicate step (thumbnails, nearest neighbours, verification; codes cached): "
        f"{seconds:.0f} s for {n + len(test_planted):,} images, {seconds_native:.0f} s unplanted (rough: machine "
        f"shared); encoding or loading the codes: {encode:.0f} s",
        *machine_lines(),
    ])
    print(body)
    write_section(args.doc, "audit-duplicates", body)


if __name__ == "__main__":
    main()
