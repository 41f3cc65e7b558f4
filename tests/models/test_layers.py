"""One vocabulary for layers: the stages `--freeze-until` counts are the layers `--layer` reads, by the same
names and indices, and the codes of the layers read before (timm's feature_info) do not move a bit."""

from __future__ import annotations

import pytest
import timm
import torch

from transferkit.codes.pooling import compute_codes
from transferkit.errors import ParameterError
from transferkit.models.layers import feature_module, forward_layers, layer_table, model_layers, resolve_layers
from transferkit.models.stages import list_stages, resolve_stage

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run faster on one thread

LITE0_FEATURES = ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"]  # timm's feature_info of Lite0


def test_the_layers_of_lite0_are_its_stages(lite0):
    layers = model_layers(lite0)
    stages = list_stages(lite0)
    assert [la.name for la in layers] == [s.name for s in stages] + ["pre_logits"]
    assert [la.stage for la in layers] == [s.index for s in stages] + [None]
    assert [la.n_params for la in layers[:-1]] == [s.n_params for s in stages]
    assert [(la.channels, la.reduction) for la in layers] == [
        (32, 2), (16, 2), (24, 4), (40, 8), (80, 16), (112, 16), (192, 32), (320, 32), (None, None), (1280, 32)]
    assert [la.name for la in layers if la.feature is not None] == LITE0_FEATURES
    assert [la.name for la in resolve_layers(lite0, "all")] == [*LITE0_FEATURES, "pre_logits"]  # the sweep's set
    rows = [line.split() for line in layer_table(lite0).splitlines()]
    assert rows[0] == ["index", "name", "channels", "stride", "params", "sweep"]
    assert rows[1] == ["0", "stem", "32", "2", "928"] and rows[5] == ["4", "blocks.3", "80", "16", "198,480"]
    assert rows[6] == ["5", "blocks.4", "112", "16", "446,784", "*"]
    assert rows[9] == ["8", "head", "-", "-", "1,693,160"] and rows[10] == ["pre_logits", "1280", "32", "*"]


@pytest.mark.parametrize("name", ["lite0", "test_resnet", "test_convnext", "test_vit", "mobilenetv3_small_050"])
def test_every_stage_is_a_layer_by_the_same_name_and_index(name, request):
    model = request.getfixturevalue("lite0") if name == "lite0" else timm.create_model(name, pretrained=False)
    for stage, layer in zip(list_stages(model), model_layers(model)):
        assert resolve_stage(model, stage.name) == resolve_stage(model, str(stage.index)) == stage.index
        if layer.has_map:
            assert resolve_layers(model, stage.name) == resolve_layers(model, stage.index) == [layer]
            assert layer.stage == stage.index
            continue
        for spec in (stage.name, stage.index):  # the head; a ViT's stem, whose output is tokens, not a map
            with pytest.raises(ParameterError, match=f"'{stage.name}' has no feature map") as err:
                resolve_layers(model, spec)
            assert err.value.param == "layer"
    with pytest.raises(ParameterError, match="'pre_logits' is the head's pooled features, not a stage"):
        resolve_stage(model, "pre_logits")


def test_a_bad_layer_names_the_parameter_and_the_choices(lite0):
    with pytest.raises(ParameterError, match=r"^The 'layer' parameter must be a stage index or name of "
                       r"tf_efficientnet_lite0: 0 \(stem\), 1 \(blocks.0\), .* 7 \(blocks.6\); or 'pre_logits', 'all', "
                       r"or a comma list\. Got 'blocks.9' instead\.$") as err:
        resolve_layers(lite0, "blocks.9")
    assert err.value.param == "layer" and "(head)" not in str(err.value)
    with pytest.raises(ParameterError, match="'head' has no feature map \\(its pooled features are 'pre_logits'\\)"):
        resolve_layers(lite0, 8)
    for bad in (9, "-1"):  # counted as --freeze-until counts: no index past the head, none from the end
        with pytest.raises(ParameterError, match=f"Got '{bad}' instead"):
            resolve_layers(lite0, bad)
    assert [la.name for la in resolve_layers(lite0, "pre_logits,blocks.3,0")] == ["stem", "blocks.3", "pre_logits"]


def test_stages_outside_feature_info_are_the_blocks_timm_reads(lite0):
    """Hooked stages give exactly what timm's own `forward_intermediates(extra_blocks=True)` gives at the same
    index (for EfficientNet that index is the stage index); feature_info stages are still read as before."""
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    layers = resolve_layers(lite0, "stem,blocks.2,blocks.3,blocks.5,pre_logits")
    with torch.inference_mode():
        final, maps = forward_layers(lite0, x, layers, final=True)
        blocks = lite0.forward_intermediates(x, indices=list(range(8)), extra_blocks=True, intermediates_only=True)
        before = lite0.forward_intermediates(x, indices=[2], intermediates_only=True, stop_early=True)[0]
        alone = compute_codes(lite0, x, [(resolve_layers(lite0, "blocks.2")[0], "avg")])["blocks.2|avg"]
        mixed = compute_codes(lite0, x, [(la, "avg") for la in layers])
    for layer in layers[:-1]:
        assert torch.equal(maps[layer.name], blocks[layer.stage]), layer.name
    assert torch.equal(maps["blocks.2"], before) and torch.equal(mixed["blocks.2|avg"], alone)
    assert torch.equal(final, lite0.forward_features(x))
    assert mixed["stem|avg"].shape == (2, 32) and mixed["blocks.5|avg"].shape == (2, 192)


def test_names_files_were_written_with_still_mean_the_same_layer():
    """ResNet's stem map is timm's feature_info 'act1': codes saved as 'act1' still resolve, to the same map."""
    model = timm.create_model("test_resnet", pretrained=False).eval()
    (stem,), (act1,) = resolve_layers(model, "stem"), resolve_layers(model, "act1")
    assert act1.name == "act1" and act1.feature == stem.feature == 0 and feature_module(model, 0) == "act1"
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(forward_layers(model, x, [act1], False)[1]["act1"],
                           forward_layers(model, x, [stem], False)[1]["stem"])
