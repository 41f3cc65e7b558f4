"""Fine-tuning on imbalanced classes: the class-weighted loss, the class-balanced sampler, their config and flags."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np
import pytest
from sklearn.utils.class_weight import compute_class_weight

from transferkit.data.datasets import ImageDataset, open_dataset
from transferkit.errors import ParameterError
from transferkit.finetune.config import FinetuneConfig
from transferkit.finetune.loaders import BalancedSampler, balanced_weights, split_train_val
from transferkit.finetune.loop import finetune
from transferkit.runtime.distributed import World

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run faster on one thread


def test_balanced_weights_are_sklearns():
    y = np.repeat([0, 1, 2], [60, 30, 10])
    np.testing.assert_allclose(balanced_weights(y, 3), compute_class_weight("balanced", classes=np.arange(3), y=y))
    assert balanced_weights(np.array([0, 0, 2]), 3).tolist() == [0.75, 0.0, 1.5]  # a class with no images: 0


def test_balanced_sampler_draws_classes_equally_and_shards_by_rank():
    y = np.repeat([0, 1, 2], [900, 90, 10])
    one = BalancedSampler(y, World(rank=0, size=1), seed=0)
    counts = Counter(y[list(one)])
    assert len(one) == 1000 and all(280 < counts[c] < 390 for c in range(3)), counts
    assert list(one) == list(one)  # the same epoch draws the same indices (resume)
    one.set_epoch(1)
    assert list(one) != list(BalancedSampler(y, World(rank=0, size=1), seed=0))
    ranks = [BalancedSampler(y, World(rank=r, size=2), seed=0) for r in (0, 1)]
    assert [len(s) for s in ranks] == [500, 500]
    merged = np.empty(1000, dtype=int)
    merged[0::2], merged[1::2] = list(ranks[0]), list(ranks[1])
    np.testing.assert_array_equal(merged, list(BalancedSampler(y, World(rank=0, size=1), seed=0)))


def test_config_limits_and_old_configs():
    for field, value in (("class_weight", "auto"), ("sampler", "weighted")):
        with pytest.raises(ParameterError, match=f"The '{field}' parameter of FinetuneConfig must be") as err:
            FinetuneConfig(**{field: value}).validate()
        assert err.value.param == field
    old = FinetuneConfig.from_dict({"model": "test_resnet", "epochs": 2})  # a config.json from before the fields
    assert old.class_weight is None and old.sampler is None


def test_weighted_run_records_weights_and_balanced_scores(tmp_path, photo_folder, cli_run):
    for extra in sorted((photo_folder / "flower").iterdir())[4:]:  # 8 temples, 4 flowers
        extra.unlink()
    config = FinetuneConfig(model="test_resnet", weights="random", image_size=32, batch_size=4, epochs=1,
                            class_weight="balanced", val_fraction=0.25, augment=False)
    result = finetune(open_dataset(photo_folder), tmp_path / "run", config, progress=False)
    plain = finetune(open_dataset(photo_folder), tmp_path / "plain", dataclasses.replace(config, class_weight=None),
                     progress=False)
    assert result.history[0]["train_loss"] != pytest.approx(plain.history[0]["train_loss"])  # same batches
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["config"]["class_weight"] == "balanced" and meta["config"]["sampler"] is None
    assert meta["class_weights"] == pytest.approx([1.5, 0.75])  # 9 training images: 3 flowers, 6 temples
    assert {"accuracy", "balanced_accuracy", "macro_f1", "per_class"} <= meta["val"].keys()
    assert result.evaluation.balanced_accuracy == meta["val"]["balanced_accuracy"]
    bad = cli_run("finetune", photo_folder, "-o", tmp_path / "bad", "--sampler", "weighted", ok=False)
    assert bad.exit_code == 2 and "Invalid value for '--sampler'" in bad.output
    out = cli_run("finetune", photo_folder, "-o", tmp_path / "cli", "--model", "test_resnet", "--weights", "random",
                  "--epochs", "1", "--batch-size", "4", "--image-size", "32", "--val-fraction", "0.25",
                  "--sampler", "balanced").output
    assert "validation accuracy: " in out and "balanced accuracy: " in out and "macro-F1: " in out


def test_validation_hold_out_keeps_the_class_proportions():
    targets = np.repeat([0, 1, 2], [700, 250, 50])
    data = ImageDataset([f"{i}.png" for i in range(1000)], targets, ["a", "b", "c"], root="images", kind="files")
    fit, val = split_train_val(data, None, FinetuneConfig(val_fraction=0.1))
    assert np.bincount(val.targets).tolist() == [70, 25, 5] and np.bincount(fit.targets).tolist() == [630, 225, 45]
