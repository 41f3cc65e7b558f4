"""Fashion-MNIST: the probe's heads (SVM, logistic regression, cosine nearest-class-mean), scalings and flip
augmentation, at 10/100/1,000 per class and full, on the official 10,000-image test set.

Codes: `tf_efficientnet_lite0` at 64 px, fp32, each size's best swept view of bench/fashion_mnist.py (or --view),
from the code cache (`extract_features`), and for the flip rows the codes of the mirror images (`mirror=True`).
Every head, scaling and C is chosen by stratified CV on the training set only. Flip rows ('+flip'): the head and C
chosen on the images' own codes, refitted on the codes of the images and of their mirror images, and scored on the
mean of the test image's and its mirror's scores (probe.heads.flip_average). Results are cached per size and row in
WORK/SIZE/ROW.json; writes docs/benchmarks.md section 'probe-heads'.

    python bench/probe_heads.py --sizes 10,100            # minutes
    python bench/probe_heads.py --sizes 1000,full --rows svm,best,best+flip
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

from transferkit.codes.store import FeatureStore  # noqa: E402
from transferkit.jobs import extract_features  # noqa: E402
from transferkit.probe.heads import flip_average  # noqa: E402
from transferkit.probe.linear import LinearProbe  # noqa: E402
from transferkit.recipes.demo import fashion_mnist  # noqa: E402

# bench/fashion_mnist.py's best swept codes per size (docs/benchmarks.md, 'Fashion-MNIST')
BEST_VIEW = {"10": "blocks.4|catavgmax", "100": "blocks.4|4x4", "1000": "blocks.2|4x4", "full": "blocks.4|4x4"}
ROWS = {  # name: LinearProbe parameters
    "svm": {"head": "svm", "scaling": "standard"},  # today's probe
    "svm-center_l2": {"head": "svm", "scaling": "center_l2"},
    "svm-standard_l2": {"head": "svm", "scaling": "standard_l2"},
    "logistic-standard": {"head": "logistic", "scaling": "standard"},
    "logistic-center_l2": {"head": "logistic", "scaling": "center_l2"},
    "logistic-standard_l2": {"head": "logistic", "scaling": "standard_l2"},
    "ncm-l2": {"head": "ncm", "scaling": "l2"},
    "ncm-center_l2": {"head": "ncm", "scaling": "center_l2"},
    "auto-standard": {"head": "auto", "scaling": "standard"},
    "auto-center_l2": {"head": "auto", "scaling": "center_l2"},
}
# what the measurements decided (2026-11-27); rerunning the bench rewrites the table above it, not this
VERDICT = (
    "What this decided: `LinearProbe`'s default head stays `svm`. Logistic regression beat it at 10/class (+0.95) "
    "and 100/class (+0.40) but not at 1,000/class (-0.06) or on all 60k (-0.12), so it is `head='logistic'`, "
    "and `head='auto'` lets CV choose (it chose logistic at every size where it was run). Flip augmentation "
    "(`extract --mirror`, `probe.heads.flip_average`) added +0.12 / +0.47 / +0.14 "
    "points to the SVM at 10 / 100 / 1,000 per class and +0.36 to logistic regression on all 60k, but cost "
    "logistic regression at 100 and 1,000/class: an option, not a default. The cosine nearest-class-mean head and "
    "the L2 scalings did not win anywhere. None of these reaches the issue's bars (80.0 / 88.5 / 93.5%) on one "
    "view: the heads move the probe by under a point. Not run: the SVM with flips on all 60k (rerun "
    "`--sizes full --rows svm+flip`), and the other '-' cells.\n"
)
BIG = 20_000  # above this many training images: 3-fold CV, as bench/fashion_mnist.py


def codes(dataset, name: str, view: str, mirror: bool, work: Path, args) -> np.ndarray:
    """(n, d) codes of `view` for `dataset` (of its mirror images with `mirror`), from WORK/codes or the cache."""
    layer, pool = view.split("|")
    out = work / "codes" / f"{name}-{layer}-{pool}{'-mirror' if mirror else ''}"
    store = FeatureStore(out) if (out / "meta.json").is_file() else extract_features(
        dataset, out, layer=layer, pool=pool, image_size=args.image_size, batch_size=args.batch_size,
        precision="fp32", mirror=mirror, progress=not args.quiet)
    return store.load(view)


def run_row(size: str, row: str, view: str, args) -> dict:
    """One row (a ROWS entry, optionally '+flip') at one size; cached in WORK/SIZE/VIEW/ROW.json."""
    file = args.work / size / view.replace("|", "-") / f"{row}.json"
    if file.is_file():
        return json.loads(file.read_text())
    per_class = None if size == "full" else int(size)
    train, test = fashion_mnist("train", per_class=per_class), fashion_mnist("t10k")
    X, Xt = codes(train, size, view, False, args.work, args), codes(test, "test", view, False, args.work, args)
    base, flip = row.removesuffix("+flip"), row.endswith("+flip")
    if flip:  # the head and C the base row chose by CV, refitted on the images and their mirror images
        chosen = run_row(size, base, view, args)
        Xm = codes(train, size, view, True, args.work, args)
        Xtm = codes(test, "test", view, True, args.work, args)
        t = time.perf_counter()
        params = {**ROWS[base], "head": chosen["head"], "C": chosen["C"] or 1.0, "calibrate": False}
        probe = LinearProbe(**params).fit(np.concatenate([X, Xm]), np.concatenate([train.targets] * 2))
        scores = flip_average(probe.decision_function(Xt), probe.decision_function(Xtm))
        result = {**chosen, "row": row, "accuracy_no_tta": float((probe.predict(Xt) == test.targets).mean())}
    else:
        t = time.perf_counter()
        probe = LinearProbe(**ROWS[base], **({"cv": 3} if len(train) > BIG else {})).fit(X, train.targets)
        result = {"size": size, "view": view, "row": row, "n_train": len(train), "head": probe.head_,
                  "C": probe.best_C_, "cv": probe.cv_score_}
        scores = probe.decision_function(Xt)
    result["accuracy"] = float((probe.classes_[scores.argmax(1)] == test.targets).mean())
    result["seconds"] = time.perf_counter() - t  # rough: shared cores
    result["command"] = "python bench/probe_heads.py " + " ".join(sys.argv[1:])
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(result))
    print(result, flush=True)
    return result


def table(results: list[dict], args) -> str:
    rows = list(dict.fromkeys(r["row"] for r in results))
    sizes = list(dict.fromkeys((r["size"], r["view"]) for r in results))
    by = {(r["size"], r["view"], r["row"]): r for r in results}
    head = "| head, scaling | " + " | ".join(f"{s if s == 'full' else s + '/class'} `{v.replace('|', chr(92) + '|')}`"
                                             for s, v in sizes) + " |\n"
    head += "|---|" + "---:|" * len(sizes) + "\n"

    def cell(key) -> str:
        r = by.get(key)
        if r is None:
            return "-"
        C = "" if r["C"] is None else f", C={r['C']:g}"
        chosen = f"({r['head']}{C})" if r["row"].startswith("auto") else C[2:]
        return f"{100 * r['accuracy']:.2f}% {chosen}".strip()

    rows.sort(key=lambda r: (list(ROWS).index(r.removesuffix("+flip")), r.endswith("+flip")))
    body = head + "".join(f"| {row} | " + " | ".join(cell((s, v, row)) for s, v in sizes) + " |\n" for row in rows)
    best = [max((r for r in results if (r["size"], r["view"]) == sv), key=lambda r: r["accuracy"]) for sv in sizes]
    body += "\n- best per size: " + "; ".join(
        f"{r['size'] if r['size'] == 'full' else r['size'] + '/class'}: {r['row']} {100 * r['accuracy']:.2f}%"
        for r in best) + "\n"
    commands = "".join(f"  - `{c}`\n" for c in dict.fromkeys(r["command"] for r in results))
    return (
        "## Probe heads on Fashion-MNIST: SVM, logistic regression, nearest class mean; L2 scaling; flips\n\n"
        + "\n".join(machine_lines())
        + "\n- the rows were computed (and cached in --work) by:\n" + commands
        + "- codes: `tf_efficientnet_lite0`, packaged ImageNet weights, 64x64, fp32, each size's best swept view of "
        "the 'Fashion-MNIST' section; training sets: the first N images of each class; test: the official 10,000.\n"
        "- every head's C (and with head 'auto' the head) by stratified 5-fold CV on the training set only (3-fold "
        f"above {BIG:,} images, on at most 10,000 rows), Cs 1e-4..1. Scalings: `standard` (StandardScaler), `l2` "
        "(unit rows), `center_l2` / `standard_l2` (centre / standardise, then rows of length sqrt(d)). "
        "'+flip': that head and C refitted on the codes of each image and of its mirror image, test scores "
        "averaged over the image and its mirror. Auto rows: CV's pick among svm, logistic and ncm (the CV rows are "
        "the single heads' own, so an auto row equals the row of the head it picked).\n\n" + body + "\n" + VERDICT
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000,full")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"of {', '.join(ROWS)}; each may end in '+flip'")
    parser.add_argument("--view", default=None, help="layer|pool for every size (default: each size's best)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--work", type=Path, default=Path("/tmp/transferkit-bench/probe-heads"))
    parser.add_argument("--doc", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md")
    parser.add_argument("--write", action="store_true", help="write every cached row to the docs section")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    for size in args.sizes.split(","):
        for row in args.rows.split(","):
            run_row(size, row, args.view or BEST_VIEW[size], args)
    if args.write:
        results = [json.loads(f.read_text()) for size in BEST_VIEW for f in sorted((args.work / size).glob("*/*.json"))]
        order = {s: i for i, s in enumerate(BEST_VIEW)}
        results.sort(key=lambda r: (order[r["size"]], r["view"]))
        body = table(results, args)
        print(body)
        write_section(args.doc, "probe-heads", body)


if __name__ == "__main__":
    main()
