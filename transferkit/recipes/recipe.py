"""The four cs231n transfer-learning scenarios as recipes: find and load recipe files, run them end to end.

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
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transferkit.errors import DataError
from transferkit.finetune.config import FinetuneConfig
from transferkit.recipes.schema import ProbeSettings, check_fields, parse_toml

if TYPE_CHECKING:  # running a recipe needs torch; finding, reading and listing recipes does not
    from transferkit.data.datasets import ImageDataset
    from transferkit.probe.metrics import Evaluation, MultiLabelEvaluation

RECIPE_FILE = "recipe.json"
RESULT_FILE = "result.json"
OUTPUT_KIND = "recipe run"  # the output kind in its marker (transferkit.runtime.outputs)


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
        from transferkit.data.datasets import ImageDataset
        from transferkit.jobs import load_data
        from transferkit.runtime.atomic import write_json_atomic
        from transferkit.runtime.outputs import claim

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
    accuracy: float | None  # None on multi-label data: see evaluation.mAP
    evaluation: Evaluation | MultiLabelEvaluation | None
    paths: dict[str, Path]
    seconds: dict[str, float]
    details: dict[str, Any]  # probe: codes key, C, CV score and its metric; finetune: best epoch, val accuracy

    def to_dict(self) -> dict[str, Any]:
        from transferkit.probe.metrics import MultiLabelEvaluation

        scores = {"mAP": self.evaluation.mAP} if isinstance(self.evaluation, MultiLabelEvaluation) else {}
        return {"recipe": None if self.recipe is None else self.recipe.name, "accuracy": self.accuracy, **scores,
                "model_dir": str(self.model_dir), "paths": {k: str(v) for k, v in self.paths.items()},
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                "details": {k: None if v != v else v for k, v in self.details.items()}}  # NaN: not measured

    def summary(self) -> str:
        """The run in one line, for the CLI."""
        acc = "no test set" if self.evaluation is None else f"test {self.evaluation.summary()}"
        facts = ", ".join(_fact(k, v) for k, v in self.details.items() if v == v)  # v != v: NaN, not measured
        return (f"{self.recipe.name if self.recipe else 'recipe'}: {acc} ({facts}); "
                f"{self.seconds.get('total', 0):.0f} s -> {self.out} (model: {self.model_dir})")


def _fact(key: str, value: Any) -> str:
    if key.endswith("accuracy"):
        return f"{key.replace('_', ' ')} {100 * value:.2f}%"
    return f"{key.replace('_', ' ')} {value:g}" if isinstance(value, float) else f"{key.replace('_', ' ')} {value}"


def _run_probe(s: ProbeSettings, train: ImageDataset, test: ImageDataset | None, out: Path,
               progress: bool) -> RecipeResult:
    from transferkit.jobs import extract_features, train_probe

    seconds: dict[str, float] = {}
    auto = s.layer == "auto"
    with _timed(seconds, "train_codes"):  # with layer 'auto' this includes the sweep
        extract_features(train, out / "train", model=s.model, weights=s.weights, layer=str(s.layer), pool=s.pool,
                         image_size=s.image_size, batch_size=s.batch_size, precision=s.precision,
                         num_workers=s.num_workers, combine=s.combine, progress=progress)
    paths = {"train_codes": out / "train", "probe": out / "probe"}
    if test is not None:
        with _timed(seconds, "test_codes"):
            extract_features(test, out / "test", like=out / "train", batch_size=s.batch_size,
                             num_workers=s.num_workers, progress=progress)
        paths["test_codes"] = out / "test"
    ran = s.for_labels(train.multilabel)  # multi-label: one SVM per label, no mirrors; the details say so
    with _timed(seconds, "probe"):
        report = train_probe(out / "train", out / "probe", test=paths.get("test_codes"),
                             layer="best" if auto else None, C=s.C, cv=s.cv, scaling=s.scaling,
                             class_weight=s.class_weight, metric=s.metric, head=ran.head, flip=ran.flip,
                             augment=ran.augment, progress=progress)
    ev = report.evaluation
    details = {"codes": report.key, "head": report.probe.head_, "C": report.probe.best_C_,
               "cv_mAP" if train.multilabel else "cv_accuracy": report.probe.cv_score_,
               "cv_metric": report.probe.metric_, "flip": ran.flip, "augment": ran.augment}
    return RecipeResult(None, out, out / "probe", _accuracy(ev), ev, paths, seconds, details)


def _run_finetune(config: FinetuneConfig, train: ImageDataset, test: ImageDataset | None, out: Path,
                  progress: bool) -> RecipeResult:
    from transferkit.finetune.loop import finetune
    from transferkit.jobs import evaluate_model

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
    if train.multilabel and result.evaluation is not None:  # per-label accuracy says little: the val mAP
        details = {"best_epoch": result.best_epoch, "val_mAP": result.evaluation.mAP}
    return RecipeResult(None, out, out / "run", _accuracy(ev), ev, paths, seconds, details)


def _accuracy(ev: Evaluation | MultiLabelEvaluation | None) -> float | None:
    """Test accuracy; None without a test set, or on multi-label data (its score is the evaluation's mAP)."""
    from transferkit.probe.metrics import Evaluation

    return ev.accuracy if isinstance(ev, Evaluation) else None


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
    """(name, one-line description) of every packaged recipe. Read, not validated (that would import
    scikit-learn's validator: a second for four lines); `get` validates, and the tests check every packaged one."""
    return [(name, str(parse_toml(f.read_text(encoding="utf-8"), f"recipe file '{name}.toml'").get("description", "")))
            for name, f in _recipe_files().items()]


def _parse(text: str, where: str, source: str) -> Recipe:
    return from_dict(parse_toml(text, where), where=where, source=source)


def from_dict(data: Mapping[str, Any], *, where: str = "recipe", source: str = "") -> Recipe:
    """Validate a recipe's fields: names the field, the allowed values or type, and what was given."""
    name, kind, description, settings = check_fields(data, where)
    return Recipe(name, kind, description, settings, source)
