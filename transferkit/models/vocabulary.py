"""The `layer` and `freeze_until` values a model accepts, per model and timm version, so the CLI refuses a bad
`--layer` or `--freeze-until` in a fraction of a second, before torch and timm load (~5 s on 2 cores). The tables
of the models whose weights transferkit installs ship in `vocabularies/`; others are remembered under the cache
root by `models.layers.remember_vocabulary` (with the network at hand: after a refused value, and by
`transferkit layers`). This module reads them and is light: no torch."""

from __future__ import annotations

import contextlib
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from transferkit.errors import ModelError, ParameterError
from transferkit.runtime.atomic import write_json_atomic
from transferkit.runtime.cache_root import default_root

SPEC = "{spec}"  # where a message names the refused value
KEYWORDS = {"layer": ("all", "auto", "pre_logits", "pre-logits"), "freeze_until": ("none",)}


SHIPPED = Path(__file__).parent / "vocabularies"  # the tables of the models whose weights ship on PyPI


def vocabulary_file(model: str, root: Path | None = None) -> Path | None:
    """The table's file under `root` (default: the cache root's 'vocabulary' folder): names depend on the timm
    version, so each version has its own (None: no timm)."""
    try:
        timm_version = version("timm")
    except PackageNotFoundError:
        return None
    return (root or default_root() / "vocabulary") / f"{model.replace('/', '_')}.timm-{timm_version}.json"


def model_names_file(root: Path = SHIPPED) -> Path | None:
    """The file of the model names timm knows (timm.list_models()), one per line, per timm version."""
    try:
        return root / f"timm-{version('timm')}.models.txt"
    except PackageNotFoundError:
        return None


def unknown_model(name: str, known: list[str]) -> ModelError:
    """The error for a model name timm does not know, with the closest names it does."""
    import difflib

    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else " See `timm.list_models()`."
    return ModelError(f"unknown model '{name}'.{hint}")


def refuse_unknown_model(name: str) -> None:
    """Raise `unknown_model` if the names shipped for this timm version lack `name` (its architecture: a
    pretrained tag after '.' is timm's to check). Silent without the file, and for hub names ('hf-hub:...')."""
    file = model_names_file()
    if ":" in name or "/" in name or file is None:
        return
    try:
        known = file.read_text(encoding="utf-8").split()
    except OSError:
        return
    if known and name.split(".", 1)[0] not in known:
        raise unknown_model(name, known)


def write_vocabulary(table: dict, root: Path | None = None) -> None:
    """Remember what `table['model']` accepts, and the library's message (with SPEC) for anything else (the
    dict `models.layers.vocabulary` makes)."""
    file = vocabulary_file(table["model"], root)
    if file is None:
        return
    with contextlib.suppress(OSError):  # a cache that cannot be written only costs the early check
        file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(file, table)


def read_vocabulary(model: str) -> dict | None:
    """`model`'s table: the one remembered in the cache root, else the one shipped with transferkit for this timm
    version; None if neither is there or readable (then nothing is refused early)."""
    for root in (None, SHIPPED):
        file = vocabulary_file(model, root)
        try:
            table = json.loads(file.read_text(encoding="utf-8")) if file is not None else None
        except (OSError, ValueError):
            continue
        if _well_formed(table, model):
            return table
    return None


def _well_formed(table: object, model: str) -> bool:
    """Whether `table` is `model`'s, with a list of accepted values and a message (with SPEC) per parameter."""
    try:
        return table["model"] == model and all(
            isinstance(table["accepted"][p], list) and SPEC in table["messages"][p] for p in KEYWORDS)
    except (KeyError, TypeError):
        return False


def refuse_early(model: str, param: str, spec: object) -> None:
    """Raise the library's own ParameterError if `model`'s remembered table has no `spec` (for `layer`, any part
    of a comma list). Silent when nothing is known or the file is damaged: the library checks later anyway."""
    table = read_vocabulary(model)
    if table is None:
        return
    accepted, message = set(table["accepted"][param]), table["messages"][param]
    parts = [p.strip() for p in str(spec).split(",")] if param == "layer" else [str(spec).strip()]
    bad = next((p for p in parts if p not in accepted and p not in KEYWORDS[param]), None)
    if bad is not None:
        raise ParameterError(message.replace(SPEC, bad if param == "layer" else str(spec)), param=param)
