"""The audit of all of Fashion-MNIST (60,000 train + 10,000 test images) as a user runs it, twice in a row: the
first run encodes (or finds its codes in the code cache), the second audits from cached codes. Whole-process wall
time and peak memory (ru_maxrss of the child), the audit's own time per step (summary.json), and what it found.
Usage: python bench/audit_scale.py [--image-size 64] [--work DIR] [--no-doc]."""

from __future__ import annotations

import argparse
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
    print("\n".join(lines))
    if not opts.no_doc:
        write_section(DOC, "audit-scale", "\n".join(lines))
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
