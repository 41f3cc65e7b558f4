"""advise: size and similarity signals on Fashion-MNIST and on natural photos, the rule, the CLI."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from transferkit import recipes
from transferkit.data.datasets import ImageDataset
from transferkit.errors import DataError
from transferkit.recipes.advise import Advice, Thresholds, _stratified, advise, parse_thresholds

FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def photos(tmp_path_factory, sample_images) -> Path:
    """Natural photos, honestly small: 2 classes x 12 random square crops of scikit-learn's two photos, 96 px."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for cls, name in (("temple", "china.jpg"), ("flower", "flower.jpg")):
        img = sample_images[name]
        (root / cls).mkdir()
        for i in range(12):
            side = int(rng.integers(160, 260))
            x, y = rng.integers(0, img.width - side), rng.integers(0, img.height - side)
            img.crop((x, y, x + side, y + side)).resize((96, 96)).save(root / cls / f"{i:02d}.jpg")
    return root


def check_signals(advice: Advice, n_images: int, n_classes: int) -> None:
    assert isinstance(advice, Advice) and advice.recipe in recipes.names()
    assert advice.recipe == f"{advice.size}-{advice.domain}"
    assert advice.n_images == n_images and advice.n_classes == n_classes and advice.n_sampled == n_images
    assert 0 < advice.top_accuracy <= 1 and 0 < advice.best_earlier_accuracy <= 1
    assert advice.gap_points == pytest.approx(100 * (advice.best_earlier_accuracy - advice.top_accuracy))
    assert advice.best_earlier.split("|")[0] in advice.stage_accuracy and "pre_logits" not in advice.stage_accuracy
    assert 0 < advice.max_softmax <= 1 and 0 <= advice.entropy <= advice.max_entropy == pytest.approx(np.log(1000))
    assert advice.images_per_second > 0 and advice.estimate_seconds > 0
    report = advice.report()
    for text in ("max-softmax", "gap", "thresholds: large if median", f"recommended recipe: {advice.recipe}",
                 "estimated run time"):
        assert text in report
    json.dumps(advice.to_dict())


def test_fashion_mnist_is_small_and_different():
    if not FMNIST.is_dir():
        pytest.skip("needs dataset-fashion-mnist")
    from transferkit.recipes.demo import fashion_mnist

    advice = advise(fashion_mnist("train", per_class=20), progress=False)
    print(advice.report())
    check_signals(advice, 200, 10)
    assert advice.size == "small" and advice.per_class_median == 20 and advice.imbalance == 1.0
    assert advice.domain == "different" and advice.recipe == "small-different"
    assert "layer sweep" in advice.estimate and "mirror codes and refit" in advice.estimate  # the recipe's flip pass
    assert "view selection up to" in advice.estimate  # the recipe's combine


def test_photos_are_small_and_similar(photos):
    advice = advise(photos, progress=False)
    print(advice.report())
    check_signals(advice, 24, 2)
    assert advice.recipe == "small-similar"


def test_thresholds_override_the_rule(photos):
    advice = advise(photos, thresholds={"large_per_class": 1, "max_softmax": 1.0}, progress=False)
    assert advice.recipe == "large-different" and advice.size == "large"
    assert "epochs" in advice.estimate and advice.thresholds.large_per_class == 1


def test_thresholds_name_what_is_wrong():
    assert parse_thresholds(["gap_points=2.5"]) == Thresholds(gap_points=2.5)
    with pytest.raises(DataError, match="unknown threshold 'gap'.*gap_points"):
        parse_thresholds(["gap=1"])
    with pytest.raises(DataError, match="'max_softmax' threshold must be a number"):
        Thresholds().replace(max_softmax="high")


def test_cli_prints_and_runs_the_recommendation(photos, tmp_path, cli_run):
    out = cli_run("-q", "advise", photos, "--run", "--test", photos, "-o", tmp_path / "run").output
    assert "recommended recipe:" in out and "mean max-softmax" in out and "test accuracy" in out
    assert (tmp_path / "run" / "result.json").is_file()
    bad = cli_run("advise", photos, "--threshold", "gap=1", ok=False)
    assert bad.exit_code == 1 and "unknown threshold 'gap'" in bad.output


def test_imbalanced_data_gets_counts_ratio_and_class_weighting(photos, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(photos, data)  # the module's photos stay balanced
    for extra in sorted((data / "flower").iterdir())[3:]:  # 12 temples, 3 flowers
        extra.unlink()
    advice = advise(data, progress=False)
    assert advice.class_counts == {"flower": 3, "temple": 12} and advice.imbalance == 4.0
    assert advice.class_weight == "balanced" and advice.recipe_to_run().settings.class_weight == "balanced"
    report = advice.report()
    assert "class counts: flower 3, temple 12" in report and "(imbalance 4.0x)" in report
    assert "with class_weight=balanced (imbalance 4.0x > " in report
    tuning = next(name for name, _ in recipes.list() if recipes.get(name).kind == "finetune")
    finetuning = dataclasses.replace(advice, recipe=tuning)
    assert finetuning.recipe_to_run().settings.sampler == "balanced"  # the sampler beat the weighted loss there
    assert finetuning.recipe_to_run().settings.class_weight is None and "with sampler=balanced" in finetuning.report()
    unweighted = dataclasses.replace(advice, class_weight=None)  # what advise gives below thresholds.imbalance
    assert unweighted.recipe_to_run() == recipes.get(advice.recipe) and "with class_weight" not in unweighted.report()


def test_similarity_sample_keeps_the_class_proportions():
    targets = np.repeat([0, 1, 2], [700, 250, 50])
    data = ImageDataset([f"{i}.png" for i in range(1000)], targets, ["a", "b", "c"], root="images", kind="files")
    assert np.bincount(_stratified(data, 200).targets).tolist() == [140, 50, 10]


def test_selection_time_is_every_step_of_greedy_selection():
    """Candidates' sweep times 1..4 s, best first, at most 3 views: step 1 scores the best with each other one
    (3 + 4 + 5 s), step 2 those two with each of the 2 left (6 + 7 s); a combination costs more than its views."""
    from transferkit.recipes.advise import COMBINED_COST, _selection_seconds

    assert _selection_seconds([1.0, 2.0, 3.0, 4.0]) == pytest.approx(25.0 * COMBINED_COST)
    assert _selection_seconds([5.0]) == 0.0  # one candidate: nothing to add
