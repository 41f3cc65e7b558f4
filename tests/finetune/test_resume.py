"""Resume and continue: `--resume RUN` alone, extending a finished run with more epochs, what may change; the warning
on a validation set too small to pick a best epoch."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import transferkit.finetune.loop as ft
from transferkit.data.datasets import open_dataset
from transferkit.errors import DataError, ParameterError
from transferkit.finetune.config import FinetuneConfig
from transferkit.finetune.loaders import MIN_VAL_IMAGES, small_val_warning
from transferkit.finetune.loop import finetune
from transferkit.finetune.resume import resume_run
from transferkit.finetune.rundir import RESULTS, RunMismatch
from transferkit.models.stages import warmup_cosine

# augmentation and dropout on: every RNG state matters; 14 training images in batches of 4: 3 steps per epoch
CONFIG = FinetuneConfig(model="test_resnet", weights="random", image_size=32, batch_size=4, num_workers=0,
                        head="mlp", epochs=2)
OPTIONS = ["--model", "test_resnet", "--weights", "random", "--image-size", "32", "--batch-size", "4", "--head", "mlp"]

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run faster on one thread


@pytest.fixture(scope="module")
def finished(tmp_path_factory, shared_photo_folder) -> Path:
    """A finished two-epoch run on 14 + 2 images; tests copy it before changing it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    finetune(open_dataset(shared_photo_folder), out, CONFIG, progress=False)
    return out


def _kill_at_step(monkeypatch, n: int) -> None:
    """The n-th optimizer step of this process raises KeyboardInterrupt (a kill between two checkpoints)."""
    real, calls = ft._step, []

    def killed(run, *args):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(run, *args)

    monkeypatch.setattr(ft, "_step", killed)


def _same_weights(a: Path, b: Path) -> None:
    for name in ("model-last.safetensors", "model-best.safetensors"):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), (name, key)


def _rows(run: Path) -> list[dict]:
    return list(csv.DictReader((run / "metrics.csv").open()))


def test_resume_alone_continues_a_killed_run_from_the_cli(tmp_path, photo_folder, cli_run, monkeypatch):
    """DATA given relative to one directory (7 of its 8 images per class), the resume run from another with nothing
    but --resume RUN: the data comes from config.json, and the weights are those of a run that was never killed."""
    whole = finetune(open_dataset(photo_folder).subset(7), tmp_path / "whole", dataclasses.replace(CONFIG, epochs=3),
                     progress=False)
    monkeypatch.chdir(photo_folder.parent)
    _kill_at_step(monkeypatch, 5)  # 12 training images, 3 steps per epoch: the middle of epoch 2
    result = cli_run("-q", "finetune", photo_folder.name, "--per-class", "7", "-o", tmp_path / "killed",
                     "--epochs", "3", *OPTIONS, ok=False)
    assert result.exit_code != 0 and json.loads((tmp_path / "killed" / "checkpoint.json").read_text())["loop"][
        "epoch"] == 1
    monkeypatch.undo()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = cli_run("-q", "finetune", "--resume", tmp_path / "killed")
    assert "best epoch" in result.output
    _same_weights(tmp_path / "whole", tmp_path / "killed")
    assert [float(r["train_loss"]) for r in _rows(tmp_path / "killed")] == pytest.approx(
        [h["train_loss"] for h in whole.history], rel=1e-5)  # metrics.csv keeps 6 digits
    meta = json.loads((tmp_path / "killed" / "config.json").read_text())
    assert meta["source"]["train"] == str(photo_folder) and meta["source"]["max_per_class"] == 7
    assert meta["n_train"] == 12 and meta["best_epoch"] == whole.best_epoch


def test_extend_a_finished_run_with_a_new_cycle(tmp_path, finished, shared_photo_folder, caplog):
    """epochs=4 on a 2-epoch run: its two epochs stay as they were, epochs 3-4 get a fresh warmup and cosine."""
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    before = _rows(run)
    with caplog.at_level(logging.WARNING):
        result = resume_run(run, epochs=4, progress=False)  # the data: the one recorded in config.json
    rows = _rows(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4] and rows[:2] == before
    lr = CONFIG.lr
    # cycle 1: 6 steps, warmup round(0.5 * 6 / 2) = 2; cycle 2: the same over epochs 3-4
    assert float(rows[1]["lr_head"]) == pytest.approx(lr * warmup_cosine(6, warmup=2, total=6), abs=1e-9)  # 0
    assert float(rows[2]["lr_head"]) == pytest.approx(lr * warmup_cosine(3, warmup=2, total=6), rel=1e-5)
    assert float(rows[3]["lr_head"]) == pytest.approx(0, abs=1e-9)
    meta = json.loads((run / "config.json").read_text())
    assert meta["config"]["epochs"] == 4 and [(c["first"], c["epochs"]) for c in meta["cycles"]] == [(1, 2), (3, 2)]
    keys = [(float(r["val_acc"]), -float(r["val_loss"])) for r in rows]
    assert result.best_epoch == meta["best_epoch"] == 1 + keys.index(max(keys))  # over all four epochs
    assert len(result.history) == 4
    noisy = [r for r in caplog.records if "validation set has only 2 images" in r.getMessage()]
    assert len(noisy) == 1 and meta["warnings"] == [noisy[0].getMessage()] == result.warnings


def test_a_killed_extension_resumes_exactly_from_the_cli(tmp_path, finished, cli_run, monkeypatch):
    """Extended to 5 epochs in one go, or killed in epoch 4 and resumed with --resume RUN alone: the same weights.
    The new cycle (9 steps) is longer than the first (6): the checkpoint must say which schedule it is in."""
    whole = Path(shutil.copytree(finished, tmp_path / "whole"))
    killed = Path(shutil.copytree(finished, tmp_path / "killed"))
    cli_run("-q", "finetune", "--resume", whole, "--epochs", "5")
    _kill_at_step(monkeypatch, 5)  # epoch 3: 3 steps; the second step of epoch 4
    assert cli_run("-q", "finetune", "--resume", killed, "--epochs", "5", ok=False).exit_code != 0
    assert json.loads((killed / "checkpoint.json").read_text())["loop"]["epoch"] == 3
    monkeypatch.undo()
    cli_run("-q", "finetune", "--resume", killed)  # the extension is recorded: epochs 5 is the run's now
    _same_weights(whole, killed)
    assert [r["train_loss"] for r in _rows(whole)] == [r["train_loss"] for r in _rows(killed)]


def test_the_best_epoch_can_stay_in_the_finished_part(tmp_path, photo_folder, monkeypatch):
    """An extension at a far too high lr (the head's logits blow up: label smoothing makes that costly) never beats
    the finished run's best epoch: model-best.safetensors and the results stay the finished run's, and a kill during
    the extension leaves them as they were."""
    config = FinetuneConfig(weights="package", image_size=32, batch_size=4, num_workers=0, epochs=2,
                            freeze_until="head", augment=False)  # lite0's ImageNet features: temple vs flower
    out = tmp_path / "run"
    done = finetune(open_dataset(photo_folder), out, config, progress=False)
    assert done.best_val_accuracy == 1.0  # both validation images right: only a lower val loss could beat it
    best = (out / "model-best.safetensors").read_bytes()
    meta = json.loads((out / "config.json").read_text())
    monkeypatch.setattr(ft, "_fit", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        resume_run(out, epochs=4, lr=10.0, progress=False)
    kept = json.loads((out / "config.json").read_text())
    assert {k: kept[k] for k in RESULTS} == {k: meta[k] for k in RESULTS}
    monkeypatch.undo()
    result = resume_run(out, epochs=4, lr=10.0, progress=False)
    rows = _rows(out)
    assert len(rows) == 4 and min(float(r["val_loss"]) for r in rows[2:]) > float(rows[done.best_epoch - 1][
        "val_loss"])
    assert result.best_epoch == done.best_epoch <= 2
    assert (out / "model-best.safetensors").read_bytes() == best
    after = json.loads((out / "config.json").read_text())
    assert after["best_epoch"] == meta["best_epoch"] and after["val"] == meta["val"]
    assert after["cycles"][1] == {"first": 3, "epochs": 2, "lr": 10.0, "warmup_epochs": 0.5}


@pytest.mark.parametrize(("args", "flag", "says"), [
    (["--epochs", "1"], "--epochs", "epochs: run has 2, now 1; a run can be extended"),
    (["--epochs", "4", "--image-size", "48"], "--image-size", "image_size: run has 32, now 48"),
    (["--lr", "0.01"], "--lr", "lr, warmup_epochs and early_stop may change only when extending it: epochs larger"),
    (["--seed", "3", "--epochs", "3"], "--seed", "seed: run has 0, now 3 (that would change what its trained"),
])
def test_settings_that_may_not_change_are_refused_naming_the_flag(tmp_path, finished, cli_run, args, flag, says):
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    result = cli_run("-q", "finetune", "--resume", run, *args, ok=False)
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"Error: Invalid value for '{flag}': cannot resume") and says in line, line
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_python_refusals_name_the_parameter(tmp_path, finished, shared_photo_folder):
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    with pytest.raises(RunMismatch) as err:
        resume_run(run, epochs=4, head="linear", progress=False)
    assert err.value.param == "head" and isinstance(err.value, DataError)
    with pytest.raises(ParameterError, match="'epoch' parameter is not a FinetuneConfig field") as err:
        resume_run(run, epoch=4)
    assert err.value.param == "epoch"
    (shared_photo_folder.parent / "fewer").mkdir()
    fewer = Path(shutil.copytree(shared_photo_folder, shared_photo_folder.parent / "fewer" / "photos"))
    (fewer / "temple" / "0.png").unlink()
    with pytest.raises(DataError, match=r"the data is not the run's \(data.n_train: run has 14, now 13"):
        resume_run(run, train=open_dataset(fewer), epochs=4, progress=False)
    meta = json.loads((run / "config.json").read_text())
    for bad in ("cosine", [{"first": 2, "epochs": 2, "lr": 0.003, "warmup_epochs": 0.5}], [{"first": 1}]):
        (run / "config.json").write_text(json.dumps({**meta, "cycles": bad}))
        with pytest.raises(DataError, match="config.json: field 'cycles' must"):
            resume_run(run, progress=False)
    meta["source"]["train"] = str(tmp_path / "moved")
    (run / "config.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"from its recorded data \(cannot open dataset .*moved.*give its data"):
        resume_run(run, progress=False)
    # a run written before runs recorded their data, cycles and names hash, and schedules their bounds
    for key in ("source", "cycles", "warnings"):
        del meta[key]
    del meta["data"]["names_sha256"]
    (run / "config.json").write_text(json.dumps(meta))
    checkpoint = json.loads((run / "checkpoint.json").read_text())
    checkpoint["scheduler"]["lr_lambdas"] = [{}]  # functools.partial: LambdaLR saved nothing of it
    (run / "checkpoint.json").write_text(json.dumps(checkpoint))
    with pytest.raises(DataError, match=r"does not record where its data is .*give its data \(DATA"):
        resume_run(run, progress=False)
    result = resume_run(run, train=open_dataset(shared_photo_folder), epochs=3, progress=False)  # checked: it fits
    assert len(result.history) == 3 and json.loads((run / "config.json").read_text())["cycles"][1]["first"] == 3


def test_cli_resume_with_per_class_needs_data(tmp_path, finished, cli_run):
    result = cli_run("-q", "finetune", "--resume", finished, "--per-class", "3", ok=False)
    assert result.exit_code == 2 and "--per-class applies to DATA" in result.output


def test_small_validation_warning_threshold():
    text = small_val_warning(30, given=False)
    assert "only 30 images" in text and "3.3 points" in text and "5.5 points" in text  # sqrt(0.09 / 30) = 5.48%
    assert "--val-fraction 0" in text and "k-fold" in text
    assert "no val set" in small_val_warning(30, given=True)
    assert small_val_warning(MIN_VAL_IMAGES - 1, given=False) is not None
    assert small_val_warning(MIN_VAL_IMAGES, given=False) is None
    assert small_val_warning(0, given=False) is None  # no validation set: nothing to be noisy
    assert math.isclose(100 * math.sqrt(0.9 * 0.1 / MIN_VAL_IMAGES), 3.0)


def test_no_warning_without_a_validation_set(tmp_path, shared_photo_folder, caplog):
    with caplog.at_level(logging.WARNING):
        result = finetune(open_dataset(shared_photo_folder), tmp_path / "run",
                          dataclasses.replace(CONFIG, epochs=1, val_fraction=0), progress=False)
    assert result.warnings == [] and not [r for r in caplog.records if "validation set" in r.getMessage()]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["warnings"] == []
