"""The audit of all of Fashion-MNIST (60,000 train + 10,000 test images) as a user runs it, twice in a row: the
first run encodes (or finds its codes in the code cache), the second audits from cached codes. Whole-process wall
time and peak memory (ru_maxrss of the child), the audit's own time per step (summary.json), and what it found.
Also draws what it found in the official train vs test (docs/images/audit-fmnist-*.png): the most similar
train/test pairs, the most likely label errors (given -> suggested) and the strongest outliers.
Usage: python bench/audit_scale.py [--image-size 64] [--work DIR] [--no-doc]."""

from __future__ import annotations

import argparse
import csv
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_lines, write_section  # noqa: E402

FMNIST = Path("/usr/share/datasets/fashion-mnist")
DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
IMAGES = DOC.parent / "images"
SHOWN = 12  # findings drawn per figure


def pixels_by_source() -> dict[str, object]:
    """Each Fashion-MNIST image's 28x28 pixels by its source string (what the audit's CSVs name)."""
    from transferkit.recipes.demo import fashion_mnist

    out = {}
    for split in ("train", "t10k"):
        data = fashion_mnist(split)
        out.update(zip(data.sources, data._pixels))
    return out


def figure(panels: list[list[tuple[object, str]]], title: str, path: Path) -> None:
    """A grid of captioned images: one column per finding, one row per image of it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = max(len(p) for p in panels), len(panels)
    fig, axes = plt.subplots(rows, cols, figsize=(1.25 * cols, 1.45 * rows + 0.4), squeeze=False)
    for c, panel in enumerate(panels):
        for r in range(rows):
            ax = axes[r][c]
            ax.axis("off")
            if r < len(panel):
                img, caption = panel[r]
                ax.imshow(img, cmap="gray", vmin=0, vmax=255)
                ax.set_title(caption, fontsize=6.5)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_findings(out: Path) -> list[str]:
    """Figures of the audit's top findings in `out`'s CSVs; markdown lines that show them."""
    px = pixels_by_source()
    short = {"train": "train", "t10k": "test"}

    def name(source: str) -> str:
        file, row = source.rsplit("#", 1)
        return f"{short[Path(file).name.split('-')[0]]} #{row}"

    def read(file: str) -> list[dict]:
        with open(out / file, newline="") as f:
            return list(csv.DictReader(f))

    IMAGES.mkdir(parents=True, exist_ok=True)
    leaks = [d for d in read("duplicates.csv") if d["scope"] == "leakage"][:SHOWN]
    figure([[(px[d["source_a"]], name(d["source_a"])), (px[d["source_b"]], f"{name(d['source_b'])}\n"
             f"{float(d['similarity']):.3f}")] for d in leaks],
           "Most similar train (top) / test (bottom) pairs: copy score", IMAGES / "audit-fmnist-leakage.png")
    issues = read("label_issues.csv")[:SHOWN]
    figure([[(px[d["source"]], f"{name(d['source'])}\n{d['given_label']}\n-> {d['suggested_label']}")]
            for d in issues], "Most likely label errors in train: given -> suggested",
           IMAGES / "audit-fmnist-labels.png")
    outliers = sorted(read("outliers.csv"), key=lambda d: -float(d["score"]))[:SHOWN]
    figure([[(px[d["source"]], f"{name(d['source'])}\n{d['label']}")] for d in outliers],
           "Strongest outliers in train (far from every image of their class)", IMAGES / "audit-fmnist-outliers.png")
    return ["What it found, the top of each list (the report.html shows the same with every row):", "",
            "![train/test pairs](images/audit-fmnist-leakage.png)", "",
            "![label errors](images/audit-fmnist-labels.png)", "",
            "![outliers](images/audit-fmnist-outliers.png)"]


def run(args: list[str]) -> tuple[float, float]:
    """Wall seconds and the child's peak resident memory in GB of one `transferkit` process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "transferkit", *args], check=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child so far, in KB
    return wall, max(peak, before) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--work", type=Path, default=Path("/tmp/transferkit-audit-scale"))
    parser.add_argument("--no-doc", action="store_true")
    opts = parser.parse_args()
    opts.work.mkdir(parents=True, exist_ok=True)
    out = opts.work / "audit"
    args = ["-q", "audit", str(FMNIST / "train"), "--test", str(FMNIST / "t10k"), "-o", str(out),
            "--image-size", str(opts.image_size)]
    rows = []
    for name in ("first run (encodes, or reuses the code cache)", "again, from cached codes"):
        wall, peak = run(args)
        summary = json.loads((out / "summary.json").read_text())
        rows.append((name, wall, peak, summary))
        print(f"{name}: {wall:.1f} s wall, peak {peak:.2f} GB; steps {summary['seconds_per_step']}", flush=True)
    s = rows[-1][3]
    d = s["duplicates"]
    lines = [
        "## Audit of 70,000 images (Fashion-MNIST train + test)", "",
        *machine_lines(),
        f"- codes: {s['codes']['key']} at {s['codes']['image_size']} px; `transferkit {' '.join(args)}`", "",
        "| run | wall s (whole process) | peak memory GB | codes s | duplicates s | label issues s | outliers s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, wall, peak, summ in rows:
        t = summ["seconds_per_step"]
        lines.append(f"| {name} | {wall:.1f} | {peak:.2f} | {t['codes']:.1f} | {t['duplicates']:.1f} | "
                     f"{t['label_issues']:.1f} | {t['outliers']:.1f} |")
    lines += ["", f"Found: {d['leakage']} train/test pair(s) ({d['exact_leakage']} exact, {d['near_leakage']} near), "
              f"{d['within']} pair(s) within a set ({d['exact_within']} exact), "
              f"{s['label_issues']['flagged']} likely label error(s) (estimated noise "
              f"{100 * s['label_issues']['noise'].get('estimated_noise_rate', float('nan')):.1f}%), "
              f"{s['outliers']['flagged']} outlier(s)."]
    if not opts.no_doc:
        lines += ["", *draw_findings(out)]
    print("\n".join(lines))
    if not opts.no_doc:
        write_section(DOC, "audit-scale", "\n".join(lines))
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
