"""The engine extract chooses by timing (transferkit.codes.timing) against every forced choice, whole process,
side by side in one run, written to docs/benchmarks.md (section engine-choice).

For each image set: one untimed warm-up process; the plain timm loop's images/s (fp32, DataLoader batch 32,
in-process: start-up and model build not counted, its best case); then `transferkit -q extract DIR -o OUT
--no-cache` as a fresh process (wall time: start-up, model build, timing the candidates, engine export or
quantization, decoding, writing), each with an empty cache root (no engine files, no timings): `auto`, and forced
`--engine torch --precision fp32`, `--engine torch --precision bf16` (CPUs with native bf16), `--engine
onnxruntime --precision fp32`, `--precision int8`; and `auto` again in auto's cache root ("warm": engine files and
timings there).

Sets: Fashion-MNIST PNGs (28x28, encoded at 224 px) and phone JPEGs made from real photos (bench/photo_speed.py).

    python bench/engine_choice.py                    # ~20 min on 2 cores
    python bench/engine_choice.py --png 1000 10000 --photos12 240 --photos2 1000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from extract_speed import plain_timm_loop, write_pngs  # noqa: E402
from machine import machine_lines, write_section  # noqa: E402
from photo_speed import cli_seconds, make_photos  # noqa: E402

from transferkit.runtime.device import cpu_has_bf16  # noqa: E402

FORCED = {"torch fp32": ["--engine", "torch", "--precision", "fp32"],
          "torch bf16": ["--engine", "torch", "--precision", "bf16"],
          "onnxruntime fp32": ["--engine", "onnxruntime", "--precision", "fp32"],
          "onnxruntime int8": ["--precision", "int8"]}


def run_set(name: str, root: Path, work: Path, plain_root: Path) -> str:
    n = sum(1 for p in root.rglob("*") if p.suffix in (".png", ".jpg"))
    plain = plain_timm_loop(plain_root, None)
    out = work / f"out-{name}"
    seconds, chosen = {}, {}
    # untimed warm-up process: the first process after writing a set pays for cold files and imports (measured:
    # 25.3 s against 17.1 s for the same engine right after), which would land on whichever column runs first
    cli_seconds(["extract", str(plain_root), "-o", str(work / "warm-up"), "--no-cache"],
                Path(tempfile.mkdtemp(dir=work)))
    auto_root = Path(tempfile.mkdtemp(dir=work))
    seconds["auto"] = cli_seconds(["extract", str(root), "-o", str(out), "--no-cache"], auto_root)
    choice = json.loads((out / "meta.json").read_text())["engine_choice"]
    chosen["auto"] = choice["chosen"]
    seconds["auto, warm"] = cli_seconds(["extract", str(root), "-o", str(out), "--no-cache"], auto_root)
    chosen["auto, warm"] = json.loads((out / "meta.json").read_text())["engine_choice"]["chosen"]
    for forced, flags in FORCED.items():
        if forced == "torch bf16" and not cpu_has_bf16():
            continue
        seconds[forced] = cli_seconds(["extract", str(root), "-o", str(out), "--no-cache", *flags],
                                      Path(tempfile.mkdtemp(dir=work)))
    fastest = min((k for k in seconds if k in FORCED), key=seconds.get)
    cells = " | ".join(f"{seconds[k]:.1f} s ({n / seconds[k] / plain:.1f}x)" for k in seconds)
    print(f"{name}: auto chose {chosen['auto']} ({choice['why']})", flush=True)
    return (f"| {name} | {n:,} | {plain:.1f} | {chosen['auto']} | {cells} | {fastest}: auto "
            f"{100 * (seconds['auto'] / seconds[fastest] - 1):+.0f}% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "transferkit-photo-bench")
    parser.add_argument("--png", type=int, nargs="*", default=[1000, 10000])
    parser.add_argument("--photos12", type=int, default=240, help="4032x3024 photos (0: none)")
    parser.add_argument("--photos2", type=int, default=1000, help="1600x1200 photos (0: none)")
    parser.add_argument("--plain-max", type=int, default=2000, help="the plain loop's rate is taken on at most this "
                        "many images of a set (it has no one-time cost, so its rate does not depend on the run)")
    parser.add_argument("--doc", type=Path, default=Path(__file__).resolve().parents[1] / "docs/benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    sets = {}
    for n in args.png:
        sets[f"PNG 28x28 at 224 px, {n:,}"] = (write_pngs(work / f"png-{n}", n // 10),
                                               write_pngs(work / f"png-{min(n, args.plain_max)}",
                                                          min(n, args.plain_max) // 10))
    if args.photos2:
        root = make_photos(work / f"p2-{args.photos2}", args.photos2, (1600, 1200))
        sets[f"JPEG 1600x1200, {args.photos2:,}"] = (root, root)
    if args.photos12:
        root = make_photos(work / f"p12-{args.photos12}", args.photos12, (4032, 3024))
        sets[f"JPEG 4032x3024, {args.photos12:,}"] = (root, root)
    rows = [run_set(name, root, work, plain_root) for name, (root, plain_root) in sets.items()]
    columns = ["auto", "auto, warm", *(k for k in FORCED if k != "torch bf16" or cpu_has_bf16())]
    body = "\n".join([
        "## Choosing the engine by timing: auto against every forced choice (bench/engine_choice.py)",
        "",
        *machine_lines(),
        "",
        "Whole process, `transferkit -q extract DIR -o OUT --no-cache` with an empty cache root (no engine files,"
        " no timings; warm: auto's root again), wall seconds and in brackets images/s as a multiple of the plain"
        f" timm loop's in-process rate (taken on up to {args.plain_max:,} images of the set).",
        "",
        f"| images | n | plain loop img/s | auto chose | {' | '.join(columns)} | fastest forced, auto against it |",
        "|---|---|---|---|" + "---|" * len(columns) + "---|",
        *rows,
    ])
    write_section(args.doc, "engine-choice", body)
    print(body)


if __name__ == "__main__":
    main()
