"""What a benchmark ran on: printed next to every figure, because these machines are shared and differ."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

INTERESTING_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def cpu_description() -> str:
    """CPU model, the SIMD flags that matter to torch, and the core count."""
    model, flags = platform.processor() or "unknown CPU", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and model in ("unknown CPU", ""):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    have = [f for f in INTERESTING_FLAGS if f in flags] or ["none of " + "/".join(INTERESTING_FLAGS)]
    return f"{model}, {os.cpu_count()} cores, flags: {' '.join(have)}"


def machine_lines() -> list[str]:
    """Markdown bullet lines: command, machine, versions, date."""
    import timm
    import torch

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    return [
        f"- command: `{command}`",
        f"- machine: {cpu_description()}, torch threads {torch.get_num_threads()}",
        f"- versions: torch {torch.__version__}, timm {timm.__version__}, Python {platform.python_version()}",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
    ]


def write_section(doc: Path, name: str, body: str) -> None:
    """Replace (or append) the section between `<!-- name:start -->` and `<!-- name:end -->` in `doc`."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = doc.read_text() if doc.is_file() else "# Benchmarks\n\nWritten by the scripts in `bench/`.\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
