"""The fine-tuning recipe's options: an EMA of the weights, mixup/cutmix, LP-FT (head from a fitted probe)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from transferkit.data.datasets import open_dataset
from transferkit.errors import ParameterError
from transferkit.finetune.config import FinetuneConfig, build_model
from transferkit.finetune.head_init import init_head_from_probe, pre_logits
from transferkit.finetune.loaders import eval_loader, split_train_val
from transferkit.finetune.loop import finetune, training_loss
from transferkit.finetune.mixing import make_mixup, mix

LITE0 = dict(weights="package", image_size=32, batch_size=4, num_workers=0)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run faster on one thread


def _val_loss(model: torch.nn.Module, val, config: FinetuneConfig) -> float:
    """Mean validation loss of `model`, as the loop computes it."""
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y, _, _ in eval_loader(model, val, config):
            total += training_loss(model(x).float(), y, config, None).item() * len(y)
            n += len(y)
    return total / n


def test_ema_weights_are_validated_and_saved(tmp_path, photo_folder):
    data = open_dataset(photo_folder)
    config = FinetuneConfig(**LITE0, epochs=2, freeze_until="blocks.5", ema_decay=0.9, val_fraction=0.25)
    result = finetune(data, tmp_path / "run", config, progress=False)
    saved = load_file(str(tmp_path / "run" / "model-last.safetensors"))
    checkpoint = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    tensors = load_file(str(tmp_path / "run" / checkpoint["tensors"]))
    raw = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    assert ema.keys() == raw.keys() == saved.keys()
    assert all(torch.equal(saved[k], ema[k]) for k in saved)  # the file holds the average ...
    trained = [k for k in raw if k.startswith(("blocks.6", "conv_head", "classifier")) and raw[k].is_floating_point()]
    assert trained and all(not torch.equal(raw[k], ema[k]) for k in trained)  # ... which is not the last step
    frozen = [k for k in raw if k.startswith("blocks.0") and "running" not in k]
    assert all(torch.equal(raw[k], ema[k]) for k in frozen)

    _, val = split_train_val(data, None, config)  # the run's hold-out: its val loss is the average's
    model = build_model(config, data.classes, data.class_counts())
    model.load_state_dict(ema)
    assert _val_loss(model, val, config) == pytest.approx(result.history[-1]["val_loss"], rel=1e-4)
    model.load_state_dict(raw)
    assert _val_loss(model, val, config) != pytest.approx(result.history[-1]["val_loss"], rel=1e-3)


def test_mixup_targets_are_soft_and_sum_to_one(photo_folder, lite0):
    data = open_dataset(photo_folder)
    config = FinetuneConfig(**LITE0, mixup=0.4, cutmix=1.0)
    x, y, _, _ = next(iter(eval_loader(lite0, data, config)))  # 16 real photo crops, 2 classes
    x, y = x[:7], torch.cat([y[:3], y[-4:]])  # an odd batch with both classes
    mixup = make_mixup(config, 2, multilabel=False)
    plain = x.clone()
    np.random.seed(0)
    mixed, target = mix(mixup, x, y)
    assert target.shape == (7, 2)
    torch.testing.assert_close(target.sum(1), torch.ones(7))
    assert ((target[:6] > 0) & (target[:6] < 1)).any()  # images of both classes were blended
    assert torch.equal(target[6], torch.nn.functional.one_hot(y[6], 2).float())  # the odd one out stays as it was
    assert not torch.equal(mixed[:6], plain[:6]) and torch.equal(mixed[6], plain[6])
    loss = training_loss(torch.zeros(7, 2), target, config, None, multilabel=False)
    assert loss.item() == pytest.approx(np.log(2), rel=1e-5)  # soft targets, uniform prediction
    assert make_mixup(FinetuneConfig(), 2, multilabel=False) is None


def test_lpft_head_predicts_as_the_fitted_probe(photo_folder):
    data = open_dataset(photo_folder)
    config = FinetuneConfig(**LITE0, head_init="probe")
    model = build_model(config, data.classes, data.class_counts())
    info = init_head_from_probe(model, data, config, torch.device("cpu"))
    assert info["n"] == len(data) and info["C"] in (0.01, 0.1, 1.0)
    codes, targets = pre_logits(model, data, config, torch.device("cpu"))
    head = model.get_classifier()
    with torch.no_grad():
        predicted = head(torch.from_numpy(codes)).argmax(1).numpy()
    assert (predicted == targets).mean() == pytest.approx(info["train_accuracy"])  # scaling folded in exactly
    assert info["train_accuracy"] > 0.9  # temple vs flower crops: the frozen codes separate them


@pytest.mark.parametrize(("setting", "value"), [("ema_decay", 1.0), ("ema_decay", 0.0), ("mixup", -0.1),
                                                 ("cutmix", -1.0), ("head_init", "lp-ft")])
def test_bad_values_are_refused_naming_the_parameter(setting, value):
    with pytest.raises(ParameterError, match=f"The '{setting}' parameter of FinetuneConfig") as err:
        FinetuneConfig(**{setting: value}).validate()
    assert err.value.param == setting


@pytest.mark.parametrize(("args", "flag"), [(("--ema-decay", "1.5"), "--ema-decay"), (("--mixup", "-1"), "--mixup"),
                                            (("--cutmix", "x"), "--cutmix"), (("--head-init", "lp"), "--head-init")])
def test_cli_refuses_bad_values_naming_the_flag(tmp_path, photo_folder, cli_run, args, flag):
    result = cli_run("finetune", photo_folder, "-o", tmp_path / "run", *args, ok=False)
    assert result.exit_code == 2 and flag in result.output
    assert not (tmp_path / "run").exists()


def test_probe_head_needs_a_linear_head(tmp_path, photo_folder, cli_run):
    result = cli_run("finetune", photo_folder, "-o", tmp_path / "run", "--image-size", "32", "--weights", "package",
                     "--head", "mlp", "--head-init", "probe", ok=False)
    assert result.exit_code != 0 and "--head-init" in result.output and "linear" in result.output
