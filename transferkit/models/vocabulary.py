"""The `layer` and `freeze_until` values a model accepts, remembered per model and timm version under the cache
root, so the CLI refuses a bad `--layer` or `--freeze-until` in a fraction of a second, before torch and timm load
(~5 s on 2 cores). `models.layers.remember_vocabulary` writes a model's table (with the network at hand: after a
refused value, and by `transferkit layers`); this module reads it and is light: no torch."""

from __future__ import annotations

import contextlib
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from transferkit.errors import ParameterError
from transferkit.runtime.atomic import write_json_atomic
from transferkit.runtime.cache_root import default_root

SPEC = "{spec}"  # where a message names the refused value
KEYWORDS = {"layer": ("all", "auto", "pre_logits", "pre-logits"), "freeze_until": ("none",)}


def vocabulary_file(model: str) -> Path | None:
    """The table's file: names depend on the timm version, so each version has its own (None: no timm)."""
    try:
        timm_version = version("timm")
    except PackageNotFoundError:
        return None
    return default_root() / "vocabulary" / f"{model.replace('/', '_')}.timm-{timm_version}.json"


def write_vocabulary(model: str, accepted: dict[str, list[str]], messages: dict[str, str]) -> None:
    """Remember what `model` accepts, and the library's message (with SPEC) for anything else."""
    file = vocabulary_file(model)
    if file is None:
        return
    with contextlib.suppress(OSError):  # a cache that cannot be written only costs the early check
        file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(file, {"model": model, "accepted": accepted, "messages": messages})


def refuse_early(model: str, param: str, spec: object) -> None:
    """Raise the library's own ParameterError if `model`'s remembered table has no `spec` (for `layer`, any part
    of a comma list). Silent when nothing is remembered or the file is damaged: the library checks later anyway."""
    file = vocabulary_file(model)
    try:
        table = json.loads(file.read_text(encoding="utf-8")) if file is not None else None
        accepted, message = set(table["accepted"][param]), table["messages"][param]
        valid = table["model"] == model and isinstance(message, str) and SPEC in message
    except (OSError, ValueError, KeyError, TypeError):
        return
    parts = [p.strip() for p in str(spec).split(",")] if param == "layer" else [str(spec).strip()]
    bad = next((p for p in parts if p not in accepted and p not in KEYWORDS[param]), None)
    if valid and bad is not None:
        raise ParameterError(message.replace(SPEC, bad if param == "layer" else str(spec)), param=param)
