"""Backbones and weights: the packaged ImageNet weights are real, resolution is offline-first and loud."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from transferkit.errors import ModelError, ParameterError, WeightsError
from transferkit.models.backbones import create_backbone
from transferkit.models.weights import PACKAGED_WEIGHTS, packaged_weights_file, resolve_weights

BUILDINGS = {698: "palace", 442: "bell cote", 663: "monastery", 538: "dome", 497: "church"}
DAISY = 985


def _top5(model, img) -> list[int]:
    cfg = timm.data.resolve_model_data_config(model)
    x = timm.data.create_transform(**cfg)(img).unsqueeze(0)
    with torch.inference_mode():
        return model(x).softmax(-1).topk(5).indices[0].tolist()


def test_packaged_weights_are_imagenet(lite0, sample_images):
    assert lite0.weights_info.source == "package"
    assert _top5(lite0, sample_images["flower.jpg"]).count(DAISY) == 1
    assert set(_top5(lite0, sample_images["china.jpg"])) & set(BUILDINGS)


def test_packaged_weights_use_their_own_normalisation(lite0):
    cfg = timm.data.resolve_model_data_config(lite0)
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)


def test_checksum_is_stable_and_tracks_content(lite0, tmp_path):
    again = create_backbone()
    assert again.weights_info.sha256 == lite0.weights_info.sha256
    state = {k: v.clone() for k, v in lite0.state_dict().items()}
    state["classifier.bias"] += 1.0
    save_file(state, str(tmp_path / "w.safetensors"))
    changed = create_backbone(weights=str(tmp_path / "w.safetensors"))
    assert changed.weights_info.source == "file"
    assert changed.weights_info.sha256 != lite0.weights_info.sha256


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_round_trip(lite0, tmp_path, suffix):
    path = tmp_path / f"lite0{suffix}"
    state = {k: v.contiguous() for k, v in lite0.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    model = create_backbone(weights=str(path))
    assert model.weights_info.sha256 == lite0.weights_info.sha256
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), lite0(x))


def test_weights_that_do_not_fit_name_the_file(tmp_path):
    other = timm.create_model("test_resnet", pretrained=False)
    path = tmp_path / "resnet.safetensors"
    save_file(other.state_dict(), str(path))
    with pytest.raises(WeightsError, match="resnet.safetensors.*do not match"):
        create_backbone(weights=str(path))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": object()}, path)
    with pytest.raises(WeightsError, match="evil.pth"):
        create_backbone(weights=str(path))


def test_missing_weights_file():
    with pytest.raises(WeightsError, match="nope.safetensors' does not exist"):
        resolve_weights("tf_efficientnet_lite0", "nope.safetensors")


def test_unknown_model_suggests_names():
    with pytest.raises(ModelError, match="unknown model 'resnet_18'.*resnet18"):
        create_backbone("resnet_18")


def test_no_weights_lists_what_was_tried():
    # HF_HUB_OFFLINE=1 (conftest): the real hub path runs and fails fast.
    with pytest.raises(WeightsError) as info:
        create_backbone("test_resnet")
    msg = str(info.value)
    assert "no package ships weights for 'test_resnet'" in msg
    assert "timm hub download failed" in msg
    assert "Set the 'weights' parameter to a file, or to 'random'" in msg and "--" not in msg


def test_random_weights_only_on_request():
    model = create_backbone("test_resnet", weights="random")
    assert model.weights_info.source == "random"
    with pytest.raises(ParameterError, match="^The 'weights' parameter must be a file .* Got 'banana' instead") as err:
        create_backbone("test_resnet", weights="banana")
    assert err.value.param == "weights"


def test_packaged_table_has_siblings():
    assert {"tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"} <= set(PACKAGED_WEIGHTS)
    assert packaged_weights_file("tf_efficientnet_lite0").suffix == ".pth"
    assert packaged_weights_file("resnet18") is None
