"""LocallyConnected2d against a loop over output locations (forward and backward), what sharing saves, --head local."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import timm
import timm.data
import torch
from torch import nn
from torch.nn import functional as F

from transferkit.errors import ModelError
from transferkit.models.backbones import create_backbone
from transferkit.models.locally_connected import LocallyConnected2d, shared_vs_unshared_params
from transferkit.models.stages import replace_head

DOCS = Path(__file__).resolve().parents[2] / "docs" / "surgery.md"

# (in_channels, out_channels, kernel_size, input_size, stride, padding, bias)
CONFIGS = [
    (3, 4, 3, (8, 8), 1, 0, True),
    (3, 5, 3, (9, 9), 2, 1, True),  # stride 2, padding 1, odd size
    (1, 3, (3, 2), (7, 10), (2, 1), (1, 0), False),  # non-square everything, no bias
    (6, 2, 4, (10, 7), 2, 1, True),
    (3, 20, 8, (32, 32), 2, 1, True),  # the seed example: 14x14 locations
]


def photos(sample_images, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """(2, channels, H, W): china.jpg and flower.jpg resized, in [-1, 1]; channels 3-5 are the mirrored photo."""
    h, w = size
    x = np.stack([np.asarray(img.resize((w, h)), np.float32) / 127.5 - 1 for img in sample_images.values()])
    x = torch.from_numpy(x).permute(0, 3, 1, 2)  # (2, H, W, 3) -> (2, 3, H, W)
    return torch.cat([x, x.flip(-1)], 1)[:, :channels].contiguous()


def reference(x, weight, bias, kernel, stride, padding, out_size) -> torch.Tensor:
    """Each output location: its input patch dotted with its own filters, plus its own bias."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    xp = F.pad(x, (pw, pw, ph, ph))
    rows = []
    for i in range(out_size[0]):
        cells = []
        for j in range(out_size[1]):
            patch = xp[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw].reshape(len(x), -1)  # (B, C*kh*kw)
            y = patch @ weight[i * out_size[1] + j].T  # (B, out)
            cells.append(y if bias is None else y + bias[:, i, j])
        rows.append(torch.stack(cells, -1))  # (B, out, ow)
    return torch.stack(rows, -2)  # (B, out, oh, ow)


def _config_id(c) -> str:
    size = "x".join(map(str, c[3]))
    return "-".join([f"in{c[0]}", size, f"k{c[2]}", f"s{c[4]}", f"p{c[5]}", "bias" if c[6] else "nobias"])


@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_forward_and_gradients_match_per_location_loop(config, sample_images):
    in_ch, out_ch, kernel, size, stride, padding, bias = config
    torch.manual_seed(0)
    layer = LocallyConnected2d(in_ch, out_ch, kernel, size, stride=stride, padding=padding, bias=bias)
    x = photos(sample_images, in_ch, size).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    w_ref = layer.weight.detach().clone().requires_grad_()
    b_ref = None if layer.bias is None else layer.bias.detach().clone().requires_grad_()
    out = layer(x)
    ref = reference(x_ref, w_ref, b_ref, layer.kernel_size, layer.stride, layer.padding, layer.output_size)
    conv_shape = F.conv2d(x.detach(), torch.zeros(out_ch, in_ch, *layer.kernel_size), stride=stride,
                          padding=padding).shape
    assert out.shape == ref.shape == conv_shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    ref.backward(upstream)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.weight.grad, w_ref.grad, atol=1e-5, rtol=1e-5)
    if bias:
        torch.testing.assert_close(layer.bias.grad, b_ref.grad, atol=1e-5, rtol=1e-5)
    assert x.grad.abs().sum() > 0 and layer.weight.grad.abs().sum() > 0


def test_equal_filters_everywhere_is_conv2d(sample_images):
    """Parameter sharing is the special case: the same filter bank at every location gives nn.Conv2d."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 20, 8, stride=2, padding=1)
    layer = LocallyConnected2d(3, 20, 8, 32, stride=2, padding=1)
    with torch.no_grad():
        layer.weight.copy_(conv.weight.flatten(1).expand_as(layer.weight))  # (20, 192) at all 196 locations
        layer.bias.copy_(conv.bias[:, None, None].expand_as(layer.bias))
    x = photos(sample_images, 3, (32, 32))
    torch.testing.assert_close(layer(x), conv(x), atol=1e-5, rtol=1e-5)


def test_parameter_counts_of_the_seed_example():
    """32x32x3 input, 20 filters 8x8, stride 2, padding 1: 14x14 outputs, 3,860 shared vs 756,560 unshared."""
    counts = shared_vs_unshared_params(3, 20, 8, (32, 32), stride=2, padding=1)
    assert counts == (3_860, 756_560, (14, 14))
    assert counts.shared == sum(p.numel() for p in nn.Conv2d(3, 20, 8, stride=2, padding=1).parameters())
    assert counts.unshared == sum(p.numel() for p in LocallyConnected2d(3, 20, 8, 32, 2, 1).parameters())
    no_bias = shared_vs_unshared_params(3, 20, 8, 32, 2, 1, bias=False)
    assert no_bias == (3_840, 752_640, (14, 14))
    assert no_bias.unshared == LocallyConnected2d(3, 20, 8, 32, 2, 1, bias=False).weight.numel()
    text = DOCS.read_text()
    assert "3,860" in text and "756,560" in text


def test_init_is_conv2d_default_per_location():
    torch.manual_seed(0)
    layer = LocallyConnected2d(3, 20, 8, 32, stride=2, padding=1)
    bound = 1 / np.sqrt(3 * 8 * 8)  # nn.Conv2d: kaiming_uniform(a=sqrt(5)) -> U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
    assert abs(layer.weight.std().item() - bound / np.sqrt(3)) < 0.01 * bound  # 752,640 draws
    assert abs(nn.Conv2d(3, 20, 8).weight.abs().max().item() - bound) < 0.05 * bound


def test_errors_name_the_parameter():
    layer = LocallyConnected2d(3, 4, 3, (8, 10), padding=1)
    assert "input_size=(8, 10)" in repr(layer) and "output_size=(8, 10)" in repr(layer)
    with pytest.raises(ModelError, match=r"built for inputs of shape \(B, 3, 8, 10\).*\(1, 3, 10, 8\)"):
        layer(torch.zeros(1, 3, 10, 8))
    with pytest.raises(ModelError, match="'stride' parameter .* Got 0"):
        LocallyConnected2d(3, 4, 3, 8, stride=0)
    with pytest.raises(ModelError, match="'kernel_size' parameter .* Got \\(3, 3, 3\\)"):
        LocallyConnected2d(3, 4, (3, 3, 3), 8)
    with pytest.raises(ModelError, match="does not fit its 'input_size'"):
        LocallyConnected2d(3, 4, 5, 3)


def _head_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.get_classifier().parameters())


def test_local_head_on_lite0_parameter_counts_and_fixed_size(sample_images):
    """224x224 -> a 7x7x1280 map: each of the 49 cells has its own 32 filters of 3x3x1280."""
    model = create_backbone("tf_efficientnet_lite0", weights="package")
    replace_head(model, 10, class_counts=np.arange(1, 11), head="local", image_size=224)
    head = model.get_classifier()
    assert [type(m) for m in head] == [LocallyConnected2d, nn.ReLU, nn.Flatten, nn.Linear]
    assert isinstance(model.global_pool, nn.Identity) and head[0].input_size == (7, 7)
    counts = shared_vs_unshared_params(1280, 32, 3, 7, padding=1)
    linear = 32 * 7 * 7 * 10 + 10
    assert _head_params(model) == counts.unshared + linear == 18_080_618
    assert counts.shared + linear == 384_362  # the same head with one shared 3x3 conv
    text = DOCS.read_text()
    for number in ("18,080,618", "384,362", "12,810"):
        assert number in text, number
    torch.testing.assert_close(head[3].bias, torch.log(torch.arange(1.0, 11.0) / 55))
    x = photos(sample_images, 3, (224, 224))
    with torch.no_grad():
        logits = model.eval()(x)
        assert logits.shape == (2, 10)
        torch.testing.assert_close(logits, head(model.forward_features(x)))  # the map reaches it unpooled
        with pytest.raises(ModelError, match=r"built for inputs of shape \(B, 1280, 7, 7\)"):
            model(photos(sample_images, 3, (256, 256)))  # an 8x8 map: no filters for the extra cells


def test_local_head_default_size_and_unsupported_models():
    model = timm.create_model("test_resnet", pretrained=False)
    replace_head(model, 3, head="local")  # pretrained input size
    size = timm.data.resolve_model_data_config(model)["input_size"][-1]
    assert model.eval()(torch.zeros(1, 3, size, size)).shape == (1, 3)
    mobile = timm.create_model("mobilenetv3_small_050", pretrained=False).eval()
    x = torch.zeros(1, 3, 64, 64)
    with pytest.raises(ModelError, match="does not reach the classifier unpooled"):
        replace_head(mobile, 3, head="local", image_size=64)  # its conv_head and flatten come after the pool
    assert mobile(x).shape == (1, 3)  # the pooled head was put back
    with pytest.raises(ModelError, match="'head' parameter 'local' needs a timm CNN"):
        replace_head(timm.create_model("test_vit", pretrained=False), 3, head="local")
    with pytest.raises(ModelError, match="'image_size' parameter"):
        replace_head(timm.create_model("test_resnet", pretrained=False), 3, head="local", image_size=0)


def test_finetune_local_head_reloads_predicts_and_summarises(tmp_path, photo_folder, sample_images, cli_run):
    """Frozen packaged lite0 + local head on real photo crops; the run reloads to the same logits."""
    from transferkit.data.datasets import open_dataset
    from transferkit.finetune.config import FinetuneConfig
    from transferkit.finetune.loop import finetune
    from transferkit.finetune.rundir import load_finetuned
    from transferkit.jobs import predict_images

    config = FinetuneConfig(model="tf_efficientnet_lite0", weights="package", head="local", freeze_until="head",
                            image_size=64, epochs=2, batch_size=8, augment=False, lr=1e-3)
    result = finetune(open_dataset(photo_folder), tmp_path / "run", config, progress=False)
    assert result.cached  # frozen backbone, no augmentation: trained on cached 2x2x1280 maps
    assert all(np.isfinite(r["train_loss"]) for r in result.history)
    model, meta = load_finetuned(tmp_path / "run")
    assert meta["config"]["head"] == "local" and model.get_classifier()[0].input_size == (2, 2)
    x = photos(sample_images, 3, (64, 64)).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(model(x), result.model.eval()(x), atol=1e-6, rtol=1e-6)
    rows = predict_images(tmp_path / "run", [photo_folder])
    assert len(rows) == 16 and {r["label"] for r in rows} <= {"flower", "temple"}
    out = cli_run("summary", tmp_path / "run")
    local_row = next(line for line in out.output.splitlines() if "LocallyConnected2d" in line)
    assert re.search(r"1x32x2x2\s+1,474,688\s+0\s+1,474,560", local_row), local_row  # 4 x 32 x 11,520 MACs
    assert "frozen until head" in out.output and "input: 1x3x64x64" in out.output
