"""The four cs231n transfer-learning scenarios as recipes: load and validate recipe files, run them end to end.

A recipe is a TOML file (the packaged ones live in `recipes/` at the top of the repository and ship in
the wheel): `name`, `kind` ("probe" or "finetune"), a one-line `description`, and the settings of what
it composes. A probe recipe runs extract_features -> (layer sweep) -> train_probe; its settings are
ProbeSettings. A finetune recipe runs finetune -> evaluate_model; its settings are a FinetuneConfig.

    from transferkit import recipes
    recipe = recipes.get("small-different").replace(image_size=96)
    result = recipe.run("train/", "test/", "out/")
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import difflib
import importlib.resources
import sys
import time
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from transferkit.codes.params import EXTRACTOR
from transferkit.codes.pooling import parse_pools
from transferkit.data.datasets import ImageDataset
from transferkit.errors import DataError, ModelError
from transferkit.finetune.config import FinetuneConfig
from transferkit.finetune.loop import finetune
from transferkit.finetune.params import FINETUNE
from transferkit.jobs import evaluate_model, extract_features, load_data, train_probe
from transferkit.models.backbones import DEFAULT_MODEL, PRE_LOGITS
from transferkit.probe.metrics import Evaluation
from transferkit.probe.params import PROBE
from transferkit.runtime.atomic import write_json_atomic
from transferkit.runtime.outputs import claim
from transferkit.runtime.params import validate

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

KINDS = ("probe", "finetune")
REQUIRED = ("name", "kind", "model")  # a file must name its backbone: no silent default
RECIPE_FILE = "recipe.json"
RESULT_FILE = "result.json"
OUTPUT_KIND = "recipe run"  # the output kind in its marker (transferkit.runtime.outputs)


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
    C: float | str = "auto"  # SVM C, or 'auto': cross-validated on the training set
    cv: int = 5  # folds for choosing C
    scaling: str = "standard"


SETTINGS: dict[str, type] = {"probe": ProbeSettings, "finetune": FinetuneConfig}


@dataclass(frozen=True)
class Recipe:
    """A named, validated scenario: what to train on a dataset and how. Build with get(), load() or replace()."""

    name: str
    kind: str
    description: str
    settings: ProbeSettings | FinetuneConfig
    source: str = ""  # the file it came from

    @property
    def model(self) -> str:
        """The timm backbone the recipe uses."""
        return self.settings.model

    def to_dict(self) -> dict[str, Any]:
        """Every field, flat as in a recipe file, defaults filled in: what recipe.json records."""
        return {"name": self.name, "kind": self.kind, "description": self.description,
                **dataclasses.asdict(self.settings)}

    def replace(self, **overrides: Any) -> Recipe:
        """A copy with some fields changed, validated like a recipe file (unknown fields and bad values fail)."""
        return from_dict({**self.to_dict(), **overrides}, where=f"recipe '{self.name}'", source=self.source)

    def run(self, train: str | Path | ImageDataset, test: str | Path | ImageDataset | None, out: str | Path,
            *, progress: bool = True) -> RecipeResult:
        """Train on `train`, score on `test` (if given); write the composed commands' artifacts under `out`.

        `out` gets recipe.json (this recipe, resolved) and result.json, plus for a probe recipe
        train/ and test/ (feature directories) and probe/; for a finetune recipe run/ and test/.
        """
        out = Path(out)
        if self.kind == "finetune" and (out / "run" / "config.json").exists():  # before recipe.json is replaced
            raise DataError(f"'{out}' already holds a fine-tuning run (run/config.json); choose another out directory")
        train = train if isinstance(train, ImageDataset) else load_data(train)
        test = test if test is None or isinstance(test, ImageDataset) else load_data(test)
        claim(out, OUTPUT_KIND, inputs=[train.root, None if test is None else test.root])
        write_json_atomic(out / RECIPE_FILE, {"recipe": self.to_dict(), "source": self.source, "train": str(train.root),
                                              "test": None if test is None else str(test.root)})
        start = time.perf_counter()
        runner = _run_probe if self.kind == "probe" else _run_finetune
        result = runner(self.settings, train, test, out, progress)
        result = dataclasses.replace(result, recipe=self, seconds={**result.seconds,
                                                                   "total": time.perf_counter() - start})
        write_json_atomic(out / RESULT_FILE, result.to_dict())
        return result


@dataclass(frozen=True)
class RecipeResult:
    """What a recipe run produced: test accuracy (None without a test set), where things are, how long it took."""

    recipe: Recipe | None
    out: Path
    model_dir: Path  # a probe or fine-tuning run directory: `transferkit predict/evaluate` take it
    accuracy: float | None
    evaluation: Evaluation | None
    paths: dict[str, Path]
    seconds: dict[str, float]
    details: dict[str, Any]  # probe: codes key, C, CV accuracy; finetune: best epoch, validation accuracy

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": None if self.recipe is None else self.recipe.name, "accuracy": self.accuracy,
                "model_dir": str(self.model_dir), "paths": {k: str(v) for k, v in self.paths.items()},
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                "details": {k: None if v != v else v for k, v in self.details.items()}}  # NaN: not measured

    def summary(self) -> str:
        """The run in one line, for the CLI."""
        acc = "no test set" if self.accuracy is None else f"test accuracy {100 * self.accuracy:.2f}%"
        facts = ", ".join(_fact(k, v) for k, v in self.details.items() if v == v)  # v != v: NaN, not measured
        return (f"{self.recipe.name if self.recipe else 'recipe'}: {acc} ({facts}); "
                f"{self.seconds.get('total', 0):.0f} s -> {self.out} (model: {self.model_dir})")


def _fact(key: str, value: Any) -> str:
    if key.endswith("accuracy"):
        return f"{key.replace('_', ' ')} {100 * value:.2f}%"
    return f"{key.replace('_', ' ')} {value:g}" if isinstance(value, float) else f"{key.replace('_', ' ')} {value}"


def _run_probe(s: ProbeSettings, train: ImageDataset, test: ImageDataset | None, out: Path,
               progress: bool) -> RecipeResult:
    seconds: dict[str, float] = {}
    auto = s.layer == "auto"
    with _timed(seconds, "train_codes"):  # with layer 'auto' this includes the sweep
        extract_features(train, out / "train", model=s.model, weights=s.weights, layer=str(s.layer), pool=s.pool,
                         image_size=s.image_size, batch_size=s.batch_size, precision=s.precision,
                         num_workers=s.num_workers, progress=progress)
    paths = {"train_codes": out / "train", "probe": out / "probe"}
    if test is not None:
        with _timed(seconds, "test_codes"):
            extract_features(test, out / "test", like=out / "train", batch_size=s.batch_size,
                             num_workers=s.num_workers, progress=progress)
        paths["test_codes"] = out / "test"
    with _timed(seconds, "probe"):
        report = train_probe(out / "train", out / "probe", test=paths.get("test_codes"),
                             layer="best" if auto else None, C=s.C, cv=s.cv, scaling=s.scaling)
    ev = report.evaluation
    details = {"codes": report.key, "C": report.probe.best_C_, "cv_accuracy": report.probe.cv_score_}
    return RecipeResult(None, out, out / "probe", None if ev is None else ev.accuracy, ev, paths, seconds,
                        details)


def _run_finetune(config: FinetuneConfig, train: ImageDataset, test: ImageDataset | None, out: Path,
                  progress: bool) -> RecipeResult:
    seconds: dict[str, float] = {}
    with _timed(seconds, "finetune"):
        result = finetune(train, out / "run", config, progress=progress)
    paths = {"run": out / "run"}
    ev = None
    if test is not None:
        with _timed(seconds, "evaluate"):
            ev = evaluate_model(out / "run", test, out=out / "test", batch_size=config.batch_size, progress=progress)
        paths["test"] = out / "test"
    details = {"best_epoch": result.best_epoch, "val_accuracy": result.best_val_accuracy}
    return RecipeResult(None, out, out / "run", None if ev is None else ev.accuracy, ev, paths, seconds,
                        details)


@contextlib.contextmanager
def _timed(seconds: dict[str, float], name: str):
    """Record the wall-clock seconds of the block as seconds[name]."""
    start = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - start


# -- finding and reading recipes ----------------------------------------------------------------------


def _recipe_files() -> dict[str, Any]:
    """name -> file of every packaged recipe: in a wheel transferkit/_recipes/, in a checkout recipes/."""
    packaged = importlib.resources.files("transferkit") / "_recipes"
    folder = packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "recipes"
    return {f.name[:-5]: f for f in sorted(folder.iterdir(), key=lambda f: f.name) if f.name.endswith(".toml")}


def names() -> tuple[str, ...]:
    """The packaged recipes' names."""
    return tuple(_recipe_files())


def get(name: str) -> Recipe:
    """A packaged recipe by name; an unknown name gets the closest ones suggested."""
    files = _recipe_files()
    if name not in files:
        close = difflib.get_close_matches(name, files, n=2, cutoff=0.5)
        hint = f"Did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise DataError(f"unknown recipe '{name}'. {hint}Recipes: {', '.join(files)}; or give a .toml file.")
    return _parse(files[name].read_text(encoding="utf-8"), f"recipe file '{name}.toml'", f"{name}.toml")


def load(path: str | Path) -> Recipe:
    """A recipe from your own TOML file, validated like the packaged ones."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read recipe file '{path}': {e.strerror or e}") from e
    except UnicodeDecodeError as e:  # TOML is UTF-8 by definition
        raise DataError(f"recipe file '{path}' is not UTF-8 text: byte 0x{e.object[e.start]:02x} at offset "
                        f"{e.start}") from e
    return _parse(text, f"recipe file '{path}'", str(path))


def resolve(name_or_path: str | Path) -> Recipe:
    """get() for a name, load() for a .toml path (what `transferkit run RECIPE` accepts)."""
    text = str(name_or_path)
    return load(text) if text.endswith(".toml") or Path(text).is_file() else get(text)


def list() -> builtins.list[tuple[str, str]]:  # the API; this module never calls the builtin list()
    """(name, one-line description) of every packaged recipe."""
    return [(name, get(name).description) for name in _recipe_files()]


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


def _parse(text: str, where: str, source: str) -> Recipe:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise DataError(f"{where} is not valid TOML: {e}") from e
    return from_dict(data, where=where, source=source)


# -- validation ---------------------------------------------------------------------------------------


def from_dict(data: Mapping[str, Any], *, where: str = "recipe", source: str = "") -> Recipe:
    """Validate a recipe's fields: names the field, the allowed values or type, and what was given."""
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
    return Recipe(values["name"], kind, values.get("description", ""), settings, source)


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
    "probe": {f.name: {**EXTRACTOR, **PROBE}[f.name] for f in fields(ProbeSettings)
              if f.name in EXTRACTOR or f.name in PROBE},
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
