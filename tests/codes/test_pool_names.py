"""Pools are named as timm names them: 'avgmax' is the mean of avg and max, 'catavgmax' their concatenation.

Files written when transferkit's 'avgmax' was the concatenation (codes directories and converted models of
format 1, probes saved without 'pool_names') still load, in today's names; no cache space or engine file of
those codes can answer for the mean.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from transferkit.codes import ort_engine
from transferkit.codes.cache import space_id
from transferkit.codes.extractor import FeatureExtractor
from transferkit.codes.spec import CodeSpec
from transferkit.codes.store import FeatureStore
from transferkit.jobs import extract_features, like_options, train_probe

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = {"weights": "package", "image_size": 32, "precision": "fp32", "engine": "torch", "progress": False}
CAT, MEAN = "blocks.4|catavgmax", "blocks.4|avgmax"


def as_format_1(directory) -> None:
    """Rewrite a codes directory as transferkit wrote it before following timm: format 1, 'avgmax' for the
    concatenation in meta.json and in the shards' array names."""
    meta = json.loads((directory / "meta.json").read_text())
    old = {k: k.replace("|catavgmax", "|avgmax") for k in meta["keys"]}
    meta["format"] = "transferkit.features/1"
    meta["keys"] = {old[k]: {**v, "pool": v["pool"].replace("catavgmax", "avgmax")} for k, v in meta["keys"].items()}
    meta["code_spec"] = {old[k]: {**v, "pool": v["pool"].replace("catavgmax", "avgmax")}
                         for k, v in meta["code_spec"].items()}
    meta["pools"] = [p.replace("catavgmax", "avgmax") for p in meta["pools"]]
    (directory / "meta.json").write_text(json.dumps(meta))
    for shard in meta["shards"]:
        with np.load(directory / shard["file"]) as z:
            arrays = {old.get(k, k): z[k] for k in z.files}
        np.savez(directory / shard["file"], **arrays)


@pytest.fixture()
def cat_codes(photo_folder, tmp_path):
    return extract_features(photo_folder, tmp_path / "cat", layer="blocks.4", pool="catavgmax,avg", **FAST)


def test_avgmax_is_the_mean_of_the_concatenations_halves(photo_folder, tmp_path, cat_codes):
    """End to end through the code cache: the mean's codes are new codes, not the cached concatenation."""
    mean = extract_features(photo_folder, tmp_path / "mean", layer="blocks.4", pool="avgmax", **FAST)
    cat, avg = cat_codes.load(CAT), cat_codes.load("blocks.4|avg")
    c = avg.shape[1]
    assert cat.shape[1] == 2 * c and mean.load(MEAN).shape[1] == c
    np.testing.assert_allclose(cat[:, :c], avg, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mean.load(MEAN), 0.5 * (cat[:, :c] + cat[:, c:]), rtol=1e-5, atol=1e-5)


def test_the_mean_never_meets_a_cache_or_engine_of_the_old_concatenation():
    """Before the rename, the concatenation was keyed with pool 'avgmax': the mean must key otherwise."""
    mean = FeatureExtractor(layer="blocks.4", pool="avgmax", **{k: v for k, v in FAST.items() if k != "progress"})
    mean.fit()
    spec = mean.code_specs()[MEAN]
    assert spec.digest() != space_id(spec.to_dict())  # what the concatenation's cache space was named
    cat = replace(spec, pool="catavgmax")
    assert cat.digest() == space_id(cat.to_dict()) and cat.digest() != spec.digest()
    old_engine = {"model": mean.model, "weights_sha256": spec.weights_sha256, "keys": [MEAN], "side": mean.side_,
                  "fold_bn": True, "torch": torch.__version__, "opset": ort_engine.OPSET}
    assert mean.engine_path().name != f"{space_id(old_engine)}.onnx"


def test_a_format_1_directory_reads_in_todays_names(photo_folder, tmp_path, cat_codes):
    want = cat_codes.load(CAT)
    as_format_1(cat_codes.path)
    old = FeatureStore(cat_codes.path)
    assert old.keys == [CAT, "blocks.4|avg"] and old.meta["pools"] == ["catavgmax", "avg"]
    np.testing.assert_array_equal(old.load(CAT), want)
    assert CodeSpec.from_meta(old.meta, CAT).pool == "catavgmax"
    (cat_codes.path / "sweep.json").write_text(json.dumps({"best": {"layer": "blocks.4", "pool": "avgmax"}}))
    same = like_options(old)
    assert (same["layer"], same["pool"]) == ("blocks.4", "catavgmax")  # its sweep's winner, renamed
    like = extract_features(photo_folder, tmp_path / "like", like=cat_codes.path, progress=False)
    assert like.keys == [CAT]
    report = train_probe(cat_codes.path, tmp_path / "probe", layer="blocks.4", pool="catavgmax", test=like, cv=2)
    assert report.evaluation.accuracy > 0.9


def test_a_probe_saved_before_the_rename_loads_in_todays_names(tmp_path, cat_codes):
    from transferkit.probe.saved import load_probe_dir

    train_probe(cat_codes.path, tmp_path / "p", layer="blocks.4", pool="catavgmax", cv=2)
    file = tmp_path / "p" / "probe" / "probe.json"
    saved = json.loads(file.read_text())
    assert saved["extra"]["pool_names"] == "timm"
    extra = saved["extra"]
    del extra["pool_names"]
    extra.update(pool="avgmax", key=MEAN, code_spec={**extra["code_spec"], "pool": "avgmax"})
    file.write_text(json.dumps(saved))
    probe, extractor = load_probe_dir(tmp_path / "p")
    assert extractor.pools_ == ["catavgmax"] and probe.extra_["key"] == CAT
    assert extractor.code_specs()[CAT] == CodeSpec.from_meta(cat_codes.meta, CAT)
    assert probe.score(extractor.transform(cat_codes.sources), cat_codes.labels) > 0.9


def test_a_converted_model_of_format_1_loads_with_the_concatenation(tmp_path, cat_codes):
    from transferkit.surgery.dense import load_classifier, load_converted, save_converted

    train_probe(cat_codes.path, tmp_path / "p", layer="blocks.4", pool="catavgmax", cv=2)
    clf = load_classifier(tmp_path / "p")
    save_converted(clf, tmp_path / "conv")
    file = tmp_path / "conv" / "convert.json"
    meta = json.loads(file.read_text())
    meta.update(format="transferkit.convert/1", spec={**meta["spec"], "pool": "avgmax"})
    file.write_text(json.dumps(meta))
    old = load_converted(tmp_path / "conv")
    assert old.spec["pool"] == "catavgmax"
    x = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(old.net(x), clf.net(x))
