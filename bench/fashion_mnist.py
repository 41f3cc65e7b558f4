"""Fashion-MNIST: linear SVM on raw pixels vs. probes on CNN codes, at 10/100/1,000 per class and full.

Every training subset is the first N images of each class in file order; every score is on the
official 10,000-image test set. C is always chosen by stratified CV on the training set only.
Writes its table into docs/benchmarks.md (section 'fashion-mnist').

    python bench/fashion_mnist.py                      # all sizes, ~1 h on 2 cores
    python bench/fashion_mnist.py --sizes 10,100       # quicker
    python bench/fashion_mnist.py --sizes full --steps best   # one step; figures cached per size and step
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_lines, write_section  # noqa: E402

from transferkit.jobs import extract_features, train_probe  # noqa: E402
from transferkit.probe.linear import LinearProbe  # noqa: E402
from transferkit.recipes.demo import fashion_mnist  # noqa: E402

BIG = 20_000  # above this many training images: 3-fold CV over a narrower C grid, to keep the run near 1 h
BIG_CS = (0.001, 0.01)


def pixels(dataset) -> np.ndarray:
    """(n, 784) raw pixels in [0, 1]."""
    return np.stack([np.asarray(dataset.image(i).convert("L"), np.float32).ravel() / 255 for i in range(len(dataset))])


def probe_args(n: int) -> dict:
    return {"cv": 3} if n > BIG else {"cv": 5}


STEPS = ("raw", "pre", "best")


def run_step(per_class: int | None, step: str, test, args, work: Path) -> dict:
    """One step for one training size; its figures are cached in WORK/SIZE/STEP.json."""
    name = "full" if per_class is None else str(per_class)
    train = fashion_mnist("train", per_class=per_class)
    row: dict = {"size": name, "n_train": len(train)}
    if step == "raw":
        t = time.perf_counter()
        Cs = {"Cs": BIG_CS} if len(train) > BIG else {}
        raw = LinearProbe(**probe_args(len(train)), **Cs).fit(pixels(train), train.targets)
        row["raw"] = raw.score(pixels(test), test.targets)
        row["raw_s"] = time.perf_counter() - t
    else:
        label, layer = step, {"pre": "pre_logits", "best": "auto"}[step]
        common = {"image_size": args.image_size, "batch_size": args.batch_size, "precision": args.precision,
                  "cache": False, "progress": not args.quiet}  # timed: every code computed, as recorded
        t = time.perf_counter()
        codes = extract_features(train, work / name / label, layer=layer, pool="avg", **common)
        row[f"{label}_extract_s"] = time.perf_counter() - t
        row[f"{label}_ips"] = codes.meta["images_per_second"]
        t = time.perf_counter()
        test_codes = extract_features(test, work / name / f"{label}-test", like=codes.path, **common)
        row[f"{label}_test_extract_s"] = time.perf_counter() - t
        row["test_ips"] = test_codes.meta["images_per_second"]
        t = time.perf_counter()
        report = _probe(codes, test_codes, work / name / f"{label}-probe", label, len(train))
        row[f"{label}_probe_s"] = time.perf_counter() - t
        row[label] = report.evaluation.accuracy
        row[f"{label}_key"], row[f"{label}_C"] = report.key, report.probe.best_C_
    (work / name).mkdir(parents=True, exist_ok=True)
    (work / name / f"{step}.json").write_text(json.dumps(row))
    print(row, flush=True)
    return row


def load_row(name: str, work: Path) -> dict | None:
    """Merge the cached steps of one size, or None if a step is missing."""
    row: dict = {}
    for step in STEPS:
        file = work / name / f"{step}.json"
        if not file.is_file():
            return None
        row.update(json.loads(file.read_text()))
    return row


def _probe(codes, test_codes, out: Path, label: str, n: int):
    Cs = {"Cs": BIG_CS} if n > BIG else {}
    return train_probe(codes, out, test=test_codes, layer="best" if label == "best" else None, **probe_args(n), **Cs)


def table(rows: list[dict], args) -> str:
    head = (
        "| train images | raw pixels | pre-logits codes | best swept codes | best codes (layer\\|pool, C) |\n"
        "|---:|---:|---:|---:|---|\n"
    )
    def size(r: dict) -> str:
        return "full" if r["size"] == "full" else f"{r['size']}/class"

    def key(r: dict) -> str:
        return r["best_key"].replace("|", "\\|")  # a bare | would split the markdown cell

    acc = head + "".join(
        f"| {r['n_train']:,} ({size(r)}) | {100 * r['raw']:.2f}% | {100 * r['pre']:.2f}% "
        f"| **{100 * r['best']:.2f}%** | `{key(r)}`, C={r['best_C']:g} |\n"
        for r in rows
    )
    speed = (
        "\n| train images | raw SVM s | extract pre-logits s (img/s) | extract+sweep s | test extract s (img/s) "
        "| probe fit+eval s (pre / best) |\n|---:|---:|---:|---:|---:|---:|\n"
    )
    speed += "".join(
        f"| {r['n_train']:,} | {r['raw_s']:.0f} | {r['pre_extract_s']:.0f} ({r['pre_ips']:.0f}) "
        f"| {r['best_extract_s']:.0f} | {r['best_test_extract_s']:.0f} ({r['test_ips']:.0f}) "
        f"| {r['pre_probe_s']:.0f} / {r['best_probe_s']:.0f} |\n"
        for r in rows
    )
    return (
        "## Fashion-MNIST: linear SVM on pixels vs. CNN codes (core issue)\n\n"
        + "\n".join(machine_lines())
        + f"\n- setup: `tf_efficientnet_lite0` with the packaged ImageNet weights, images resized to "
        f"{args.image_size}x{args.image_size}, batch {args.batch_size}, fp32, channels_last; test set: the official "
        "10,000 images. Training sets: the first N images of each class in file order.\n"
        "- probe: StandardScaler + LinearSVC, C by stratified CV on the training set only (5-fold over "
        f"1e-4..1, tried upwards, stopping once CV accuracy drops; above {BIG:,} images 3-fold over {BIG_CS}). "
        "'best swept codes': "
        "`extract --layer auto` (every stage x avg/max/catavgmax/2x2/4x4, ranked by 3-fold CV on at most 2,000 "
        "training images).\n\n" + acc + speed
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000,full")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--precision", default="fp32", help="the recorded figures are fp32 (extract: auto)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/transferkit-bench/fashion-mnist"))
    parser.add_argument("--doc", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md")
    parser.add_argument("--steps", default="raw,pre,best", help="which of raw,pre,best to (re)run; 'none': only write")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    test = fashion_mnist("t10k")
    sizes = args.sizes.split(",")
    for size in sizes:
        for step in [s for s in args.steps.split(",") if s in STEPS]:
            run_step(None if size == "full" else int(size), step, test, args, args.work)
    rows = [row for row in (load_row(size, args.work) for size in sizes) if row is not None]
    if not rows:
        return
    body = table(rows, args)
    print(body)
    write_section(args.doc, "fashion-mnist", body)


if __name__ == "__main__":
    main()
