"""What a recipe file may say: the fields of each kind, their types and limits, and checking a file's values.

A probe recipe's settings are ProbeSettings, a finetune recipe's a FinetuneConfig. Every error names the field,
what it must be and what was given. Knows nothing of Recipe objects or of running them (`recipe`).
"""

from __future__ import annotations

import builtins
import difflib
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from transferkit.codes.params import EXTRACTOR, parse_pools
from transferkit.errors import DataError, ModelError
from transferkit.finetune.config import FinetuneConfig
from transferkit.finetune.params import FINETUNE
from transferkit.models.params import DEFAULT_MODEL, PRE_LOGITS
from transferkit.probe.params import MULTILABEL_HEADS, PROBE, PROBE_JOB
from transferkit.runtime.params import validate

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

KINDS = ("probe", "finetune")
REQUIRED = ("name", "kind", "model")  # a file must name its backbone: no silent default


@dataclass(frozen=True)
class ProbeSettings:
    """What a probe recipe passes to extract_features and train_probe."""

    model: str = DEFAULT_MODEL
    weights: str = "auto"
    image_size: int | None = None  # None: the model's pretrained size
    batch_size: int = 64
    precision: str = "fp32"
    num_workers: int = 0
    layer: str | int = PRE_LOGITS  # a stage name or index, 'pre_logits', or 'auto' (the layer sweep picks)
    pool: str = "avg"  # one pooling; 'all' with layer 'auto' (the sweep tries every one)
    combine: bool = False  # layer 'auto' only: the sweep's best view may grow into a combination (greedy selection)
    head: str = "svm"  # 'svm', 'logistic', 'ncm' (nearest class mean) or 'auto' (CV chooses, as it chooses C)
    C: float | str = "auto"  # the head's C, or 'auto': cross-validated on the training set
    cv: int = 5  # folds for choosing C
    scaling: str = "standard"
    class_weight: str | None = None  # 'balanced': weight the SVM's errors by inverse class frequency
    metric: str = "auto"  # CV score that chooses C: 'auto' is balanced accuracy on imbalanced classes
    flip: bool = False  # refit on each image's codes and its mirror's, score both (single-label data only)
    augment: int = 0  # refit also on this many randomly shifted copies of each image (single-label data only)

    def for_labels(self, multilabel: bool) -> ProbeSettings:
        """The settings as they run on this kind of labels: a multi-label probe is one SVM per label, without
        mirrors or shifted copies (train_probe refuses them), so a recipe written for both kinds of data runs so
        there."""
        if not multilabel:
            return self
        return replace(self, head=self.head if self.head in MULTILABEL_HEADS else MULTILABEL_HEADS[0], flip=False,
                       augment=0)


SETTINGS: dict[str, type] = {"probe": ProbeSettings, "finetune": FinetuneConfig}


def parse_toml(text: str, where: str) -> dict[str, Any]:
    """A recipe file's text as a dict; invalid TOML is a DataError naming `where`."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise DataError(f"{where} is not valid TOML: {e}") from e


def parse_overrides(items: Sequence[str], *, option: str = "--set") -> dict[str, Any]:
    """`key=value` strings (as `--set` takes them) -> {key: value}; values are TOML scalars, else plain strings.

    So `epochs=5`, `lr=1e-3`, `augment=false`, `lr_range=[1e-4, 3e-3]`, and `freeze_until=blocks.5`
    (not valid TOML, hence the string 'blocks.5') all do what they look like.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise DataError(f"{option} takes KEY=VALUE, e.g. {option} name=value. Got {item!r} instead.")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        out[key.strip().replace("-", "_")] = value
    return out


# -- validation ---------------------------------------------------------------------------------------


def check_fields(data: Mapping[str, Any], where: str) -> tuple[str, str, str, ProbeSettings | FinetuneConfig]:
    """A recipe's name, kind, description and settings from its fields; an error names the field, the allowed
    values or type, and what was given."""
    for key in REQUIRED:
        if key not in data:
            raise DataError(f"{where} lacks the required field '{key}' (required: {', '.join(REQUIRED)})")
    kind = data["kind"]
    if kind not in KINDS:
        raise DataError(f"The 'kind' field of {where} must be one of 'probe', 'finetune'. Got {kind!r} instead.")
    cls = SETTINGS[kind]
    hints = typing.get_type_hints(cls)
    allowed = ["name", "kind", "description", *(f.name for f in fields(cls))]
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise DataError(f"unknown field '{key}' in {where}.{hint} Fields of a {kind} recipe: {', '.join(allowed)}")
        hint_type = str if key in ("name", "kind", "description") else hints[key]
        values[key] = _check_value(key, _coerce(key, value, hint_type, where), where, _LIMITS[kind])
    settings = cls(**{k: v for k, v in values.items() if k not in ("name", "kind", "description")})
    if kind == "probe":
        _check_probe(settings, where)
    return values["name"], kind, values.get("description", ""), settings


def _coerce(key: str, value: Any, hint: Any, where: str) -> Any:
    """`value` as type `hint` (TOML ints pass as floats, lists as tuples, 'none' as None), else a type error."""
    converted = _convert(value, hint)
    if converted is _BAD:
        raise DataError(f"The '{key}' field of {where} must be {_describe(hint)}. "
                        f"Got {_shown(value)} ({type(value).__name__}) instead.")
    return converted


_BAD = object()


def _shown(value: Any, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters: a 5,000-digit number must not flood a one-line error."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _convert(value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or value == "none"):
            return None
        for arg in (a for a in args if a is not type(None)):
            converted = _convert(value, arg)
            if converted is not _BAD:
                return converted
        return _BAD
    if origin is tuple:
        if not isinstance(value, (tuple, builtins.list)) or len(value) != len(args):
            return _BAD
        items = tuple(_convert(v, a) for v, a in zip(value, args))
        return _BAD if _BAD in items else items
    if hint is bool:
        return value if isinstance(value, bool) else _BAD
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _BAD
    if hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return _BAD
        try:
            return float(value)
        except OverflowError:  # an integer beyond a float's range (TOML integers are unbounded in tomllib)
            return _BAD
    if hint is str:
        return value if isinstance(value, str) else _BAD
    return _BAD


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("'none'" if a is type(None) else _describe(a) for a in args)
    if origin is tuple:
        return f"a list of {len(args)} {'numbers' if args[0] is float else 'values'}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


_LIMITS: dict[str, Mapping[str, Any]] = {  # the tables the library validates with: each limit written once
    "probe": {f.name: {**EXTRACTOR, **PROBE, **PROBE_JOB}[f.name] for f in fields(ProbeSettings)
              if f.name in {**EXTRACTOR, **PROBE, **PROBE_JOB}},
    "finetune": FINETUNE,
}


def _check_value(key: str, value: Any, where: str, limits: Mapping[str, Any]) -> Any:
    """Allowed values and ranges, from the library's own tables; None (an optional field left unset) always passes."""
    if value is None:
        return value
    if key == "name":
        _check_name(value, where)
    if key in limits:
        validate({key: limits[key]}, {key: value}, where, error=DataError, noun="field")
    return value


def _check_name(name: str, where: str) -> None:
    """A recipe's name is the default output directory of `transferkit run`: a plain name, never a path."""
    problems = (
        (not name.strip(), "it is empty"),
        (name in (".", ".."), "'.' and '..' are not names"),
        ("/" in name or "\\" in name, "it holds a path separator"),
        ("\0" in name, "it holds a NUL character"),
        (name.startswith("-"), "it starts with '-' (it would read as an option)"),
    )
    for bad, why in problems:
        if bad:
            raise DataError(f"The 'name' field of {where} must be a plain name (it names the output directory): "
                            f"{why}. Got {_shown(name)} instead.")


def _check_probe(s: ProbeSettings, where: str) -> None:
    """A probe fits one kind of codes: one layer and one pooling, or layer 'auto' over every pooling."""
    try:
        pools = parse_pools(s.pool)
    except ModelError as e:
        raise ModelError(f"{where}: {e}") from e
    if s.combine and s.layer != "auto":
        raise DataError(f"The 'combine' field of {where} needs layer 'auto' (a combination grows from the sweep's "
                        f"best view). Got layer {s.layer!r} instead.")
    if s.layer == "auto":
        if s.pool != "all":
            raise DataError(f"The 'pool' field of {where} must be 'all' with layer 'auto' (the sweep tries every "
                            f"pooling). Got {s.pool!r} instead.")
        return
    if len(pools) != 1:
        raise DataError(f"The 'pool' field of {where} must name one pooling ('avg', 'max', 'avgmax', 'catavgmax' or a "
                        f"grid like '2x2'), or set layer 'auto' to sweep them. Got {s.pool!r} instead.")
    if str(s.layer) == "all" or "," in str(s.layer):
        raise DataError(f"The 'layer' field of {where} must be one layer (a stage name or index, 'pre_logits') "
                        f"or 'auto' (the sweep picks one). Got {s.layer!r} instead.")
