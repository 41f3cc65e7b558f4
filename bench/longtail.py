"""Long-tailed Fashion-MNIST: does class weighting help the linear probe on the rare classes?

Class c keeps the first n_max * (1/ratio)^(c/9) of its training images (file order), so class 0 keeps n_max and
class 9 n_max / ratio. Codes are extracted once (the demo's backbone, layer and image size: packaged
`tf_efficientnet_lite0`, blocks.4|4x4 at 64x64, the layer the demo's sweep picks at 100 per class), and every probe
of one ratio is fitted on the same codes, with and without class_weight='balanced'. Scores are on the official
10,000-image (balanced) test set. Each row is cached in --work/rows.json, and the section 'longtail' of
docs/benchmarks.md is rewritten from every cached row.

    python bench/longtail.py                        # ratios 10 and 100 at n_max 1,000, ~10 min on 2 cores
    python bench/longtail.py --ratios 3             # another ratio, added to the table
    python bench/longtail.py --n-max 6000           # the full training set's n_max
    python bench/longtail.py --finetune --ratios 100   # small fine-tuning runs: plain, weighted loss, sampler
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_lines, write_section  # noqa: E402

from transferkit.jobs import extract_features  # noqa: E402
from transferkit.probe.linear import LinearProbe  # noqa: E402
from transferkit.probe.metrics import score_predictions  # noqa: E402
from transferkit.recipes.demo import DEMO_IMAGE_SIZE, fashion_mnist  # noqa: E402

LAYER, POOL = "blocks.4", "4x4"  # what the demo's sweep picks on Fashion-MNIST at 64 px (docs/benchmarks.md)
# small on purpose (2 shared cores): bench/finetune_fmnist.py's '100-partial' setup, 5 epochs instead of 30
FINETUNE = {"image_size": 64, "epochs": 5, "batch_size": 32, "weights": "package", "crop_scale": (0.6, 1.0),
            "val_fraction": 0.0, "freeze_until": "blocks.3"}
VARIANTS = {"plain": {}, "weighted loss": {"class_weight": "balanced"}, "balanced sampler": {"sampler": "balanced"}}


def long_tail(targets: np.ndarray, n_max: int, ratio: float) -> np.ndarray:
    """Row indices keeping the first round(n_max * ratio^(-c/9)) rows of class c (c = 0..9), in file order."""
    keep = []
    for c in range(10):
        rows = np.flatnonzero(targets == c)
        keep.append(rows[: max(1, round(n_max * ratio ** (-c / 9)))])
    return np.sort(np.concatenate(keep))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="10,100")
    parser.add_argument("--n-max", type=int, default=1000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/transferkit-bench/longtail"))
    parser.add_argument("--doc", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--finetune", action="store_true", help="fine-tune instead of probing (see FINETUNE)")
    args = parser.parse_args()
    if args.finetune:
        return finetune_rows(args)
    common = {"layer": LAYER, "pool": POOL, "image_size": DEMO_IMAGE_SIZE, "precision": "fp32",
              "progress": not args.quiet}
    train = fashion_mnist("train", per_class=args.n_max)
    test = fashion_mnist("t10k")
    t = time.perf_counter()
    train_codes = extract_features(train, args.work / f"train-{args.n_max}", **common)
    test_codes = extract_features(test, args.work / "test", **common)
    extract_s = time.perf_counter() - t
    key = train_codes.key(LAYER, POOL)
    X, y = train_codes.load(key), np.asarray(train_codes.labels)
    X_test, y_test = test_codes.load(key), np.asarray(test_codes.labels)
    cache = args.work / "rows.json"
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    for ratio in (float(r) for r in args.ratios.split(",")):
        idx = long_tail(y, args.n_max, ratio)
        counts = np.bincount(y[idx], minlength=10)
        for weight in (None, "balanced"):
            t = time.perf_counter()
            probe = LinearProbe(class_weight=weight).fit(X[idx], y[idx])
            ev = score_predictions(y_test, probe.predict(X_test), np.arange(10), test.classes)
            rare = np.mean([ev.per_class[name]["recall"] for name in test.classes[-3:]])
            row = {"n_max": args.n_max, "ratio": ratio, "n": len(idx), "counts": counts.tolist(), "weight": weight,
                   "C": probe.best_C_, "metric": probe.metric_, "accuracy": ev.accuracy,
                   "balanced_accuracy": ev.balanced_accuracy, "macro_f1": ev.macro_f1, "rare_recall": float(rare),
                   "seconds": time.perf_counter() - t, "extract_s": extract_s,
                   "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                   "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)}
            done[f"{args.n_max}/{ratio:g}/{weight}"] = row
            cache.write_text(json.dumps(done, indent=1))
            print(row, flush=True)
    rows = sorted(done.values(), key=lambda r: (r["n_max"], r["ratio"], r["weight"] or ""))
    body = table(rows, args, len(test))
    print(body)
    write_section(args.doc, "longtail", body)


def finetune_rows(args) -> None:
    """Fine-tune on each long tail with each of VARIANTS; the last epoch is scored on the test set."""
    from transferkit.finetune.config import FinetuneConfig
    from transferkit.finetune.loop import finetune
    from transferkit.jobs import evaluate_model

    train, test = fashion_mnist("train", per_class=args.n_max), fashion_mnist("t10k")
    cache = args.work / "finetune-rows.json"
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    for ratio in (float(r) for r in args.ratios.split(",")):
        subset = train.select(long_tail(train.targets, args.n_max, ratio))
        for name, extra in VARIANTS.items():
            out = args.work / f"ft-{args.n_max}-{ratio:g}-{name.replace(' ', '-')}"
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            finetune(subset, out / "run", FinetuneConfig(**FINETUNE, **extra), progress=not args.quiet)
            ev = evaluate_model(out / "run", test, progress=not args.quiet)
            done[f"{args.n_max}/{ratio:g}/{name}"] = {
                "n_max": args.n_max, "ratio": ratio, "n": len(subset), "variant": name, "accuracy": ev.accuracy,
                "balanced_accuracy": ev.balanced_accuracy, "macro_f1": ev.macro_f1,
                "seconds": time.perf_counter() - t, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)}
            cache.write_text(json.dumps(done, indent=1))
            print(done[f"{args.n_max}/{ratio:g}/{name}"], flush=True)
    rows = list(done.values())
    body = ("## Long-tailed Fashion-MNIST: fine-tuning, weighted loss vs. class-balanced sampler (issue 17)\n\n"
            + "\n".join(machine_lines()) + "\n"
            + "".join(f"- rows of `{c}`\n" for c in dict.fromkeys(r["command"] for r in rows))
            + f"- setup: {FINETUNE} (bench/finetune_fmnist.py's '100-partial', 5 epochs), the last epoch scored on "
            "the 10,000 official test images; one seed, so differences of a point or two are within noise.\n\n"
            "| n_max | ratio | train images | variant | accuracy | balanced accuracy | macro-F1 | wall s | date |\n"
            "|---:|---:|---:|---|---:|---:|---:|---:|---|\n"
            + "".join(f"| {r['n_max']:,} | {r['ratio']:g} | {r['n']:,} | {r['variant']} | {100 * r['accuracy']:.2f}% "
                      f"| **{100 * r['balanced_accuracy']:.2f}%** | {100 * r['macro_f1']:.2f}% | {r['seconds']:.0f} "
                      f"| {r['date']} |\n" for r in rows))
    print(body)
    write_section(args.doc, "longtail-finetune", body)


def table(rows: list[dict], args, n_test: int) -> str:
    head = ("| n_max | ratio | train images (class 0 .. 9) | class_weight | C (chosen by) | accuracy "
            "| balanced accuracy | macro-F1 | recall, 3 rarest classes | fit s | date |\n"
            "|---:|---:|---|---|---|---:|---:|---:|---:|---:|---|\n")
    body = "".join(
        f"| {r['n_max']:,} | {r['ratio']:g} | {r['n']:,} ({' '.join(map(str, r['counts']))}) "
        f"| {r['weight'] or 'none'} | {r['C']:g} ({r['metric']}) | {100 * r['accuracy']:.2f}% "
        f"| **{100 * r['balanced_accuracy']:.2f}%** | {100 * r['macro_f1']:.2f}% | {100 * r['rare_recall']:.2f}% "
        f"| {r['seconds']:.0f} | {r['date']} |\n"
        for r in rows
    )
    pairs = [(a, b) for a, b in zip(rows, rows[1:]) if a["weight"] is None and b["weight"] == "balanced"
             and (a["n_max"], a["ratio"]) == (b["n_max"], b["ratio"])]
    gains = "".join(
        f"- n_max {a['n_max']:,}, ratio {a['ratio']:g}: class_weight='balanced' changes balanced accuracy by "
        f"{100 * (b['balanced_accuracy'] - a['balanced_accuracy']):+.2f} points and macro-F1 by "
        f"{100 * (b['macro_f1'] - a['macro_f1']):+.2f}\n"
        for a, b in pairs
    )
    commands = "".join(f"- rows of {c}\n" for c in dict.fromkeys(
        f"`{r['command']}` (n_max {r['n_max']:,}, codes extracted in {r['extract_s']:.0f} s)" for r in rows))
    return (
        "## Long-tailed Fashion-MNIST: the probe with and without class weighting (issue 17)\n\n"
        + "\n".join(machine_lines())
        + "\n" + commands
        + f"- setup: `tf_efficientnet_lite0`, packaged ImageNet weights, codes `{LAYER}|{POOL}` at "
        f"{DEMO_IMAGE_SIZE}x{DEMO_IMAGE_SIZE}, fp32, extracted once for the first n_max training images of "
        f"each class and the {n_test:,} official test images (code cache on). Class c keeps its first "
        "round(n_max x ratio^(-c/9)) images. Probe: LinearProbe defaults (StandardScaler + LinearSVC, C by "
        "5-fold stratified CV, metric 'auto': balanced accuracy here).\n"
        "- the test set has 1,000 images of every class, so its accuracy equals its balanced accuracy; the rarest "
        "classes (7-9: Sneaker, Bag, Ankle boot) happen to be among the easiest.\n\n"
        + head + body + "\n" + gains
    )


if __name__ == "__main__":
    main()
