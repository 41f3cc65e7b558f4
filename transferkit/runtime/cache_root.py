"""Where transferkit keeps what it can rebuild (codes, engines, timings, model vocabularies): one root for all."""

from __future__ import annotations

import os
from pathlib import Path


def default_root() -> Path:
    """``$TRANSFERKIT_CACHE`` if set, else ``$XDG_CACHE_HOME/transferkit`` (``~/.cache/transferkit``)."""
    if os.environ.get("TRANSFERKIT_CACHE"):
        return Path(os.environ["TRANSFERKIT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "transferkit"
