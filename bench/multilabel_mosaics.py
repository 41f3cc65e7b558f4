"""Multi-label accuracy on real images: 2x2 mosaics of Fashion-MNIST items, labelled with the classes present.
Written to docs/benchmarks.md (section multilabel-mosaics).

Train 5,000 mosaics (from the official training items), test 2,000 (from the test items); every 10th mosaic is
blank (no label). Probe: MultiLabelProbe on the codes of each candidate layer/pooling, the one with the best
cross-validated mAP is reported (all rows are printed). Sanity floor: a single-label LinearProbe trained on the
first tile's class alone, its SVM scores used as multi-label scores. Probe codes at each of --probe-sizes (the
mosaic upscaled), layers blocks.4, blocks.6 and pre-logits, pooled 'avg' and 'catavgmax' (max pooling helps: an
item anywhere lights its features up); the choice is by CV mAP, never by the test set. Fine-tuning: the whole
network with a sigmoid head, light augmentation (flips; crops of at least 85% so no tile is cut away).

    python bench/multilabel_mosaics.py            # ~40 min on 2 cores
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_lines, write_section  # noqa: E402

from transferkit.recipes.demo import fashion_mnist  # noqa: E402


def write_mosaics(folder: Path, split: str, n: int, seed: int) -> Path:
    """`n` 56x56 mosaics of 4 random items of `split`, and labels.csv (path, labels; plus first: the first
    tile's class, for the single-label floor). Cached in `folder`."""
    manifest = folder / "labels.csv"
    if manifest.is_file():
        return manifest
    data = fashion_mnist(split)
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        canvas, labels, first = np.zeros((56, 56), np.uint8), set(), ""
        if i % 10:
            for k, t in enumerate(rng.choice(len(data), 4, replace=False)):
                canvas[28 * (k // 2):28 * (k // 2) + 28, 28 * (k % 2):28 * (k % 2) + 28] = data._pixels[t]
                labels.add(data.classes[data.targets[t]])
                first = first or data.classes[data.targets[t]]
        Image.fromarray(canvas).save(folder / f"m{i:05d}.png")
        rows.append((f"m{i:05d}.png", ";".join(sorted(labels)), first or "blank"))
    with manifest.open("w", newline="") as f:
        csv.writer(f).writerows([("path", "labels", "first"), *rows])
    return manifest


def main() -> None:
    from transferkit.codes.extractor import FeatureExtractor
    from transferkit.data.datasets import open_dataset
    from transferkit.finetune.config import FinetuneConfig
    from transferkit.finetune.loop import finetune
    from transferkit.jobs import evaluate_model
    from transferkit.probe.linear import LinearProbe
    from transferkit.probe.metrics import score_multilabel
    from transferkit.probe.multilabel import MultiLabelProbe, mean_average_precision

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "transferkit-mosaics")
    parser.add_argument("--train", type=int, default=5000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=112, help="fine-tuning")
    parser.add_argument("--probe-sizes", default="224,320,384")  # measured at 112 px too: best CV mAP 0.859
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--doc", type=Path, default=Path(__file__).resolve().parents[1] / "docs/benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    train_csv = write_mosaics(args.work / f"train-{args.train}", "train", args.train, 0)
    test_csv = write_mosaics(args.work / f"test-{args.test}", "t10k", args.test, 1)
    train, test = open_dataset(train_csv), open_dataset(test_csv)
    lines = []
    start = time.perf_counter()
    rows, best, codes = [], None, {}
    for size in [int(x) for x in args.probe_sizes.split(",")]:
        fe = FeatureExtractor(weights="package", image_size=size, layer="blocks.4,blocks.6,pre_logits",
                              pool="avg,catavgmax").fit()
        a, b = fe.transform(train), fe.transform(test)
        names = np.array([n.rsplit(":", 1)[0] for n in fe.get_feature_names_out()])
        print(f"codes at {size} px: {time.perf_counter() - start:.0f} s", flush=True)
        for key in fe.keys_:
            codes[size, key] = a[:, names == key], b[:, names == key]
            probe = MultiLabelProbe(cv=3).fit(codes[size, key][0], train.targets)
            ev = score_multilabel(test.targets, probe.decision_function(codes[size, key][1]), probe.thresholds_,
                                  train.classes)
            rows.append((f"{key} at {size} px", probe.best_C_, probe.cv_score_, ev))
            print(f"{rows[-1][0]}: C={probe.best_C_:g} CV mAP {probe.cv_score_:.4f} test mAP {ev.mAP:.4f}", flush=True)
            if best is None or probe.cv_score_ > best[2]:
                best, chosen = rows[-1], (size, key)
    key = best[0]
    first = np.array([r["first"] for r in csv.DictReader(train_csv.open())])
    floor = LinearProbe(cv=3).fit(codes[chosen][0], first)
    scores = floor.decision_function(codes[chosen][1])
    floor_scores = np.stack([scores[:, list(floor.classes_).index(c)] if c in floor.classes_ else
                             np.full(len(scores), -1e9) for c in train.classes], 1)
    floor_map = mean_average_precision(test.targets, floor_scores)
    print(f"single-label floor (first tile): test mAP {floor_map:.4f}", flush=True)
    run = args.work / f"run-{args.train}-{args.image_size}-{args.epochs}"
    config = FinetuneConfig(weights="package", image_size=args.image_size, epochs=args.epochs, lr=3e-3,
                            crop_scale=(0.85, 1.0), random_erasing=0.0, batch_size=64)
    start = time.perf_counter()
    result = finetune(train, run, config, progress=False)
    seconds = time.perf_counter() - start
    ft = evaluate_model(run, test, progress=False)
    print(f"fine-tuning: test mAP {ft.mAP:.4f} ({seconds:.0f} s)", flush=True)
    lines = [
        "## Multi-label: 2x2 Fashion-MNIST mosaics (bench/multilabel_mosaics.py)",
        "",
        *machine_lines(),
        "",
        f"{args.train:,} training and {args.test:,} test mosaics (56x56, 4 items each, every 10th blank), labels: the "
        f"classes present (mean {train.targets.sum(1).mean():.2f} per mosaic). lite0, packaged ImageNet weights, "
        "the mosaics upscaled to each size. Probe: one linear SVM per label, C by 3-fold CV mAP, thresholds out of "
        "fold; codes, pooling and size chosen by CV mAP.",
        "",
        "| codes | C | CV mAP | test mAP | micro-F1 | macro-F1 |",
        "|---|---|---|---|---|---|",
        *(f"| {k.replace('|', chr(92) + '|')}{' (chosen by CV)' if k == key else ''} | {C:g} | {cv:.4f} | "
          f"{ev.mAP:.4f} | {ev.micro_f1:.4f} | {ev.macro_f1:.4f} |" for k, C, cv, ev in rows),
        "",
        f"Sanity floor: a single-label probe on the same codes trained on the first tile's class only, its SVM "
        f"scores taken as multi-label scores: test mAP **{floor_map:.4f}**.",
        "",
        f"Fine-tuning the whole network at {args.image_size} px ({args.epochs} epochs, AdamW lr 3e-3 with layer "
        f"decay 0.9, label smoothing {config.label_smoothing:g}, crops >= 85%, "
        f"flips; thresholds on a 10% validation split): best epoch {result.best_epoch}, test mAP **{ft.mAP:.4f}**, "
        f"micro-F1 {ft.micro_f1:.4f}, macro-F1 {ft.macro_f1:.4f} ({seconds:.0f} s of training).",
        "",
        f"Bars (issue 17), on the held-out mosaics: probe mAP >= 0.90 **{'met' if best[3].mAP >= 0.9 else 'not met'}**"
        f" ({best[3].mAP:.4f}, {key}); fine-tuning mAP >= 0.95 **{'met' if ft.mAP >= 0.95 else 'not met'}** "
        f"({ft.mAP:.4f}).",
    ]
    body = "\n".join(lines)
    write_section(args.doc, "multilabel-mosaics", body)
    print(body)


if __name__ == "__main__":
    main()
