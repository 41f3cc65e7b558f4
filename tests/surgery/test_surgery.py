"""FC -> conv surgery: parity with the original networks, dense maps with receptive fields (export: test_export.py).

Parity is checked in fp32 with torch.testing.assert_close on real weights (the packaged EfficientNet-Lite0,
probes fitted on real images) and on random weights where only structure matters (ResNet, VGG, ConvNeXt).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import timm
import torch
from click.testing import CliRunner
from torch import nn

from transferkit.cli import cli
from transferkit.errors import DataError, ModelError
from transferkit.surgery.dense import dense_predict, load_classifier, load_converted, save_converted
from transferkit.surgery.fc_to_conv import fc_to_conv
from transferkit.surgery.receptive_field import receptive_field

TOL = {"rtol": 1e-4, "atol": 1e-4}


def alexnet_style(n_classes: int = 10) -> nn.Sequential:
    """Conv/ReLU/MaxPool body, AlexNet's identity-at-training-size adaptive pool, then Flatten + FCs."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 5, stride=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(16, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d((6, 6)), nn.Flatten(),
        nn.Dropout(0.5), nn.Linear(32 * 6 * 6, 64), nn.ReLU(),
        nn.Dropout(0.5), nn.Linear(64, n_classes),
    ).eval()


def test_alexnet_style_parity_and_exact_sliding_windows():
    model = alexnet_style()  # 64x64 input -> 30 -> 14 -> 12 -> 6x6 before the FCs (AlexNet: 6x6 at 224)
    net = fc_to_conv(model, 64)
    x = torch.randn(2, 3, 64, 64)
    out = net(x)
    assert out.shape == (2, 10, 1, 1) and not net.mean_is_logits
    torch.testing.assert_close(out.flatten(1), model(x), **TOL)
    assert isinstance(net.head[-1], nn.Conv2d) and net.head[-3].kernel_size == (6, 6)  # fc6 -> 6x6 conv
    # larger input: every cell IS the original network on its receptive field, at the computed stride
    big = torch.randn(1, 3, 96, 128)
    scores, field = receptive_field(net, big)
    # r: 5, +2*2 (pool 3/2) = 9, +2*4 (conv 3) = 17, +1*4 (pool 2) = 21, +5*8 (fc6 6x6) = 61; jump 2*2*2 = 8.
    # The strides do not fit 64: the last 3 pixels of a 64x64 input are never seen.
    assert field.y.size == field.x.size == 61 and field.x.jump == 8 and scores.shape[-2:] == field.shape
    assert scores.shape[-2:] == ((96 - 61) // 8 + 1, (128 - 61) // 8 + 1)
    for i in range(scores.shape[-2]):
        for j in range(scores.shape[-1]):
            y0, x0, y1, x1 = (int(v) for v in field.boxes()[i, j])
            assert (y0, x0, y1 - y0 + 1, x1 - x0 + 1) == (8 * i, 8 * j, 61, 61)
            torch.testing.assert_close(scores[0, :, i, j], model(big[..., y0:y1 + 1, x0:x1 + 1])[0], **TOL)
            crop64 = big[..., 8 * i:8 * i + 64, 8 * j:8 * j + 64]  # the training-size window: same scores
            if crop64.shape[-2:] == (64, 64):
                torch.testing.assert_close(scores[0, :, i, j], model(crop64)[0], **TOL)


def test_lite0_parity_and_mean_of_map_on_any_size(lite0):
    net = fc_to_conv(lite0, 224)
    assert net.mean_is_logits and net.parity_error < 1e-4
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(net.logits(x), lite0(x), **TOL)
    odd = torch.randn(1, 3, 227, 301)  # non-square, odd: TF-SAME padding adapts, the mean still equals the net
    assert net(odd).shape[-2:] == (8, 10)
    torch.testing.assert_close(net.logits(odd), lite0(odd), **TOL)


@pytest.mark.parametrize("name, size, mean_is_logits", [
    ("resnet18", 224, True), ("vgg11", 224, True), ("convnext_atto", 224, False)])
def test_timm_families(name, size, mean_is_logits):
    """Random weights: conversion is structural. ConvNeXt's LayerNorm after the pool forces a window."""
    model = timm.create_model(name, pretrained=False).eval()
    net = fc_to_conv(model, size)
    assert net.mean_is_logits == mean_is_logits
    x = torch.randn(1, 3, size, size)
    torch.testing.assert_close(net.logits(x), model(x), **TOL)
    big = torch.randn(1, 3, size + 64, size + 96)
    if mean_is_logits:  # linear after a global average: holds at every size
        torch.testing.assert_close(net.logits(big), model(big), **TOL)
    else:  # one window per cell: (map - window + 1) cells, none equal to the global path in general
        assert net(big).shape[-2:] == (1 + 64 // 32, 1 + 96 // 32)


def test_window_form_of_lite0_matches_crops(lite0):
    """window=True: each cell is the original head on a 7x7 window of the map; at the training size, 1 cell."""
    net = fc_to_conv(lite0, 224, window=True)
    x = torch.randn(1, 3, 224, 224)
    assert net(x).shape[-2:] == (1, 1)
    torch.testing.assert_close(net(x).flatten(1), lite0(x), **TOL)
    assert net(torch.randn(1, 3, 288, 320)).shape[-2:] == (3, 4)


def test_china_full_resolution_dense_map(sample_images, lite0, tmp_path):
    """427x640: the averaged map's winner is among the original model's top-5 at 224."""
    import timm.data

    clf = load_classifier("tf_efficientnet_lite0", weights="package")
    path = tmp_path / "china.jpg"
    sample_images["china.jpg"].save(path)
    result = dense_predict(clf, path, tmp_path / "dense")
    assert result["image_size"] == [427, 640] and result["map_size"] == [14, 20]
    cfg = timm.data.resolve_model_data_config(lite0)
    x = timm.data.create_transform(**cfg)(sample_images["china.jpg"]).unsqueeze(0)
    top5 = lite0(x)[0].topk(5).indices.tolist()
    winner = clf.classes.index(result["top"][0]["label"])
    assert winner in top5, (result["top"], [clf.classes[k] for k in top5])
    with np.load(tmp_path / "dense" / "china.npz") as z:
        assert z["scores"].shape == (1000, 14, 20) and z["top_class"].shape == (14, 20)
        assert z["boxes"].shape == (14, 20, 4) and z["centres"].shape == (14, 20, 2)
        np.testing.assert_allclose(z["probabilities"].sum(0), 1, rtol=1e-5)
        # cells step by the network's stride (32) and the TF-SAME grid is centred by its padding
        assert np.allclose(np.diff(z["centres"][:, 0, 0]), 32) and np.allclose(np.diff(z["centres"][0, :, 1]), 32)
    assert (tmp_path / "dense" / "china-heatmap.png").stat().st_size > 10_000


def test_receptive_field_matches_gradients():
    """The computed box of a cell is exactly where its input gradient is non-zero (AlexNet-style net)."""
    net = fc_to_conv(alexnet_style(), 64)
    x = torch.randn(1, 3, 100, 120, requires_grad=True)
    with torch.no_grad():
        _, field = receptive_field(net, x)
    out = net(x)
    i, j = 1, 2
    out[0, :, i, j].sum().backward()
    rows, cols = np.nonzero(x.grad[0].abs().sum(0).numpy())
    assert [rows.min(), cols.min(), rows.max(), cols.max()] == field.boxes(clip=True)[i, j].int().tolist()


def test_receptive_field_arithmetic_same_and_valid():
    """Formulas against torch: SAME (TF, dynamic padding) and VALID convs, strides multiply."""
    from timm.layers import create_conv2d

    net = nn.Sequential(create_conv2d(3, 4, 3, stride=2, padding="same"), nn.Conv2d(4, 4, 3, stride=2)).eval()
    out, field = receptive_field(net, torch.randn(1, 3, 33, 33))
    # conv1: k3 s2 on 33 -> ceil(33/2) = 17, TF pads (17-1)*2+3-33 = 2 -> 1 left; conv2: (17-3)/2+1 = 8
    assert out.shape[-2:] == (8, 8) and field.x.jump == 4 and field.x.size == 3 + 2 * 2
    assert field.x.start == (0 + (3 - 1) / 2 - 1) + (3 - 1) / 2 * 2  # = 0 + 2: first cell centred on pixel 2


def test_probe_parity(tmp_path, photo_folder):
    """A probe on an earlier stage with a 2x2 grid, one on pre-logits, one on a stage outside timm's feature_info
    (blocks.3, read by a hook): mean map == SVM decision."""
    from transferkit.codes.extractor import FeatureExtractor
    from transferkit.jobs import extract_features, train_probe
    from transferkit.probe.linear import LinearProbe

    window = None
    for layer, pool in (("blocks.4", "2x2"), ("pre_logits", "avg"), ("blocks.6", "max"), ("blocks.3", "avg")):
        codes, probe_dir = tmp_path / f"codes-{layer}-{pool}", tmp_path / f"probe-{layer}-{pool}"
        extract_features(photo_folder, codes, weights="package", layer=layer, pool=pool, image_size=64,
                         precision="fp32", progress=False)  # parity is an fp32 claim
        train_probe(codes, probe_dir, cv=2)
        clf = load_classifier(probe_dir)
        probe = LinearProbe.load(probe_dir / "probe")
        extractor = FeatureExtractor("tf_efficientnet_lite0", weights="package", layer=layer, pool=pool,
                                     image_size=64, precision="fp32").fit()
        from transferkit.data.datasets import open_dataset

        data = open_dataset(photo_folder)
        want = probe.decision_function(extractor.transform(data))
        x = torch.stack([extractor.transform_(data.image(i)) for i in range(len(data))])
        with torch.no_grad():
            got = clf.net.logits(x).numpy()
        got = got[:, 1] if want.ndim == 1 else got  # binary: columns (-s, s)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"{layer} {pool}")
        assert clf.scores == "svm" and clf.net.mean_is_logits == (pool == "avg")
        window = clf if pool == "max" else window  # blocks.6|max: a global max pool, kept as a sliding window
    # the sliding-window probe exports too, and its file says its scores are SVM values (calibrated by the probe's
    # temperature) and its smallest input
    from transferkit.surgery.export import check_onnx, export_onnx

    done = export_onnx(window, tmp_path / "probe.onnx")
    meta = {p.key: p.value for p in onnx.load(done.path).metadata_props}
    assert (meta["scores"], json.loads(meta["min_input_size"])) == ("svm", [64, 64])
    assert meta["probabilities"] == window.probability_kind and "calibrated" in meta["probabilities"]
    assert json.loads(meta["temperature"]) == window.temperature > 0 and json.loads(meta["classes"]) == window.classes
    assert [r["map"] for r in check_onnx(window, done.path, [(1, 64, 64), (1, 97, 71)])] == [[1, 1], [3, 2]]

    from transferkit.surgery.summary import summarize_model

    table = summarize_model(str(probe_dir)).table()  # `summary` takes a probe: its backbone at its codes' size
    assert "probe" in table and f"{layer}|{pool}" in table and "input: 1x3x64x64" in table


def test_a_converted_probe_of_format_2_loads_on_the_same_layer(tmp_path, photo_folder):
    """Formats 1-2 stored a probe's layer as its index into timm's feature_info ('stage_index': 3 is blocks.4 of
    Lite0, which is stage 5); format 3 stores the name. The old file rebuilds the same network."""
    from transferkit.jobs import extract_features, train_probe

    extract_features(photo_folder, tmp_path / "codes", weights="package", layer="blocks.4", pool="2x2", image_size=64,
                     precision="fp32", progress=False)
    train_probe(tmp_path / "codes", tmp_path / "probe", cv=2)
    clf = load_classifier(tmp_path / "probe")
    save_converted(clf, tmp_path / "conv")
    file = tmp_path / "conv" / "convert.json"
    meta = json.loads(file.read_text())
    assert meta["format"] == "transferkit.convert/3" and meta["spec"]["layer"] == "blocks.4"
    spec = {k: v for k, v in meta["spec"].items() if k != "layer"}
    file.write_text(json.dumps({**meta, "format": "transferkit.convert/2", "spec": {**spec, "stage_index": 3}}))
    old = load_converted(tmp_path / "conv")
    assert old.net.trunk.layer.name == "blocks.4"
    x = torch.randn(1, 3, 80, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(old.net(x), clf.net(x))


def test_save_and_reload_without_source(tmp_path, lite0):
    clf = load_classifier("tf_efficientnet_lite0", weights="package")
    save_converted(clf, tmp_path / "conv")
    again = load_converted(tmp_path / "conv")
    x = torch.randn(1, 3, 160, 192)
    with torch.no_grad():
        torch.testing.assert_close(again.net(x), clf.net(x))
    assert again.classes == clf.classes and json.loads((tmp_path / "conv" / "convert.json").read_text())[
        "mean_is_logits"]


def test_clear_errors(tmp_path, sample_images):
    net = fc_to_conv(alexnet_style(), 64)
    with pytest.raises(ModelError, match="smaller than|too small"):
        net(torch.randn(1, 3, 40, 40))
    with pytest.raises(ModelError, match="too small"):
        fc_to_conv(alexnet_style(), 12)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=16).eval()
    with pytest.raises(ModelError, match="no head transferkit can convert"):
        fc_to_conv(vit, 64)
    bn_head = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 16), nn.BatchNorm1d(16),
                            nn.Linear(16, 3)).eval()
    with pytest.raises(ModelError, match="BatchNorm1d"):
        fc_to_conv(bn_head, 8)
    clf = load_classifier("tf_efficientnet_lite0", weights="package", window=True)
    tiny = tmp_path / "tiny.png"
    sample_images["flower.jpg"].resize((100, 90)).save(tiny)
    with pytest.raises(DataError, match="tiny.png"):
        dense_predict(clf, tiny)


def test_cli_convert_predict_dense(tmp_path, sample_images, cli_run):
    image = tmp_path / "flower.jpg"
    sample_images["flower.jpg"].save(image)
    conv = tmp_path / "conv"
    result = cli_run("convert", "tf_efficientnet_lite0", "--weights", "package", "-o", conv, catch=True)
    assert "every size" in result.output
    result = cli_run("predict", conv, image, "--dense", "-o", tmp_path / "d", "--json", catch=True)
    row = json.loads(result.output.strip().splitlines()[-1])
    assert row["map_size"] == [14, 20] and len(row["top"]) == 5 and row["mean_is_logits"]
    assert (tmp_path / "d" / "flower.npz").is_file() and (tmp_path / "d" / "flower-heatmap.png").is_file()
    # the converted directory's ONNX export: tests/surgery/test_export.py


def test_cli_predict_needs_dense_for_a_model_name(tmp_path, sample_images, cli_run):
    image = tmp_path / "x.jpg"
    sample_images["flower.jpg"].save(image)
    result = cli_run("predict", "tf_efficientnet_lite0", image, ok=False, catch=True)
    assert result.exit_code != 0 and "--dense" in result.output


def test_convert_keeps_receptive_field_path_for_strided_odd_inputs():
    """Odd sizes: SAME padding grows the grid to ceil(W/32); centres stay 32 px apart (strides 'fit')."""
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    net = fc_to_conv(model, 224)
    _, field = receptive_field(net, torch.randn(1, 3, 225, 97))
    assert field.shape == (8, 4) and field.x.jump == field.y.jump == 32


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_finetuned_run_converts(tmp_path, photo_folder, head):
    """A transferkit fine-tuning run (real photos, packaged weights): the converted net equals the run's model."""
    from transferkit.data.datasets import open_dataset
    from transferkit.finetune.config import FinetuneConfig
    from transferkit.finetune.loop import finetune
    from transferkit.finetune.rundir import load_finetuned

    config = FinetuneConfig(weights="package", image_size=64, epochs=1, batch_size=8, freeze_until="head",
                            augment=False, head=head, val_fraction=0.25)
    finetune(open_dataset(photo_folder), tmp_path / "run", config, progress=False)
    clf = load_classifier(tmp_path / "run")
    model, _ = load_finetuned(tmp_path / "run")
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(clf.net.logits(x), model(x), **TOL)
    assert clf.classes == ["flower", "temple"] and clf.net.mean_is_logits == (head == "linear")


def test_cli_convert_takes_image_size_and_the_old_input_size(tmp_path):
    """`convert --image-size` as every other command says it; `--input-size` still works, hidden, with one warning."""
    runner = CliRunner()
    args = ["convert", "test_resnet", "--weights", "random"]
    result = runner.invoke(cli, [*args, "--image-size", "64", "-o", str(tmp_path / "new")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "trained at 64x64" in result.output and "deprecated" not in result.output
    old = runner.invoke(cli, [*args, "--input-size", "64", "-o", str(tmp_path / "old")], catch_exceptions=False)
    assert old.exit_code == 0, old.output
    assert "trained at 64x64" in old.output
    assert old.stderr.count("deprecated") == 1 and "use --image-size" in old.stderr
    both = runner.invoke(cli, [*args, "--input-size", "64", "--image-size", "64", "-o", str(tmp_path / "both")])
    assert both.exit_code == 2 and "give only --image-size" in both.output and not (tmp_path / "both").exists()
    help_text = runner.invoke(cli, ["convert", "--help"]).output
    assert "--image-size" in help_text and "--input-size" not in help_text
