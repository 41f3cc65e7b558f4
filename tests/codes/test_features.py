"""CNN codes: parity with timm's own forward paths, pooling, the sklearn contract, the feature store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.base import clone
from sklearn.pipeline import make_pipeline

from transferkit.codes.extract import extract
from transferkit.codes.extractor import FeatureExtractor
from transferkit.codes.params import parse_pools
from transferkit.codes.pooling import compute_codes, pool_map, select_pairs
from transferkit.codes.store import FeatureStore
from transferkit.data.datasets import open_dataset
from transferkit.errors import DataError, ModelError
from transferkit.models.layers import resolve_layers
from transferkit.probe.linear import LinearProbe
from transferkit.runtime.outputs import OutputError


def test_parse_pools():
    assert parse_pools("avg") == ["avg"]
    assert parse_pools("avg+max, 2x2,grid3,avgmax") == ["catavgmax", "2x2", "3x3", "avgmax"]
    assert parse_pools("all") == ["avg", "max", "catavgmax", "2x2", "4x4"]  # the codes 'all' always meant
    with pytest.raises(ModelError, match="Got 'mean' instead"):
        parse_pools("mean")
    with pytest.raises(ModelError, match="Got '2x3' instead"):
        parse_pools("2x3")


def test_pool_map_values():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    torch.testing.assert_close(pool_map(x, "avg"), x.mean((2, 3)))
    torch.testing.assert_close(pool_map(x, "max"), x[:, :, 3, 3])
    torch.testing.assert_close(pool_map(x, "avgmax"), 0.5 * (x.mean((2, 3)) + x[:, :, 3, 3]))
    assert pool_map(x, "catavgmax").shape == (2, 6)
    grid = pool_map(x, "2x2").reshape(2, 3, 2, 2)
    torch.testing.assert_close(grid[:, :, 0, 1], x[:, :, :2, 2:].mean((2, 3)))  # top-right quadrant


def test_global_pools_mean_what_timm_means():
    """avgmax is timm's mean of avg and max, catavgmax its concatenation (timm.layers.adaptive_avgmax_pool)."""
    from timm.layers import SelectAdaptivePool2d

    x = torch.randn(3, 5, 7, 6, generator=torch.Generator().manual_seed(0))
    for pool in ("avg", "max", "avgmax", "catavgmax"):
        timm_pool = SelectAdaptivePool2d(pool_type=pool, flatten=True)
        torch.testing.assert_close(pool_map(x, pool), timm_pool(x), msg=pool)


def test_codes_match_timm_and_hooks(lite0):
    """pre_logits|avg is timm's forward_head(pre_logits=True); stage codes equal hooked activations."""
    x = torch.randn(2, 3, 96, 96)
    layers = resolve_layers(lite0, "all")
    seen = {}
    hook = lite0.blocks[4].register_forward_hook(lambda m, i, o: seen.setdefault("blocks.4", o))
    with torch.inference_mode():
        codes = compute_codes(lite0, x, [(la, p) for la in layers for p in ("avg", "2x2")])
        reference = lite0.forward_head(lite0.forward_features(x), pre_logits=True)
    hook.remove()
    torch.testing.assert_close(codes["pre_logits|avg"], reference)
    torch.testing.assert_close(codes["blocks.4|avg"], seen["blocks.4"].mean((2, 3)))
    torch.testing.assert_close(codes["blocks.4|2x2"], F.adaptive_avg_pool2d(seen["blocks.4"], 2).flatten(1))
    assert codes["blocks.0|2x2"].shape == (2, 16 * 4)


def test_grids_finer_than_the_map_are_skipped(lite0):
    layers = resolve_layers(lite0, "all")
    keys = [f"{la.name}|{p}" for la, p in select_pairs(layers, ["avg", "4x4"], side=64)]
    assert "blocks.4|4x4" in keys and "pre_logits|avg" in keys  # stride 16 -> 4x4 map at 64px
    assert "blocks.6|4x4" not in keys and "pre_logits|4x4" not in keys  # stride 32 -> 2x2 map
    with pytest.raises(ModelError, match="finer than the feature map of pre_logits"):
        select_pairs(layers[-1:], ["4x4"], side=64)


def test_extractor_is_a_sklearn_transformer(photo_folder):
    fe = FeatureExtractor(layer="blocks.4", pool="catavgmax", image_size=64, batch_size=5)
    assert clone(fe).get_params() == fe.get_params()
    data = open_dataset(photo_folder)
    model = make_pipeline(fe, LinearProbe(C=0.01)).fit(data, data.targets)
    assert model.score(data, data.targets) == 1.0  # temple vs daisy crops: trivially separable codes
    codes = fe.transform([data.sources[0], data.image(0), np.asarray(data.image(0))])
    assert codes.shape == (3, 224) and codes.dtype == np.float32
    np.testing.assert_allclose(codes[0], codes[1], rtol=1e-5, atol=1e-5)
    assert fe.get_feature_names_out()[0] == "blocks.4|catavgmax:0"


def test_extract_writes_shards_and_metadata(photo_folder, tmp_path):
    data = open_dataset(photo_folder)
    fe = FeatureExtractor(layer="all", pool="avg,2x2", image_size=64, batch_size=4)
    store = extract(data, tmp_path / "f", fe, shard_size=5)
    assert [s["rows"] for s in store.meta["shards"]] == [8, 8]  # batches of 4 flushed once >= 5 rows
    assert len(store) == 16 and store.classes == ["flower", "temple"]
    np.testing.assert_array_equal(store.labels, data.targets)
    assert store.sources == data.sources
    assert store.load("blocks.2|2x2").shape == (16, 160)
    meta = json.loads((tmp_path / "f" / "meta.json").read_text())
    assert meta["weights"]["source"] == "package" and len(meta["weights"]["sha256"]) == 64
    assert meta["transform"]["input_size"] == [3, 64, 64]
    # the codes on disk equal a fresh in-memory transform of the same images
    fresh = FeatureExtractor(layer="blocks.2", pool="2x2", image_size=64).fit().transform(data)
    np.testing.assert_allclose(store.load("blocks.2|2x2"), fresh, rtol=1e-4, atol=1e-4)


def test_failed_extract_leaves_previous_output_intact(photo_folder, tmp_path):
    out = tmp_path / "f"
    fe = FeatureExtractor(image_size=32)
    extract(open_dataset(photo_folder), out, fe)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (photo_folder / "flower" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match="0.png"):
        extract(open_dataset(photo_folder), out, fe)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "photos"]  # no temporary directory left


def test_skip_bad_records_the_files(photo_folder, tmp_path):
    (photo_folder / "temple" / "3.jpg").write_bytes((photo_folder / "temple" / "3.jpg").read_bytes()[:300])
    (photo_folder / "temple" / "notes.jpg").write_text("not an image")
    store = extract(open_dataset(photo_folder, skip_bad=True), tmp_path / "f", FeatureExtractor(image_size=32),
                    skip_bad=True)
    bad = {item["source"].split("/")[-1] for item in store.meta["skipped"]}
    assert bad == {"3.jpg", "notes.jpg"}
    assert len(store) == 15 and not any(s.endswith("temple/3.jpg") for s in store.sources)


def test_refuses_to_overwrite_other_directories(photo_folder, tmp_path):
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "thesis.txt").write_text("do not delete")
    with pytest.raises(OutputError, match="not written by transferkit"):  # tests/test_faults.py: every writer
        extract(open_dataset(photo_folder), precious, FeatureExtractor(image_size=32))
    assert (precious / "thesis.txt").read_text() == "do not delete"


def test_store_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="no meta.json"):
        FeatureStore(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt"):
        FeatureStore(tmp_path)


@pytest.mark.parametrize("name", ["test_resnet", "test_convnext", "test_efficientnet"])
def test_any_timm_cnn(name, photo_folder):
    """Mechanics on tiny timm models (random weights, asked for explicitly): every stage, every pooling."""
    fe = FeatureExtractor(name, weights="random", layer="all", pool="avg,max,2x2", image_size=64).fit()
    codes = fe.transform(open_dataset(photo_folder))
    assert codes.shape == (16, fe.n_features_out_) and np.isfinite(codes).all()
    channels = [d["num_chs"] for d in fe.backbone_.feature_info]
    assert fe.n_features_out_ >= sum(6 * c for c in channels)  # avg + max + at least a 2x2 grid per stage


def test_bf16_codes_track_fp32(photo_folder):
    data = open_dataset(photo_folder)
    fp32 = FeatureExtractor(layer="blocks.4", image_size=64).fit().transform(data)
    bf16 = FeatureExtractor(layer="blocks.4", image_size=64, precision="bf16").fit().transform(data)
    cos = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cos.min() > 0.99  # bf16 keeps ~3 significant digits; codes point the same way
    with pytest.raises(ModelError, match="fp16 needs a CUDA device"):
        FeatureExtractor(precision="fp16").fit() if not torch.cuda.is_available() else pytest.skip("has CUDA")
