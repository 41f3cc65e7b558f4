"""Fine-tuning: stages, freezing (params and BatchNorm statistics), per-stage LRs, head init, runs on disk."""

from __future__ import annotations

import csv
import functools
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from transferkit.data.datasets import open_dataset
from transferkit.errors import ModelError, ParameterError, TransferkitError
from transferkit.finetune.config import FinetuneConfig
from transferkit.finetune.loop import (
    finetune,
    freeze_until,
    list_stages,
    lr_table,
    param_groups,
    replace_head,
    resolve_stage,
    set_train_mode,
    warmup_cosine,
)
from transferkit.finetune.rundir import load_finetuned

TINY = dict(model="test_resnet", weights="random", image_size=32, batch_size=4, num_workers=0, warmup_epochs=0.5)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run faster on one thread


@pytest.fixture()
def resnet_file(tmp_path: Path) -> Path:
    """A random test_resnet saved to disk, so a run's starting weights are known exactly."""
    torch.manual_seed(1)
    model = timm.create_model("test_resnet", pretrained=False)
    path = tmp_path / "start.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_stages_of_lite0(lite0):
    stages = list_stages(lite0)
    names = [s.name for s in stages]
    assert names == ["stem", *(f"blocks.{i}" for i in range(7)), "head"]
    assert [s.index for s in stages] == list(range(9))
    assert sum(s.n_params for s in stages) == sum(p.numel() for p in lite0.parameters())
    after_blocks = ("classifier", "conv_head", "bn2")  # the head: the classifier and what follows the last block
    assert stages[-1].n_params == sum(p.numel() for n, p in lite0.named_parameters() if n.startswith(after_blocks))


@pytest.mark.parametrize(
    ("name", "middle"), [("test_resnet", ["layer1", "layer2", "layer3", "layer4"]), ("test_convnext", ["stages.0"])]
)
def test_stages_of_tiny_models(name, middle):
    model = timm.create_model(name, pretrained=False)
    names = [s.name for s in list_stages(model)]
    assert names[0] == "stem" and names[-1] == "head"
    assert names[1 : 1 + len(middle)] == middle
    assert sum(s.n_params for s in list_stages(model)) == sum(p.numel() for p in model.parameters())


def test_resolve_stage(lite0):
    assert resolve_stage(lite0, "none") == 0
    assert resolve_stage(lite0, "head") == 8
    assert resolve_stage(lite0, "blocks.3") == 4
    assert resolve_stage(lite0, 5) == 5
    assert resolve_stage(lite0, "2") == 2
    with pytest.raises(ParameterError, match=r"^The 'freeze_until' parameter must be 'none', 'head', a stage index "
                       r"or a stage name: .* Got 'blocks.9' instead\.$") as err:
        resolve_stage(lite0, "blocks.9")
    assert "stem" in str(err.value) and "blocks.6" in str(err.value) and err.value.param == "freeze_until"
    with pytest.raises(ModelError):
        resolve_stage(lite0, 9)
    with pytest.raises(ParameterError, match="'pre_logits' is the head's pooled features, not a stage: 'head' trains"):
        resolve_stage(lite0, "pre_logits")


def test_freeze_until_sets_requires_grad_and_bn_modes():
    model = timm.create_model("test_resnet", pretrained=False)
    freeze_until(model, resolve_stage(model, "layer2"))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("conv1", "bn1", "layer1")) for n in frozen)
    set_train_mode(model, train_bn=False)
    assert not model.bn1.training and not model.layer1[0].bn1.training
    assert model.layer2[0].bn1.training and model.training
    set_train_mode(model, train_bn=True)
    assert model.bn1.training


def test_frozen_weights_and_bn_statistics_do_not_move(tmp_path, photo_folder, resnet_file, monkeypatch):
    """Frozen params and BN buffers stay bit-identical; frozen params never reach the optimizer."""
    made = []

    class Recording(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    start = load_file(str(resnet_file))
    config = FinetuneConfig(**{**TINY, "weights": str(resnet_file)}, freeze_until="layer2", epochs=1, layer_decay=None)
    result = finetune(open_dataset(photo_folder), tmp_path / "run", config, progress=False)
    state = result.model.state_dict()
    frozen_prefixes = ("conv1.", "bn1.", "layer1.")
    frozen = [k for k in start if k.startswith(frozen_prefixes)]
    assert any(k.endswith("running_mean") for k in frozen) and any(k.endswith("num_batches_tracked") for k in frozen)
    for key in frozen:
        assert torch.equal(state[key], start[key]), key
    assert not torch.equal(state["layer3.0.bn1.running_mean"], start["layer3.0.bn1.running_mean"])
    assert not torch.equal(state["layer3.0.conv1.weight"], start["layer3.0.conv1.weight"])
    (optimizer,) = made
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for name, p in result.model.named_parameters():
        assert (id(p) in in_groups) != name.startswith(frozen_prefixes), name
        if name.startswith(frozen_prefixes):
            assert p not in optimizer.state
        else:
            assert not torch.equal(p.detach(), start[name]), name


def test_layer_decay_groups_and_schedulers_keep_ratios():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    groups = param_groups(model, 1e-3, layer_decay=0.7)
    assert groups[0]["name"].startswith("stem/") and groups[-1]["name"].startswith("head/")
    layer_lrs = list(dict.fromkeys(g["lr"] for g in groups))
    assert all(a < b for a, b in zip(layer_lrs, layer_lrs[1:]))
    assert groups[-1]["lr"] == pytest.approx(1e-3)
    assert all(g["lr"] == pytest.approx(1e-3 * g["lr_scale"]) for g in groups)
    assert all(g["weight_decay"] == 0 for g in groups if g["name"].endswith("/no_decay"))
    assert all(p.ndim > 1 for g in groups if g["name"].endswith("/decay") for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    base = [g["lr"] for g in groups]
    schedule = functools.partial(warmup_cosine, warmup=2, total=10)
    for kind, factor in (("cosine", lambda t: 0.5 * (1 + math.cos(math.pi * t / 10))), ("lambda", schedule)):
        optimizer = torch.optim.AdamW(param_groups(model, 1e-3, layer_decay=0.7), lr=1.0)
        if kind == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
        else:
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        for t in range(1, 5):
            optimizer.step()
            scheduler.step()
            assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([b * factor(t) for b in base])


def test_lr_range_is_geometric_over_trainable_stages():
    model = timm.create_model("test_convnext", pretrained=False)
    freeze_until(model, 2)  # stem and stages.0 frozen
    groups = param_groups(model, 0.5, lr_range=(1e-5, 1e-3))
    by_stage = dict(zip(["stages.1", "stages.2", "stages.3", "head"], [1e-5, 10 ** -4.333333, 10 ** -3.666667, 1e-3]))
    assert {g["name"].split("/")[0] for g in groups} == set(by_stage)
    for g in groups:
        assert g["lr"] == pytest.approx(by_stage[g["name"].split("/")[0]], rel=1e-5)
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    assert frozen and not frozen & {id(p) for g in groups for p in g["params"]}
    assert "stages.1/decay" in lr_table(groups)
    single = param_groups(model, 0.5)
    assert {g["lr"] for g in single} == {0.5}
    with pytest.raises(ModelError):
        param_groups(model, 0.5, layer_decay=0.7, lr_range=(1e-5, 1e-3))


def test_replace_head_bias_is_log_prior():
    model = timm.create_model("test_resnet", pretrained=False)
    replace_head(model, 2, class_counts=np.array([90, 10]))
    assert model.get_classifier().out_features == 2
    probs = model.forward_head(torch.zeros(1, model.num_features, 1, 1)).softmax(-1)  # zero features
    torch.testing.assert_close(probs, torch.tensor([[0.9, 0.1]]))
    replace_head(model, 3)
    assert torch.equal(model.get_classifier().bias, torch.zeros(3))


def test_replace_head_mlp():
    model = timm.create_model("test_convnext", pretrained=False)
    replace_head(model, 4, class_counts=np.array([1, 1, 1, 5]), head="mlp", hidden=32, dropout=0.1)
    mlp = model.get_classifier()
    assert isinstance(mlp, nn.Sequential) and [type(m) for m in mlp] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert (mlp[0].in_features, mlp[0].out_features, mlp[3].out_features) == (model.num_features, 32, 4)
    torch.testing.assert_close(mlp[3].bias, torch.log(torch.tensor([1, 1, 1, 5]) / 8.0))
    assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
    assert list_stages(model)[-1].name == "head"
    with pytest.raises(ModelError, match="'linear', 'mlp'"):
        replace_head(model, 4, head="svm")


def test_finetune_end_to_end(tmp_path, photo_folder):
    out = tmp_path / "run"
    result = finetune(open_dataset(photo_folder), out, FinetuneConfig(**TINY, epochs=2), progress=False)
    for name in ("model-best.safetensors", "model-last.safetensors", "config.json", "metrics.csv"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and len(result.history) == 2
    assert 0 <= float(rows[0]["val_acc"]) <= 1 and float(rows[1]["lr_head"]) < float(rows[0]["lr_head"])
    assert result.best_epoch in (1, 2)
    model, meta = load_finetuned(out)
    assert meta["classes"] == ["flower", "temple"] and meta["config"]["model"] == "test_resnet"
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(model(x), result.model.eval()(x))


def test_nonfinite_loss_names_step_and_files_and_keeps_last_checkpoint(tmp_path, photo_folder, monkeypatch):
    out = tmp_path / "run"
    real = torch.nn.functional.cross_entropy
    calls, snapshot = [], {}

    def poisoned(*args, **kwargs):
        loss = real(*args, **kwargs)
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 4:  # 3 steps per epoch (14 images, batch 4): the first step of epoch 2
                snapshot["last"] = (out / "model-last.safetensors").read_bytes()
                return loss * float("nan")
        return loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)
    data = open_dataset(photo_folder)
    with pytest.raises(TransferkitError) as err:
        finetune(data, out, FinetuneConfig(**TINY, epochs=3), progress=False)
    message = str(err.value)
    assert "step 4" in message and "epoch 2" in message and "Lower lr or set clip_grad" in message
    assert any(src in message for src in data.sources)
    assert (out / "model-last.safetensors").read_bytes() == snapshot["last"]
    assert load_file(str(out / "model-last.safetensors"))  # a whole, readable checkpoint
    assert len(list(csv.DictReader((out / "metrics.csv").open()))) == 1
