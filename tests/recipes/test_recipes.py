"""Recipes: the four packaged scenarios load, validate, and run to the end on a small real slice."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from transferkit import recipes
from transferkit.errors import DataError, ModelError
from transferkit.finetune.config import FinetuneConfig

FMNIST = Path("/usr/share/datasets/fashion-mnist")
REPO_RECIPES = Path(__file__).resolve().parents[2] / "recipes"
NAMES = ("large-different", "large-similar", "small-different", "small-similar")
SMALL_RUN = {"image_size": 32}  # ~30x fewer pixels than 224: the whole file runs in well under a minute
SMALL_FINETUNE = {**SMALL_RUN, "epochs": 1, "batch_size": 32}


@pytest.fixture(scope="module")
def fmnist_slice():
    """20 training and 10 test images per class of Fashion-MNIST."""
    if not FMNIST.is_dir():
        pytest.skip("needs dataset-fashion-mnist")
    from transferkit.recipes.demo import fashion_mnist

    return fashion_mnist("train", per_class=20), fashion_mnist("t10k", per_class=10)


def test_packaged_recipes_are_the_four_scenarios():
    assert recipes.names() == NAMES
    assert recipes.list() == [(name, recipes.get(name).description) for name in NAMES]  # list() reads, get() checks
    for name in NAMES:
        recipe = recipes.get(name)
        assert recipe.name == name and recipe.description and "\n" not in recipe.description
        assert recipe.kind == ("finetune" if name.startswith("large") else "probe")
        assert (REPO_RECIPES / f"{name}.toml").read_text().startswith("# "), "each file opens with its reasoning"
    assert recipes.get("small-similar").settings.layer == "pre_logits"
    different = recipes.get("small-different").settings  # the measured winners (docs/benchmarks.md, issue 20)
    assert different.layer == "auto" and different.combine and different.head == "logistic" and different.flip
    large_similar = recipes.get("large-similar").settings
    assert isinstance(large_similar, FinetuneConfig)
    assert large_similar.freeze_until == "blocks.5" and large_similar.lr_range[0] < large_similar.lr_range[1]
    assert recipes.get("large-different").settings.freeze_until == "none"


@pytest.mark.parametrize("name", NAMES)
def test_each_recipe_runs_to_the_end(name, fmnist_slice, tmp_path):
    train, test = fmnist_slice
    recipe = recipes.get(name)
    # probes: one shifted copy of each image too, so a recipe's `augment` is seen reaching the probe
    recipe = recipe.replace(**(SMALL_FINETUNE if recipe.kind == "finetune" else {**SMALL_RUN, "augment": 1}))
    result = recipe.run(train, test, tmp_path / name, progress=False)
    # chance is 10%; one epoch of a few steps need not beat it, a probe on 200 images does by far
    assert (0.4 if recipe.kind == "probe" else 0.0) <= result.accuracy <= 1.0, result.summary()
    assert result.evaluation.confusion.sum() == len(test)
    saved = json.loads((tmp_path / name / "recipe.json").read_text())
    assert saved["recipe"]["name"] == name and saved["recipe"]["image_size"] == 32
    assert json.loads((tmp_path / name / "result.json").read_text())["accuracy"] == result.accuracy
    assert result.seconds["total"] > 0
    if recipe.kind == "probe":  # the same artifacts as extract + probe
        assert (result.model_dir / "probe").is_dir() and (result.model_dir / "confusion.png").is_file()
        assert (tmp_path / name / "train" / "meta.json").is_file() and (tmp_path / name / "test").is_dir()
        assert (tmp_path / name / "train" / "sweep.json").is_file() == (name == "small-different")
        metrics = json.loads((result.model_dir / "metrics.json").read_text())
        assert result.details["flip"] == metrics["flip"] == (name == "small-different")
        assert metrics["head"] == recipe.settings.head and result.details["augment"] == metrics["augment"] == 1
    else:  # the same artifacts as finetune + evaluate
        assert (result.model_dir / "config.json").is_file() and (result.model_dir / "model-best.safetensors").is_file()
        assert (tmp_path / name / "test" / "metrics.json").is_file()


def test_run_from_the_cli_with_a_users_file(photo_folder, tmp_path, cli_run):
    mine = tmp_path / "mine.toml"
    mine.write_text('name = "mine"\nkind = "probe"\nmodel = "tf_efficientnet_lite0"\nlayer = "blocks.4"\n'
                    'pool = "avg"\nimage_size = 32\ncv = 2\n')
    out = cli_run("run", mine, photo_folder, "--test", photo_folder, "-o", tmp_path / "out", "--set", "C=0.01").output
    assert "mine: test accuracy" in out and "codes blocks.4|avg" in out
    saved = json.loads((tmp_path / "out" / "recipe.json").read_text())["recipe"]
    assert saved["C"] == 0.01 and saved["layer"] == "blocks.4"


def test_recipes_command_lists_them(cli_run):
    lines = cli_run("recipes").output.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(NAMES)


@pytest.mark.parametrize("command", ["run", "recipes", "advise"])
def test_help(command, cli_run):
    assert "Usage:" in cli_run(command, "--help").output


# -- validation -----------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.toml"
    path.write_text('name = "r"\n' + text)
    return path


@pytest.mark.parametrize(("text", "words"), [
    ('kind = "finetune"\nmodel = "resnet18"\nepoch = 5\n', ["unknown field 'epoch'", "Did you mean 'epochs'",
                                                            "freeze_until", "r.toml"]),
    ('kind = "probe"\nmodel = "resnet18"\nepochs = 5\n', ["unknown field 'epochs'", "Fields of a probe recipe"]),
    ('kind = "finetune"\nmodel = "resnet18"\nepochs = "five"\n', ["'epochs' field", "an integer", "'five' (str)"]),
    ('kind = "finetune"\nmodel = "resnet18"\naugment = 1\n', ["'augment' field", "true or false", "1 (int)"]),
    ('kind = "finetune"\nmodel = "resnet18"\nlr_range = [1e-3]\n', ["'lr_range'", "a list of 2 numbers"]),
    ('kind = "probe"\nlayer = "auto"\n', ["required field 'model'"]),
    ('model = "resnet18"\n', ["required field 'kind'"]),
    ('kind = "svm"\nmodel = "resnet18"\n', ["'kind' field", "'probe', 'finetune'", "'svm'"]),
    ('kind = "finetune"\nmodel = "resnet18"\noptimizer = "adam"\n', ["'optimizer'", "'adamw', 'sgd'", "'adam'"]),
    ('kind = "finetune"\nmodel = "resnet18"\nlayer_decay = 1.5\n', ["'layer_decay'", "in the range (0.0, 1.0]", "1.5"]),
    ('kind = "probe"\nmodel = "resnet18"\nC = -1\n', ["'C' field", "'auto'", "-1"]),
    ('kind = "probe"\nmodel = "resnet18"\nlayer = "auto"\npool = "avg"\n', ["'pool'", "'all'", "layer 'auto'"]),
    ('kind = "probe"\nmodel = "resnet18"\npool = "avg,max"\n', ["'pool'", "one pooling"]),
    ('kind = "probe"\nmodel = "resnet18"\ncombine = true\n', ["'combine' field", "layer 'auto'", "'pre_logits'"]),
    ('kind = "probe"\nmodel = "resnet18"\nflip = "yes"\n', ["'flip' field", "true or false", "'yes' (str)"]),
    ('kind = "probe"\nmodel = "resnet18"\naugment = -2\n', ["'augment' field", "in the range [0, inf)", "-2"]),
    ('kind = "probe"\nmodel = "resnet18"\naugment = true\n', ["'augment' field", "an integer", "True (bool)"]),
    ('kind = "probe"\nmodel = "resnet18\n', ["not valid TOML"]),
])
def test_bad_recipe_file_names_the_field(tmp_path, text, words):
    with pytest.raises(DataError) as err:
        recipes.load(write(tmp_path, text))
    for word in words:
        assert word in str(err.value)


def test_bad_pooling_names_it(tmp_path):
    with pytest.raises(ModelError, match="'pool'.*'mean'"):
        recipes.load(write(tmp_path, 'kind = "probe"\nmodel = "resnet18"\npool = "mean"\n'))


def test_probe_settings_for_multilabel_data_are_one_svm_per_label_without_mirrors():
    different = recipes.get("small-different").settings
    assert different.for_labels(False) is different  # single-label: as written
    ran = replace(different, augment=4).for_labels(True)
    assert (ran.head, ran.flip, ran.augment) == ("svm", False, 0)
    assert (different.head, different.flip) == ("logistic", True)
    assert ran.layer == different.layer and ran.combine == different.combine  # nothing else changes


def test_unknown_name_suggests_the_closest():
    with pytest.raises(DataError, match="Did you mean 'small-different'") as err:
        recipes.get("small-diferent")
    assert all(name in str(err.value) for name in NAMES)


def test_replace_validates_like_a_file():
    recipe = recipes.get("large-similar")
    assert recipe.replace(epochs=2).settings.epochs == 2 and recipe.settings.epochs == 5
    assert recipe.replace(early_stop="none").settings.early_stop is None
    assert recipe.replace(lr_range=[1e-4, 1e-3]).settings.lr_range == (1e-4, 1e-3)
    assert recipe.replace(lr=1).settings.lr == 1.0  # TOML integers pass as numbers
    with pytest.raises(DataError, match=r"'epochs' field of recipe 'large-similar' must be an int in the range "
                                        r"\[1, inf\). Got 0"):
        recipe.replace(epochs=0)
    with pytest.raises(DataError, match="unknown field 'layer'.*Fields of a finetune recipe"):
        recipe.replace(layer="auto")


def test_overrides_parse_as_toml_scalars():
    parsed = recipes.parse_overrides(["epochs=5", "lr=1e-3", "augment=false", "freeze_until=blocks.5",
                                      "lr_range=[1e-4, 3e-3]", "label-smoothing=0"])
    assert parsed == {"epochs": 5, "lr": 1e-3, "augment": False, "freeze_until": "blocks.5",
                      "lr_range": [1e-4, 3e-3], "label_smoothing": 0}
    with pytest.raises(DataError, match="KEY=VALUE"):
        recipes.parse_overrides(["epochs"])


def test_set_with_an_unknown_key_fails_naming_it(photo_folder, cli_run):
    result = cli_run("run", "large-similar", photo_folder, "--set", "epoch=5", ok=False)
    assert result.exit_code == 1
    assert "unknown field 'epoch'" in result.output and "Did you mean 'epochs'" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = cli_run("run", "small-diferent", photo_folder, ok=False)
    assert result.exit_code == 1 and "Did you mean 'small-different'" in result.output
