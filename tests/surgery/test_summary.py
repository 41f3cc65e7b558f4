"""Output-size arithmetic against real convolutions, layer summaries against published MAC counts, the CLI."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import timm
import torch
from timm.layers import Conv2dSame, create_conv2d
from timm.layers.padding import get_same_padding
from torch import nn
from torch.nn import functional as F

from transferkit.errors import ModelError, ParameterError
from transferkit.models.locally_connected import LocallyConnected2d
from transferkit.surgery.summary import conv_output_size, same_output_size, same_padding, summarize


def test_conv_output_size_matches_nn_conv2d_and_pooling():
    """floor((W - F + 2P) / S) + 1 against nn.Conv2d over a grid, non-square inputs, with dilation."""
    checked = refused = 0
    for (h, w), k, s, p, d in itertools.product([(5, 8), (7, 7), (12, 9), (16, 13)], (1, 2, 3, 5, 7), (1, 2, 3),
                                                (0, 1, 2, 3), (1, 2)):
        span = d * (k - 1) + 1
        if min(h, w) + 2 * p < span:
            with pytest.raises(ModelError, match="does not fit"):
                conv_output_size(min(h, w), k, s, p, d)
            refused += 1
            continue
        out = nn.Conv2d(1, 1, k, stride=s, padding=p, dilation=d)(torch.zeros(1, 1, h, w))
        assert out.shape[-2:] == (conv_output_size(h, k, s, p, d), conv_output_size(w, k, s, p, d)), (h, w, k, s, p, d)
        if d == 1 and p <= k // 2:  # pooling shares the arithmetic (torch allows padding <= kernel / 2)
            pooled = nn.MaxPool2d(k, stride=s, padding=p)(torch.zeros(1, 1, h, w))
            assert pooled.shape[-2:] == out.shape[-2:]
        checked += 1
    assert checked > 400 and refused > 10
    assert conv_output_size(32, 8, 2, 1) == 14 and conv_output_size(227, 11, 4) == 55  # seed example; AlexNet conv1
    with pytest.raises(ModelError, match="'stride' parameter must be an integer >= 1. Got 0"):
        conv_output_size(8, 3, stride=0)


@pytest.mark.parametrize("size", [7, 8, 15, 16, 31, 32, 224, 225])
def test_same_output_size_matches_timm_conv2d_same(size):
    """TF SAME = ceil(W / S) on odd and even sizes, and the padding split timm's Conv2dSame applies."""
    from sklearn.datasets import load_digits

    digit = torch.from_numpy(load_digits().images[3]).float()[None, None] / 16  # a real 8x8 scan
    x = F.interpolate(digit, size=(size, size + 1), mode="bilinear", align_corners=False)
    for kernel in (1, 3, 5):
        torch.manual_seed(kernel)
        conv = create_conv2d(1, 2, kernel, stride=2, padding="same")
        assert isinstance(conv, Conv2dSame)  # stride 2: the padding depends on the input size
        out = conv(x)
        assert out.shape[-2:] == (same_output_size(size, 2), same_output_size(size + 1, 2))
        (top, bottom), (left, right) = same_padding(size, kernel, 2), same_padding(size + 1, kernel, 2)
        assert top + bottom == get_same_padding(size, kernel, 2, 1) and bottom - top in (0, 1)
        manual = F.conv2d(F.pad(x, (left, right, top, bottom)), conv.weight, conv.bias, stride=2)
        torch.testing.assert_close(out, manual)
        # stride 2, odd kernel F: SAME keeps (F - 1) / 2 more cells than VALID, on odd and even sizes
        assert same_output_size(size, 2) - conv_output_size(size, kernel, 2) == (kernel - 1) // 2
    assert same_output_size(size, 1) == size


def test_summary_of_lite0_matches_published_macs(lite0):
    """Lite0 is EfficientNet-B0 without squeeze-excitation: B0's published 0.39 G multiply-adds, less a little."""
    s = summarize(lite0, 224)
    assert s.total_params == sum(p.numel() for p in lite0.parameters()) == 4_652_008
    assert sum(r.trainable + r.frozen for r in s.rows) == s.total_params  # every parameter in exactly one row
    assert s.macs == 385_187_552 and abs(s.macs / 0.39e9 - 1) < 0.02  # within 4% of timm's "0.40", see docs
    stem = s.rows[0]
    assert (stem.name, stem.kind, stem.output_shape) == ("conv_stem", "Conv2dSame", (1, 32, 112, 112))
    assert stem.macs == 112 * 112 * 32 * 3 * 3 * 3
    last = s.rows[-1]
    assert (last.name, last.kind, last.macs) == ("classifier", "Linear", 1280 * 1000)
    assert s.flops == 2 * s.macs and f"({s.macs / 1e9:.3f} G)" in s.table().splitlines()[-1]
    assert lite0.training is False


@pytest.mark.parametrize(("name", "gmacs", "params"), [("resnet18", 1.82, 11_689_512),  # timm, torchvision
                                                      ("efficientnet_b0", 0.39, 5_288_548)])  # Tan & Le 2019
def test_summary_matches_published_macs(name, gmacs, params):
    s = summarize(timm.create_model(name, pretrained=False), 224)
    assert abs(s.macs / (gmacs * 1e9) - 1) < 0.015, s.macs
    assert s.total_params == params


def test_summary_of_resnet18_and_frozen_counts():
    model = timm.create_model("resnet18", pretrained=False)
    for p in model.layer1.parameters():
        p.requires_grad = False
    s = summarize(model, (224, 224))
    frozen = sum(p.numel() for p in model.layer1.parameters())
    assert s.total_params - s.trainable_params == frozen == sum(r.frozen for r in s.rows)
    shape = {r.name: r.output_shape for r in s.rows}
    assert shape["maxpool"] == (1, 64, 56, 56) and shape["layer4.1.bn2"] == (1, 512, 7, 7)
    assert summarize(model, (160, 224)).rows[-2].output_shape == (1, 512)  # global pool: any size


def test_macs_of_locally_connected_and_grouped_convs():
    net = nn.Sequential(LocallyConnected2d(3, 20, 8, 32, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(20 * 14 * 14, 10))
    s = summarize(net, 32)
    assert [r.macs for r in s.rows] == [20 * 14 * 14 * 3 * 8 * 8, 0, 0, 3920 * 10]
    assert s.rows[0].trainable == 756_560
    depthwise = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 16, 1))
    d = summarize(depthwise, (10, 6))
    assert [r.macs for r in d.rows] == [8 * 10 * 6 * 9, 16 * 10 * 6 * 8]


def test_too_small_image_names_image_size():
    alexnet_like = nn.Sequential(nn.Conv2d(3, 8, 11, stride=4), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(8, 16, 5))
    assert summarize(alexnet_like, 67).rows[-1].output_shape == (1, 16, 3, 3)
    with pytest.raises(ParameterError, match=r"^The 'image_size' parameter 31 x 31 does not fit Sequential: "
                       r"layer '3' failed: .*kernel 5.*Try a larger size\.$") as err:
        summarize(alexnet_like, 31)  # 31 -> 6 -> 2: no room for the 5x5 conv
    assert err.value.param == "image_size" and "--" not in str(err.value)


def test_cli_summary(cli_run):
    assert "Usage:" in cli_run("summary", "--help").output
    out = cli_run("summary", "tf_efficientnet_lite0", "--image-size", "224").output
    assert "weights: random" in out and "blocks.6.0.conv_pwl" in out
    assert "params: 4,652,008 total, 4,652,008 trainable, 0 frozen" in out
    macs = int(out.split("MACs: ")[-1].split(" ")[0].replace(",", ""))
    assert macs == 385_187_552 and "(0.385 G)" in out and "FLOPs (2 x MACs): 770,375,104" in out
    wide = cli_run("summary", "tf_efficientnet_lite0", "--image-size", "160x224").output
    assert "1x1280x5x7" in wide and "input: 1x3x160x224" in wide
    bad = cli_run("summary", "inception_v3", "--image-size", "16", ok=False)
    assert bad.exit_code == 1 and bad.output.startswith(
        "Error: Invalid value for '--image-size': 16 x 16 does not fit inception_v3: ")
    assert bad.output.rstrip().endswith("Try a larger size.") and len(bad.output.strip().splitlines()) == 1
    assert cli_run("summary", "resnet_18", ok=False).exit_code == 1


def test_summary_rows_follow_execution_order():
    s = summarize(timm.create_model("test_resnet", pretrained=False), 32)
    names = [r.name for r in s.rows]
    assert names.index("conv1.0") < names.index("bn1") < names.index("layer1.0.conv1") < names.index("fc")
    assert np.all([r.output_shape is not None for r in s.rows])
