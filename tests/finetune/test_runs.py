"""Fine-tuning runs on disk: resume after a kill, the frozen-prefix cache, torchrun, LR finder, outputs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from transferkit.data.datasets import open_dataset
from transferkit.errors import DataError
from transferkit.finetune.config import FinetuneConfig
from transferkit.finetune.loop import finetune
from transferkit.finetune.lr_finder import find_lr
from transferkit.finetune.prefix_cache import frozen_prefix
from transferkit.runtime.distributed import steps_per_epoch

LITE0 = dict(weights="package", image_size=32, batch_size=4, num_workers=0)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run faster on one thread


@pytest.mark.parametrize("settings", [dict(head="mlp"), dict(ema_decay=0.9, mixup=0.4, cutmix=1.0)],
                         ids=["mlp", "ema-mixup"])
def test_resume_after_kill_gives_bit_identical_weights(tmp_path, photo_folder, monkeypatch, settings):
    """Same seed; the run dies in epoch 2; --resume finishes it with exactly the uninterrupted weights (with an EMA:
    the saved files are the average, restored from the checkpoint)."""
    data = open_dataset(photo_folder)
    config = FinetuneConfig(**LITE0, epochs=3, **settings)  # augmentation + dropout or mixup: every RNG matters
    whole = finetune(data, tmp_path / "whole", config, progress=False)

    import transferkit.finetune.loop as ft

    real_step, steps = ft._step, []

    def killed(run, *args):
        steps.append(run.step)
        if len(steps) == 5:  # 3 steps per epoch: the middle of epoch 2
            raise KeyboardInterrupt
        return real_step(run, *args)

    monkeypatch.setattr(ft, "_step", killed)
    with pytest.raises(KeyboardInterrupt):
        finetune(data, tmp_path / "killed", config, progress=False)
    monkeypatch.setattr(ft, "_step", real_step)
    assert json.loads((tmp_path / "killed" / "checkpoint.json").read_text())["loop"]["epoch"] == 1
    torch.manual_seed(1234)  # the resumed process's own RNG history must not matter
    resumed = finetune(data, tmp_path / "killed", config, progress=False, resume=True)

    for name in ("model-last.safetensors", "model-best.safetensors"):
        a, b = load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "killed" / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in whole.history]
    rows = list(csv.DictReader((tmp_path / "killed" / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert len(list((tmp_path / "killed").glob("checkpoint-*.safetensors"))) == 1  # older ones are removed


def test_resume_refuses_another_config_and_names_the_difference(tmp_path, photo_folder, cli_run):
    data = open_dataset(photo_folder)
    finetune(data, tmp_path / "run", FinetuneConfig(**LITE0, epochs=1), progress=False)
    with pytest.raises(DataError) as err:
        finetune(data, tmp_path / "run", FinetuneConfig(**{**LITE0, "image_size": 48}, epochs=1), resume=True)
    assert "image_size: run has 32, now 48" in str(err.value)
    with pytest.raises(DataError, match=r"already holds a fine-tuning run; resume it \(resume=True\) or choose"):
        finetune(data, tmp_path / "run", FinetuneConfig(**LITE0, epochs=1), progress=False)
    result = cli_run("-q", "finetune", photo_folder, "--resume", tmp_path / "run", "--model", "test_resnet", ok=False,
                     catch=True)
    assert result.exit_code != 0 and "model: run has 'tf_efficientnet_lite0', now 'test_resnet'" in result.output


def test_frozen_prefix_cache_matches_recomputing(tmp_path, photo_folder):
    """Frozen up to blocks.4, no augmentation: cached activations train to the same weights."""
    data = open_dataset(photo_folder)
    config = FinetuneConfig(**LITE0, epochs=2, freeze_until="blocks.4", augment=False)
    cached = finetune(data, tmp_path / "cached", config, progress=False)
    plain = finetune(data, tmp_path / "plain", FinetuneConfig(**{**config.__dict__, "cache": False}), progress=False)
    assert cached.cached and not plain.cached
    meta = json.loads((tmp_path / "cached" / "config.json").read_text())
    assert meta["cached_prefix"][0] == "conv_stem" and meta["cached_prefix"][-1] == "blocks.3"
    assert [name for name, _ in frozen_prefix(cached.model)] == meta["cached_prefix"]
    a, b = cached.model.state_dict(), plain.model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-4, rtol=1e-3, msg=key)
    assert [h["val_acc"] for h in cached.history] == [h["val_acc"] for h in plain.history]
    assert not list((tmp_path / "cached").glob("prefix-cache-*"))


def test_run_outputs_plots_and_lr_finder(tmp_path, photo_folder):
    data = open_dataset(photo_folder)
    out = tmp_path / "run"
    finetune(data, out, FinetuneConfig(**LITE0, epochs=2, schedule="onecycle"), progress=False)
    for name in ("curves.png", "confusion.png", "report.txt", "checkpoint.json"):
        assert (out / name).stat().st_size > 0, name
    meta = json.loads((out / "config.json").read_text())
    assert 0 <= meta["val"]["accuracy"] <= 1 and meta["val"]["n"] == 2
    result = find_lr(data, tmp_path / "lr", FinetuneConfig(**LITE0), steps=12, progress=False)
    assert len(result.lrs) == len(result.losses) >= 7 and result.lrs == sorted(result.lrs)
    tail = result.losses[1:]  # 12 steps: the first tenth (1 step) is not trusted
    assert result.lrs[0] == pytest.approx(1e-6) and result.suggestion == pytest.approx(
        result.lrs[1 + tail.index(min(tail))] / 10)
    assert (tmp_path / "lr" / "lr_find.png").stat().st_size > 0


def test_two_processes_with_gloo(tmp_path, digits_folder):
    """torchrun, 2 CPU processes: each rank sees half of every epoch; rank 0 alone writes the run."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "transferkit",
           "-q", "finetune", str(digits_folder), "-o", str(out), "--weights", "package", "--image-size", "32",
           "--batch-size", "16", "--epochs", "3", "--lr", "0.003", "--freeze-until", "blocks.5", "--no-augment"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((out / "config.json").read_text())
    n_train = meta["n_train"]
    assert n_train == 180 and meta["n_val"] == 20
    loop = json.loads((out / "checkpoint.json").read_text())["loop"]
    assert loop["epoch"] == 3 and loop["step"] == 3 * steps_per_epoch(n_train, 16, 2) == 3 * 5
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 3 and float(rows[-1]["val_acc"]) >= 0.6  # 10 classes (chance 0.1), 20 validation digits
    assert not list(out.glob(".*.tmp"))  # only rank 0 wrote, and completely


def test_steps_per_epoch():
    assert steps_per_epoch(180, 16, 2) == 5  # 90 per rank, last 10 dropped
    assert steps_per_epoch(180, 16, 1) == 11
    assert steps_per_epoch(10, 16, 2) == 1  # fewer than a batch: one short batch, not none
