"""Fashion-MNIST: the probe refitted on shifted copies of each training image (`probe --augment N`) next to the
same probe without them, on the official 10,000 test images (issue 20: the probe bars at 10 and 100 per class).

Each row is one `train_probe` call, as `transferkit probe TRAIN -o OUT --test TEST [--head H] --flip [--augment
N]` runs it, on codes extracted as `transferkit extract .../train --per-class K --views V --image-size 64
--precision fp32` (and the test set `--like` them). Views: the small-different recipe's pick at that size
(greedy selection, docs/benchmarks.md 'multilayer'), and at 100 per class also `blocks.4|4x4,blocks.2|4x4,
blocks.3|4x4`. Each row's figures are kept as JSON in bench/results/probe-augment; delete one to measure it again.

    python bench/probe_augment.py            # ~1 h on 2 cores with a cold code cache
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import kept_lines, machine_lines, write_section  # noqa: E402

from transferkit.jobs import extract_features, train_probe  # noqa: E402
from transferkit.recipes.demo import fashion_mnist  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC, RESULTS = ROOT / "docs" / "benchmarks.md", ROOT / "bench" / "results" / "probe-augment"
PICKS = {10: "blocks.4|catavgmax,blocks.0|4x4,blocks.2|4x4", 100: "blocks.4|4x4,blocks.1|4x4",
         1000: "blocks.2|4x4,blocks.4|catavgmax,blocks.1|4x4"}
THREE = "blocks.4|4x4,blocks.2|4x4,blocks.3|4x4"
# (per class, views, head, copies); every row flip-averaged (probe --flip)
ROWS = [
    (10, PICKS[10], "svm", 0), (10, PICKS[10], "svm", 10), (10, PICKS[10], "logistic", 0),
    (10, PICKS[10], "logistic", 10),
    (100, PICKS[100], "svm", 0), (100, PICKS[100], "svm", 6), (100, PICKS[100], "svm", 10),
    (100, PICKS[100], "logistic", 0), (100, PICKS[100], "logistic", 10),
    (100, THREE, "svm", 0), (100, THREE, "svm", 6), (100, THREE, "svm", 10),
    (1000, PICKS[1000], "svm", 0), (1000, PICKS[1000], "svm", 2),
    (1000, PICKS[1000], "logistic", 0), (1000, PICKS[1000], "logistic", 2),
]


# what the rows decided, and what was measured beside them by hand (2026-11-27, same machine); rerunning the bench
# rewrites the table, not this
NOTES = """What this decided:

- Shifted copies help the linear SVM where data is scarce: +1.06 points at 10 per class, +0.71 at 100 (10
  copies), and nothing at 1,000 per class (2 copies, -0.02). Logistic regression gains less (+0.76 at 10 per
  class) or loses (-0.11 at 100): its C, chosen on the images alone, stops fitting once the rows multiply (by hand,
  at 100 per class on the pick with 10 copies: C=0.001 87.28%, 0.003 87.44%, 0.03 87.18%; the SVM at C=0.0003
  88.04%, below C=0.001's 88.11%).
- So `probe --augment N` is an option, not a default, and the small-different recipe keeps its logistic head
  without copies: with copies the best head differs by size (SVM at 10 and 100 per class, logistic at 1,000),
  which needs C and the head chosen by a CV that holds each held-out image's copies out of its training folds
  (not built).
- Issue 20's probe bar at 100 per class (88.5%) is reached only by `blocks.4|4x4,blocks.2|4x4,blocks.3|4x4`
  with the SVM and 10 copies (88.51%; 88.48% with 6), and that combination was found by exploring, not chosen
  by CV: greedy selection picks `blocks.4|4x4,blocks.1|4x4` (88.11%), and a 3-fold CV with copies in the
  training folds ranked `blocks.4|4x4,blocks.1|4x4,blocks.6|avg` first (CV 88.8%, test 87.98%) among seven
  combinations, within the CV's noise of the others. The bar is not counted as met.
- By hand, same session: copies drawn per image from integer shifts of up to 3 pixels (at 28 px) scored
  88.74-88.82% on the three views against 88.40% for 7 fixed shifts shared by all images (a random draw per
  image is what ShiftCopy does); rotations of up to 8 degrees and scaling by up to 10% added nothing; probes on
  lite0, lite1 and lite2 codes (each with copies) averaged reached 88.76% on `blocks.4|4x4,blocks.1|4x4`.
  Inputs of 96 or 128 px instead of 64 gave no gain without copies (blocks.4|4x4: 86.7-87.1%).
"""


def slug(per_class: int, views: str) -> str:
    return f"{per_class}-{views.replace('|', '-').replace(',', '+')}"


def codes(per_class: int, views: str, work: Path) -> tuple[Path, Path]:
    """The training and test codes of these views, extracted once into WORK (through the code cache)."""
    train, test = work / slug(per_class, views) / "train", work / slug(per_class, views) / "test"
    if not (train / "meta.json").is_file():
        extract_features(fashion_mnist("train", per_class=per_class), train, views=views, image_size=64,
                         precision="fp32", progress=False)
    if not (test / "meta.json").is_file():
        extract_features(fashion_mnist("t10k"), test, like=train, progress=False)
    return train, test


def measure(row: tuple, work: Path) -> dict:
    per_class, views, head, copies = row
    file = RESULTS / f"{slug(per_class, views)}-{head}-flip-augment{copies}.json"
    if file.is_file():
        return json.loads(file.read_text())
    train, test = codes(per_class, views, work)
    out = work / "probes" / file.stem
    start = time.perf_counter()
    report = train_probe(train, out, test=test, head=head, flip=True, augment=copies, progress=False)
    result = {"per_class": per_class, "views": views, "head": head, "augment": copies, "C": report.probe.best_C_,
              "cv": report.probe.cv_score_, "accuracy": report.evaluation.accuracy,
              "wall_s": time.perf_counter() - start, "machine": machine_lines()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(result, indent=1))
    print(result, flush=True)
    return result


def table(rows: list[dict]) -> str:
    lines = ["| train | views | head | copies | C | test acc (flip-averaged) | gain | probe wall s |",
             "|---|---|---|---:|---|---:|---:|---:|"]
    for r in rows:
        base = next(o for o in rows if (o["per_class"], o["views"], o["head"], o["augment"]) ==
                    (r["per_class"], r["views"], r["head"], 0))
        gain = f"{100 * (r['accuracy'] - base['accuracy']):+.2f}" if r["augment"] else "-"
        views = r["views"].replace("|", "\\|")
        lines.append(f"| {r['per_class']}/class | `{views}` | {r['head']} | {r['augment']} | {r['C']:g} | "
                     f"**{100 * r['accuracy']:.2f}%** | {gain} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/transferkit-bench/probe-augment"))
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    rows = [measure(row, args.work) for row in ROWS]
    body = "\n".join([
        "## Probe on shifted copies of the training images (bench/probe_augment.py)", "",
        "- command: `python bench/probe_augment.py` (each row's figures: bench/results/probe-augment)",
        *kept_lines(rows),
        "- setup: `tf_efficientnet_lite0`, packaged ImageNet weights, 64 px, fp32; training sets: the first N "
        "images per class; test: the official 10,000. Every row is `train_probe(..., flip=True, augment=copies)`: "
        "C by stratified CV on the training images' own codes, the head refitted at that C on them, their mirror "
        "images' codes and `copies` shifted copies of each (`probe --flip --augment N`); test scores averaged "
        "over each image and its mirror. The probe's wall time includes encoding the mirror images and copies "
        "that were not in the code cache yet (rough: other rows may have cached them).",
        "", table(rows), "", NOTES,
    ])
    print(body)
    if not args.no_doc:
        write_section(DOC, "probe-augment", body)


if __name__ == "__main__":
    main()
