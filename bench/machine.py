"""What a benchmark ran on: printed next to every figure, because these machines are shared and differ."""

from __future__ import annotations

import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

from transferkit.runtime.machine import describe_cpu


def machine_lines() -> list[str]:
    """Markdown bullet lines: command, machine, versions, date."""
    import timm
    import torch

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    return [
        f"- command: `{command}`",
        f"- machine: {describe_cpu()}, torch threads {torch.get_num_threads()}",
        f"- versions: torch {torch.__version__}, timm {timm.__version__}, Python {platform.python_version()}",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
    ]


def kept_lines(rows: list[dict]) -> list[str]:
    """Markdown bullet lines for rows measured at different times, each keeping its `machine_lines()` under
    'machine': every machine they ran on, the first row's versions, and the span of their dates."""
    machines = sorted({r["machine"][1] for r in rows})
    dates = sorted(r["machine"][3].removeprefix("- date: ") for r in rows)
    return [*machines, rows[0]["machine"][2], f"- dates: {dates[0]} to {dates[-1]}"]


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
