"""CodeSpec: one definition of interchangeable codes, behind the cache's space ids, the engine files, meta.json,
`extract --like` and the probe's refusal of test codes made differently."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch

from transferkit.codes import ort_engine
from transferkit.codes.cache import space_id
from transferkit.codes.extractor import FeatureExtractor
from transferkit.codes.spec import CodeSpec
from transferkit.codes.store import FeatureStore
from transferkit.errors import DataError
from transferkit.jobs import extract_features, train_probe

FAST = {"weights": "package", "image_size": 32, "precision": "fp32", "engine": "torch"}
KEY = "pre_logits|avg"
TRANSFORM = {"input_size": [3, 32, 32], "interpolation": "bicubic", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
             "crop_pct": 0.875, "crop_mode": "center"}
SPEC = CodeSpec(model="tf_efficientnet_lite0", weights_sha256="ab" * 32, layer="pre_logits", pool="avg",
                transform=TRANSFORM, precision="fp32", int8=None, fold_bn=True)
CHANGED = {  # one other value of every field
    "model": "resnet18", "weights_sha256": "cd" * 32, "layer": "blocks.4", "pool": "max",
    "transform": {**TRANSFORM, "input_size": [3, 48, 48]}, "precision": "bf16", "int8": dict(ort_engine.INT8),
    "fold_bn": False,
}


def test_every_field_is_covered():
    assert set(CHANGED) == set(SPEC.to_dict()) | {"int8"}


@pytest.mark.parametrize("field", sorted(CHANGED))
def test_changing_any_field_changes_the_key(field):
    other = replace(SPEC, **{field: CHANGED[field]})
    assert other.digest() != SPEC.digest()
    assert SPEC.differences(other) == [field] and other != SPEC
    assert field in SPEC.describe_differences(other)
    assert CodeSpec.from_dict(json.loads(json.dumps(other.to_dict()))) == other  # the JSON round trip


def test_space_ids_are_those_caches_had_before_codespec():
    """The dict code_spaces hashed before CodeSpec existed: caches written then stay valid."""
    legacy = {"model": SPEC.model, "weights_sha256": SPEC.weights_sha256, "transform": TRANSFORM,
              "precision": "fp32", "fold_bn": True, "layer": "pre_logits", "pool": "avg"}
    assert SPEC.digest() == space_id(legacy)
    int8 = replace(SPEC, precision="int8", int8=dict(ort_engine.INT8))
    assert int8.digest() == space_id({**legacy, "precision": "int8", "int8": ort_engine.INT8})


def test_engine_files_keep_their_names():
    """The engine key composed from the CodeSpecs plus runtime facts is the one engine_path built before."""
    fe = FeatureExtractor(layer="pre_logits,blocks.4", pool="avg,max", **FAST).fit()
    legacy = {"model": fe.model, "weights_sha256": fe.backbone_.weights_info.sha256, "keys": fe.keys_,
              "side": fe.side_, "fold_bn": True, "torch": torch.__version__, "opset": ort_engine.OPSET}
    assert fe.engine_path().name == f"{space_id(legacy)}.onnx"
    import onnxruntime

    legacy.update(int8=ort_engine.INT8, onnxruntime=onnxruntime.__version__)
    assert fe.engine_path("int8").name == f"{space_id(legacy)}-int8.onnx"
    assert fe.engine_path() != replace_fit(fe, fold_bn=False).engine_path()


def replace_fit(fe: FeatureExtractor, **params) -> FeatureExtractor:
    return FeatureExtractor(**{**fe.get_params(), **params}).fit()


def test_cli_extractor_and_meta_agree(photo_folder, tmp_path, code_cache, cli_run):
    """The spec of `transferkit extract -o D`, read back from D's meta.json (also as written before CodeSpec),
    equals the FeatureExtractor's, and names the code cache's space."""
    out = tmp_path / "codes"
    cli_run("extract", photo_folder, "-o", out, "--weights", "package", "--image-size", "32", "--precision", "fp32",
            "--engine", "torch")
    meta = FeatureStore(out).meta
    from_cli = CodeSpec.from_meta(meta, KEY)
    from_extractor = FeatureExtractor(**FAST).fit().code_specs()[KEY]
    assert from_cli == from_extractor and from_cli.digest() == from_extractor.digest()
    space = code_cache / "codes" / from_cli.digest()
    assert json.loads((space / "spec.json").read_text()) == from_cli.to_dict()
    old = {k: v for k, v in meta.items() if k != "code_spec"}  # a feature directory written before CodeSpec
    legacy = CodeSpec.from_meta(old, KEY)
    assert legacy.differences(from_cli) == [] and legacy == from_cli  # BatchNorms were folded: fold_bn is known
    unknown = CodeSpec.from_meta({**old, "folded_batchnorms": None}, KEY)  # every code came from the cache
    assert unknown.fold_bn is None and unknown.differences(from_cli) == []
    assert unknown.differences(replace(from_cli, fold_bn=False)) == []


def _variant(train, tmp_path, field: str):
    """Test codes of the same photos whose spec differs from `train`'s in `field` alone."""
    test = tmp_path / f"test-{field}"
    shutil.copytree(train, test)
    meta = json.loads((test / "meta.json").read_text())
    meta["code_spec"][KEY][field] = CHANGED[field]
    (test / "meta.json").write_text(json.dumps(meta))
    return test


@pytest.fixture()
def train_codes(photo_folder, tmp_path):
    return extract_features(photo_folder, tmp_path / "train", progress=False, **FAST).path


@pytest.mark.parametrize("field", ["model", "weights_sha256", "transform", "int8"])
def test_probe_refuses_codes_of_another_spec(train_codes, tmp_path, field):
    with pytest.raises(DataError, match=f"{field}.*with like='{train_codes}'") as err:
        train_probe(train_codes, tmp_path / "p", test=_variant(train_codes, tmp_path, field), cv=2)
    assert "different codes" in str(err.value)


def test_probe_scores_codes_that_differ_only_by_float_rounding(photo_folder, train_codes, tmp_path):
    """bf16 vs fp32, BatchNorm folded or not: other cache spaces, but a probe scores one with the other as it
    always could (int8, a quantisation, is refused above)."""
    bf16 = _variant(train_codes, tmp_path, "precision")
    assert CodeSpec.from_meta(FeatureStore(bf16).meta, KEY).precision == "bf16"
    train_probe(train_codes, tmp_path / "p1", test=bf16, cv=2)
    no_fold = extract_features(photo_folder, tmp_path / "nofold", progress=False, fold_bn=False, **FAST)
    report = train_probe(train_codes, tmp_path / "p2", test=no_fold, cv=2)
    assert report.evaluation.accuracy > 0.5


@pytest.mark.parametrize(("field", "option"), [("layer", {"layer": "blocks.4"}), ("pool", {"pool": "max"})])
def test_probe_refuses_codes_extracted_otherwise(photo_folder, train_codes, tmp_path, field, option):
    test = extract_features(photo_folder, tmp_path / "test", progress=False, **{**FAST, **option})
    with pytest.raises(DataError, match=f"{field} .*with like='{train_codes}'"):
        train_probe(train_codes, tmp_path / "p", test=test, cv=2)


def test_like_makes_the_same_spec_and_old_directories_still_compare(photo_folder, train_codes, tmp_path):
    no_fold = extract_features(photo_folder, tmp_path / "nofold", progress=False, fold_bn=False, **FAST).path
    like = extract_features(photo_folder, tmp_path / "like", like=no_fold, progress=False)  # fold_bn follows
    assert CodeSpec.from_meta(like.meta, KEY) == CodeSpec.from_meta(FeatureStore(no_fold).meta, KEY)
    meta = json.loads((train_codes / "meta.json").read_text())
    del meta["code_spec"]  # as written before CodeSpec
    (train_codes / "meta.json").write_text(json.dumps(meta))
    report = train_probe(train_codes, tmp_path / "p", test=extract_features(
        photo_folder, tmp_path / "test", like=train_codes, progress=False), cv=2)
    assert report.evaluation.accuracy > 0.9


def test_load_probe_dir_rebuilds_from_the_spec_also_of_old_probes(train_codes, tmp_path):
    from transferkit.probe.saved import load_probe_dir

    train_probe(train_codes, tmp_path / "p", cv=2)
    _, extractor = load_probe_dir(tmp_path / "p")
    stored = CodeSpec.from_meta(FeatureStore(train_codes).meta, KEY)
    assert extractor.code_specs()[KEY] == stored
    file = tmp_path / "p" / "probe" / "probe.json"
    saved = json.loads(file.read_text())
    del saved["extra"]["code_spec"]  # as saved before CodeSpec
    file.write_text(json.dumps(saved))
    _, old = load_probe_dir(tmp_path / "p")
    assert old.code_specs()[KEY] == stored
    saved["extra"]["transform"] = CHANGED["transform"]
    file.write_text(json.dumps(saved))
    with pytest.raises(DataError, match="transform.input_size"):
        load_probe_dir(tmp_path / "p")


def test_like_stops_before_encoding_when_the_rebuilt_weights_differ(photo_folder, train_codes, tmp_path):
    """weights 'auto' may resolve to another file on another machine: --like says so before any image is
    encoded, instead of a probe refusing the test codes afterwards."""
    meta = json.loads((train_codes / "meta.json").read_text())
    meta["code_spec"][KEY]["weights_sha256"] = "ef" * 32
    (train_codes / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"would differ from its own: weights_sha256 '[0-9a-f]{64}' \(now\) vs 'efef"):
        extract_features(photo_folder, tmp_path / "like", like=train_codes, progress=False)
    assert not (tmp_path / "like").exists()
