"""Calibration of probe probabilities on Fashion-MNIST: expected calibration error (ECE, 15 equal-width bins of
top-class probability: transferkit.probe.metrics.expected_calibration_error) and accuracy on the official 10,000
test images, for a probe trained on the first N images of each class.

Compares the probe's own calibration (one temperature fitted on the out-of-fold scores of the folds that chose C)
with no calibration (softmax of the SVM scores) and scikit-learn's CalibratedClassifierCV (sigmoid, isotonic,
temperature; ensemble=False, on the same folds), which refit the SVM `cv` more times. Writes the section
'calibration' of docs/benchmarks.md.

    python bench/calibration.py                        # 1,000 per class, 64 px, --layer auto as the demo
    python bench/calibration.py --layer blocks.2 --pool 4x4   # skip the sweep: its winner at 1,000 per class
    python bench/calibration.py --per-class 100 --no-compare   # quicker
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_lines, write_section  # noqa: E402

from transferkit.jobs import extract_features, train_probe  # noqa: E402
from transferkit.probe.calibration import temperature_proba  # noqa: E402
from transferkit.probe.metrics import ECE_BINS, expected_calibration_error  # noqa: E402
from transferkit.recipes.demo import DEMO_IMAGE_SIZE, fashion_mnist  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def scores(y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> dict:
    """Accuracy, ECE and mean log loss of probabilities `proba` (columns in `classes` order) for labels `y`."""
    picked = proba[np.arange(len(y)), np.searchsorted(classes, y)]
    return {"accuracy": float(np.mean(classes[proba.argmax(1)] == y)),
            "ece": expected_calibration_error(y, proba, classes),
            "nll": float(-np.mean(np.log(np.clip(picked, 1e-12, 1))))}


def compare_sklearn(probe, X: np.ndarray, y: np.ndarray, Xt: np.ndarray, yt: np.ndarray) -> list[tuple]:
    """scikit-learn's CalibratedClassifierCV around the probe's SVM at its chosen C, on the probe's folds."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import StratifiedKFold

    folds = StratifiedKFold(n_splits=probe.cv, shuffle=True, random_state=probe.random_state)
    rows = []
    for method in ("sigmoid", "isotonic", "temperature"):
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = CalibratedClassifierCV(probe._make_pipeline(probe.best_C_, X.shape), method=method, cv=folds,
                                         ensemble=False).fit(X, y)
        rows.append((f"scikit-learn CalibratedClassifierCV, {method}", scores(yt, clf.predict_proba(Xt),
                     clf.classes_), f"{probe.cv} + final ({time.perf_counter() - start:.0f} s)"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=1000)
    parser.add_argument("--test-per-class", type=int, default=None, help="Default: all 10,000 test images.")
    parser.add_argument("--image-size", type=int, default=DEMO_IMAGE_SIZE)
    parser.add_argument("--layer", default="auto", help="'auto': sweep every stage x pooling, as the demo")
    parser.add_argument("--pool", default="avg", help="With a named --layer (blocks.2 and 4x4: the sweep's best "
                        "codes at 1,000 per class in the Fashion-MNIST table)")
    parser.add_argument("--no-compare", action="store_true", help="Skip scikit-learn's CalibratedClassifierCV.")
    parser.add_argument("--work", type=Path, default=None, help="Folder for codes and the probe (default: temp).")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="calibration-"))
    train, test = fashion_mnist("train", per_class=args.per_class), fashion_mnist("t10k", per_class=args.test_per_class)
    codes = extract_features(train, work / "train", layer=args.layer, pool=args.pool, image_size=args.image_size,
                             progress=False)
    test_codes = extract_features(test, work / "test", like=codes.path, progress=False)
    start = time.perf_counter()
    report = train_probe(codes, work / "probe", test=test_codes, layer="best" if args.layer == "auto" else None)
    fit_seconds = time.perf_counter() - start
    probe, key = report.probe, report.key
    X, y, Xt, yt = codes.load(key), codes.labels, test_codes.load(key), test_codes.labels
    raw = probe.decision_function(Xt)
    rows = [("none: softmax of the SVM scores", scores(yt, temperature_proba(raw, 1.0), probe.classes_), "0"),
            (f"**transferkit: one temperature on the C search's out-of-fold scores** (T={probe.temperature_:.3g})",
             scores(yt, probe.predict_proba(Xt), probe.classes_), "0")]
    if not args.no_compare:
        rows += compare_sklearn(probe, X, y, Xt, yt)
    table = ["| calibration | test accuracy | ECE | log loss | SVM fits beyond the probe's |",
             "|---|---:|---:|---:|---:|"]
    table += [f"| {name} | {100 * s['accuracy']:.2f}% | {s['ece']:.4f} | {s['nll']:.4f} | {fits} |"
              for name, s, fits in rows]
    body = "\n".join([
        "## Calibrated probe probabilities on Fashion-MNIST", "", *machine_lines(),
        f"- setup: `tf_efficientnet_lite0` (packaged ImageNet weights), images resized to "
        f"{args.image_size}x{args.image_size}, codes `{key}` (`--layer {args.layer}`), first {args.per_class} "
        f"training images per class ({len(y)}), {len(yt)} images of the official test set. C={probe.best_C_:g} by "
        f"{probe.cv}-fold CV; `train_probe` (C search, final fit, temperature, test report) {fit_seconds:.0f} s.",
        f"- ECE: {ECE_BINS} equal-width bins of top-class probability (`probe.metrics.expected_calibration_error`). "
        "CalibratedClassifierCV (ensemble=False) wraps the probe's scaler + SVM at its C, on the same folds: it "
        "refits the SVM on each fold and on all rows; the probe reuses the fold models of its C search.",
        "", *table,
    ])
    print(body)
    write_section(DOC, "calibration", body)


if __name__ == "__main__":
    main()
