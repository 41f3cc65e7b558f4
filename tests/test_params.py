"""One source of parameter limits: the tables in codes/probe/finetune/models `params` are what the library
enforces, what the CLI offers and what the recipe validator refuses; scikit-learn's estimator checks pass."""

from __future__ import annotations

from numbers import Integral

import click
import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from transferkit import recipes
from transferkit.cli import cli
from transferkit.codes.extractor import FeatureExtractor
from transferkit.codes.params import EXTRACTOR
from transferkit.data.params import IMAGE_SIZE
from transferkit.errors import DataError, ParameterError
from transferkit.finetune.config import FinetuneConfig
from transferkit.finetune.loop import finetune
from transferkit.finetune.params import FINETUNE
from transferkit.probe.linear import LinearProbe
from transferkit.probe.params import PROBE, PROBE_JOB
from transferkit.recipes import schema
from transferkit.runtime.params import Interval, Pair, StrOptions, click_type, sklearn_constraints

TINY = {"model": "test_resnet", "weights": "random", "image_size": 32, "precision": "fp32", "engine": "torch"}


def outside(allowed: list):
    """A value no constraint in the list allows (for the tables' StrOptions, Interval and Pair entries)."""
    for c in allowed:
        if isinstance(c, StrOptions):
            return "bogus"
        if isinstance(c, Interval):
            return c.left - 1 if c.type is Integral else c.left - 0.5
        if isinstance(c, Pair):
            return (0.5, 0.25)
    return None


def limited(table: dict) -> list[str]:
    """The parameters of a table that have limits beyond a type."""
    return [k for k, v in table.items() if outside(v) is not None]


# -- the library enforces every limit, naming the parameter ------------------------------------------------------


@pytest.mark.parametrize("param", limited(EXTRACTOR))
def test_feature_extractor_enforces_its_table(param):
    bad = outside(EXTRACTOR[param])
    with pytest.raises(ParameterError, match=rf"^The '{param}' parameter of FeatureExtractor must be .* Got "):
        FeatureExtractor(**{**TINY, param: bad}).fit()


def test_feature_extractor_error_names_parameter_choices_and_value():
    with pytest.raises(ParameterError) as err:
        FeatureExtractor(precision="mean").fit()
    assert str(err.value) == ("The 'precision' parameter of FeatureExtractor must be a str among "
                              "{'auto', 'fp32', 'bf16', 'fp16', 'int8'}. Got 'mean' instead.")
    assert isinstance(err.value, ValueError) and "--" not in str(err.value)  # no CLI flag in a library error
    assert err.value.param == "precision"  # the CLI names the flag bound to it


def test_transforms_refuse_the_same_image_sizes():
    from transferkit.data.transforms import build_transform

    with pytest.raises(DataError, match=r"'image_size' parameter of build_transform must be an int in the range \[8"):
        build_transform({}, image_size=7)


def test_parameters_are_validated_in_fit_not_init():
    fe = FeatureExtractor(engine="bogus")  # clone()/set_params() must round-trip any value
    assert fe.set_params(engine="torch").get_params()["engine"] == "torch"


@pytest.mark.parametrize("param", limited(PROBE))
def test_linear_probe_enforces_its_table(param):
    X, y = np.random.default_rng(0).normal(size=(20, 3)), np.repeat([0, 1], 10)
    with pytest.raises(ParameterError, match=rf"^The '{param}' parameter of LinearProbe must be .* Got "):
        LinearProbe(**{param: outside(PROBE[param])}).fit(X, y)


@pytest.mark.parametrize("param", limited(FINETUNE))
def test_finetune_config_enforces_its_table(param, tmp_path):
    config = FinetuneConfig(**{param: outside(FINETUNE[param])})  # a frozen dataclass: checked when used
    with pytest.raises(ParameterError, match=rf"^The '{param}' parameter of FinetuneConfig must be .* Got "):
        config.validate()
    with pytest.raises(ParameterError, match=f"'{param}'"):
        finetune(None, tmp_path / "run", config)  # before the data or the model is touched
    assert not (tmp_path / "run").exists()


# -- the CLI offers the same choices ------------------------------------------------------------------------------

CLI_LIMITS = [  # (command, option, table, parameter)
    ("extract", "precision", EXTRACTOR, "precision"), ("extract", "engine", EXTRACTOR, "engine"),
    ("extract", "image_size", EXTRACTOR, "image_size"), ("extract", "batch_size", EXTRACTOR, "batch_size"),
    ("extract", "num_workers", EXTRACTOR, "num_workers"), ("probe", "scaling", PROBE, "scaling"),
    ("probe", "head", PROBE, "head"), ("probe", "cv", PROBE, "cv"), ("sweep", "cv", PROBE, "cv"),
    ("predict", "batch_size", EXTRACTOR, "batch_size"),
    ("evaluate", "batch_size", EXTRACTOR, "batch_size"), ("convert", "image_size", {"s": IMAGE_SIZE}, "s"),
    ("convert", "input_size", {"s": IMAGE_SIZE}, "s"),
    ("demo", "image_size", {"s": IMAGE_SIZE}, "s"),
    *[("finetune", p, FINETUNE, p) for p in ("precision", "image_size", "batch_size", "epochs", "lr", "layer_decay",
                                             "optimizer", "schedule", "warmup_epochs", "weight_decay",
                                             "label_smoothing", "clip_grad", "head", "random_erasing",
                                             "val_fraction", "early_stop", "seed", "num_workers")],
]


def described(kind: click.ParamType) -> tuple:
    kind = getattr(kind, "side", kind)  # --image-size (transferkit.cli.ImageSize): the limits of each side
    if isinstance(kind, click.Choice):
        return tuple(kind.choices)
    return (type(kind), kind.min, kind.max, kind.min_open, kind.max_open)


@pytest.mark.parametrize(("command", "option", "table", "param"), CLI_LIMITS, ids=lambda v: v if isinstance(v, str)
                         else "")
def test_cli_options_read_the_tables(command, option, table, param):
    params = {p.name: p for p in cli.commands[command].params}
    assert described(params[option].type) == described(click_type(table[param]))


def test_cli_lists_the_choices_in_help_and_errors(cli_run):
    help_text = cli_run("finetune", "--help", ok=False, catch=True).output
    for param in ("optimizer", "schedule", "head", "precision"):
        assert "[" + "|".join(FINETUNE[param][0].options) + "]" in help_text
    bad = cli_run("extract", "data", "-o", "out", "--engine", "fast", ok=False, catch=True)
    assert bad.exit_code == 2 and ", ".join(repr(e) for e in EXTRACTOR["engine"][0].options) in bad.output
    small = cli_run("extract", "data", "-o", "out", "--image-size", "7", ok=False, catch=True)
    assert small.exit_code == 2 and "x>=8" in small.output


def test_cli_reads_pair_limits_from_the_table(photo_folder, tmp_path, cli_run):
    result = cli_run("finetune", photo_folder, "-o", tmp_path / "run", "--crop-scale", "0.5:0.2", ok=False,
                     catch=True)
    assert result.exit_code == 2 and "0 < LO <= HI <= 1" in result.output


# -- the recipe validator refuses the same values -----------------------------------------------------------------


@pytest.mark.parametrize(("name", "param"), [("large-similar", p) for p in limited(FINETUNE)]
                         + [("small-similar", p) for p in limited(schema._LIMITS["probe"])])
def test_recipes_refuse_what_the_library_refuses(name, param):
    table = schema._LIMITS[recipes.get(name).kind]
    with pytest.raises(DataError, match=rf"^The '{param}' field of recipe '{name}' must be .* Got "):
        recipes.get(name).replace(**{param: outside(table[param])})


def test_one_table_per_limit():
    assert FinetuneConfig._parameter_constraints is FINETUNE and schema._LIMITS["finetune"] is FINETUNE
    for param, allowed in schema._LIMITS["probe"].items():
        assert allowed is EXTRACTOR.get(param, PROBE.get(param, PROBE_JOB.get(param)))
    assert EXTRACTOR["image_size"] is IMAGE_SIZE and FINETUNE["image_size"] is IMAGE_SIZE
    assert FINETUNE["batch_size"] is EXTRACTOR["batch_size"]
    for estimator, table in ((FeatureExtractor, EXTRACTOR), (LinearProbe, PROBE)):
        mine = {k: [str(c) for c in v] for k, v in estimator._parameter_constraints.items()}
        assert mine == {k: [str(c) for c in v] for k, v in sklearn_constraints(table).items()}


def test_a_limit_changed_in_the_table_moves_library_and_recipes(monkeypatch):
    monkeypatch.setitem(FINETUNE, "epochs", [Interval(Integral, 3, None, closed="left")])
    with pytest.raises(ParameterError, match=r"'epochs' parameter of FinetuneConfig must be an int in the range \[3"):
        FinetuneConfig(epochs=2).validate()
    with pytest.raises(DataError, match=r"'epochs' field of recipe 'large-similar' must be an int in the range \[3"):
        recipes.get("large-similar").replace(epochs=2)
    assert described(click_type(FINETUNE["epochs"]))[1] == 3  # the CLI builds its types from the same entry


def test_a_huge_number_is_cut_in_the_message():
    with pytest.raises(DataError) as err:
        recipes.get("large-similar").replace(epochs=-10**200)
    assert len(str(err.value)) < 300 and "characters" in str(err.value)


# -- scikit-learn's estimator checks ------------------------------------------------------------------------------

_IMAGES = "X is images (paths, PIL images, uint8 arrays or an ImageDataset), not a feature matrix"
_PRETRAINED = "fit learns nothing from X (the weights are pretrained): it does not read X, so cannot refuse it"


def expected_failures(estimator) -> dict[str, str]:
    """The checks that cannot apply to a transformer of images, and why; none for LinearProbe."""
    if not isinstance(estimator, FeatureExtractor):
        return {}
    return {
        "check_n_features_in": f"{_IMAGES}: no n_features_in_",
        "check_n_features_in_after_fitting": f"{_IMAGES}: no n_features_in_",
        "check_complex_data": _PRETRAINED, "check_dtype_object": _PRETRAINED,
        "check_estimators_empty_data_messages": _PRETRAINED, "check_estimators_nan_inf": _PRETRAINED,
        "check_estimator_sparse_tag": _PRETRAINED, "check_fit1d": _PRETRAINED,
        "check_fit2d_predict1d": f"{_IMAGES}: transform reads a 2-d array as images, not as rows of features",
        "check_transformer_general": f"{_IMAGES}: images of any size are resized, so a different width in "
                                     "transform than in fit is valid input",
        "check_transformer_data_not_an_array": f"{_IMAGES}: transform indexes a sequence; sklearn's _NotAnArray "
                                               "has no len()",
    }


@parametrize_with_checks([LinearProbe(Cs=(0.1, 1.0), cv=2), FeatureExtractor(**TINY)],  # cv=2: checks use few rows
                         expected_failed_checks=expected_failures)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)
