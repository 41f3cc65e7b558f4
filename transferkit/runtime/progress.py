"""Progress bars for long work: tqdm on stderr when stderr is a terminal, none when it is piped or logged to a
file, where carriage-return redraws leave blank remnants and every command already logs what it did."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any


def progress_bar(iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "it",
                 enabled: bool = True, leave: bool = True) -> Any:
    """A tqdm bar (or a disabled one that only iterates) over `iterable`, or to `update()` by hand."""
    from tqdm import tqdm

    shown = enabled and sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not shown, leave=leave, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5)
