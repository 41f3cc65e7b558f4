"""Combinations of views (multi-layer codes): several layer|pool codes side by side, as one CodeSpec that
meta.json records, `extract --like` reproduces, the code cache keeps per view, and a probe rebuilds to predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from transferkit.codes.extractor import FeatureExtractor
from transferkit.codes.spec import CodeSpec
from transferkit.codes.store import FeatureStore
from transferkit.errors import ParameterError
from transferkit.jobs import extract_features, predict_images, read_sweep, sweep_features, train_probe
from transferkit.probe.sweep import select_views

FAST = {"weights": "package", "image_size": 32, "precision": "fp32", "engine": "torch"}
VIEWS = "blocks.4|catavgmax,blocks.2|2x2"
COMBO = "blocks.4|catavgmax+blocks.2|2x2"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_combination_is_its_views_codes_side_by_side(photo_folder, tmp_path, code_cache):
    """Numeric parity: the combination's codes are each view's codes, extracted alone, in the order named; the
    code cache keeps each view in its own space, as if it was extracted alone."""
    files = sorted(str(p) for p in photo_folder.rglob("*.*"))
    combined = FeatureExtractor(views=VIEWS, **FAST).fit()
    alone = [FeatureExtractor(layer=la, pool=p, **FAST).fit().transform(files) for la, p in
             (v.split("|") for v in VIEWS.split(","))]
    torch.testing.assert_close(combined.transform(files), np.concatenate(alone, 1))
    assert combined.keys_ == VIEWS.split(",")  # the order named, not the network's
    store = extract_features(photo_folder, tmp_path / "codes", views=VIEWS, progress=False, **FAST)
    order = np.argsort(store.sources)  # the files above are sorted; the store has the folder's order
    torch.testing.assert_close(store.load(COMBO)[order], np.concatenate(alone, 1))
    for part in combined.code_spec().parts():
        assert (code_cache / "codes" / part.digest()).is_dir()
    assert read_sweep(store) == COMBO  # the codes a probe trains on by default


def test_meta_json_records_the_combination_and_round_trips(photo_folder, tmp_path):
    store = extract_features(photo_folder, tmp_path / "codes", views=VIEWS, progress=False, **FAST)
    meta = json.loads((store.path / "meta.json").read_text())
    entry = meta["combinations"][COMBO]
    assert entry["views"] == [["blocks.4", "catavgmax"], ["blocks.2", "2x2"]] and entry["scaling"] == "concat"
    assert entry["dim"] == store.load(COMBO).shape[1] == 2 * 112 + 4 * 40
    spec = CodeSpec.from_meta(meta, COMBO)
    assert spec == FeatureExtractor(views=VIEWS, **FAST).fit().code_spec() and spec.key == COMBO
    assert CodeSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert [p.key for p in spec.parts()] == VIEWS.split(",")
    assert spec.parts()[0] == CodeSpec.from_meta(meta, "blocks.4|catavgmax")  # each view as extracted alone
    swapped = CodeSpec.from_meta(meta, "blocks.2|2x2+blocks.4|catavgmax")  # other columns: other codes
    assert spec.differences(swapped) == ["layer", "pool", "views"] and swapped.digest() != spec.digest()
    assert "views" not in spec.parts()[0].to_dict()  # a single view's spec (and cache space id) as before


def test_like_reproduces_a_combination_and_the_probe_predicts_with_it(photo_folder, tmp_path, sample_images):
    train = extract_features(photo_folder, tmp_path / "train", views=VIEWS, progress=False, **FAST)
    test = extract_features(photo_folder, tmp_path / "test", like=train.path, progress=False)
    assert test.combination == COMBO and CodeSpec.from_meta(test.meta, COMBO) == CodeSpec.from_meta(train.meta, COMBO)
    report = train_probe(train.path, tmp_path / "probe", test=test.path, cv=2)  # no layer: the combination
    assert report.key == COMBO and report.evaluation.accuracy == 1.0
    assert report.probe.n_features_in_ == 2 * 112 + 4 * 40
    one_view = extract_features(photo_folder, tmp_path / "one", layer="blocks.4", pool="catavgmax", progress=False,
                                **FAST)
    with pytest.raises(Exception, match=f"no codes for '{COMBO}'"):
        train_probe(train.path, tmp_path / "p2", test=one_view.path, cv=2)
    new = tmp_path / "new"
    new.mkdir()
    sample_images["flower.jpg"].crop((150, 100, 450, 400)).save(new / "daisy.png")
    sample_images["china.jpg"].crop((50, 50, 350, 350)).save(new / "temple.jpg")
    rows = predict_images(tmp_path / "probe", [new])  # the probe rebuilds the combination's extractor
    assert {r["source"].rsplit("/", 1)[-1]: r["label"] for r in rows} == {"daisy.png": "flower",
                                                                           "temple.jpg": "temple"}


def test_greedy_selection_adds_a_view_only_when_cv_rises(digits_folder, tmp_path):
    store = extract_features(digits_folder, tmp_path / "codes", layer="blocks.1,blocks.2,blocks.4,pre_logits",
                             pool="avg", progress=False, **FAST)
    codes = {tuple(k.split("|")): store.load(k) for k in store.keys}
    join = lambda parts: np.concatenate(parts, 1)  # noqa: E731
    path = select_views(codes, store.labels, combine=join, max_views=4, min_gain=-1.0, progress=False)
    assert len(path.views) == 4  # min_gain -1: every round adds its best view
    scores = [s["cv_accuracy"] for s in path.steps]
    picked = select_views(codes, store.labels, combine=join, max_views=4, min_gain=0.01, progress=False)
    gains = np.diff([s["cv_accuracy"] for s in picked.steps])
    assert (gains > 0.01).all()  # every view added raised CV accuracy by more than min_gain
    n = len(picked.views)
    assert picked.views == path.views[:n] and np.allclose([s["cv_accuracy"] for s in picked.steps], scores[:n])
    if n < 4:  # it stopped because the best next view did not raise CV accuracy enough
        assert scores[n] - scores[n - 1] <= 0.01


def test_the_sweeps_selection_is_the_codes_like_and_probe_use(digits_folder, tmp_path):
    """sweep_features(select=True), as `extract --layer auto --combine` runs it: sweep.json records the selection,
    and when it chose several views, read_sweep names the combination, which `--like` extracts and a probe trains
    on."""
    store = extract_features(digits_folder, tmp_path / "codes", layer="blocks.1,blocks.2,blocks.4,pre_logits",
                             pool="avg", progress=False, **FAST)
    sweep_features(store, select=True, progress=False)
    views = json.loads((store.path / "sweep.json").read_text())["selection"]["views"]
    assert len(views) > 1  # on these 200 digits a second view raises CV accuracy
    assert read_sweep(store) == "+".join(f"{la}|{p}" for la, p in views)
    like = extract_features(digits_folder, tmp_path / "like", like=store.path, progress=False)
    assert like.keys == [f"{la}|{p}" for la, p in views] and like.combination == read_sweep(store)
    report = train_probe(store.path, tmp_path / "probe", test=like.path, cv=3)  # no layer: the selection's
    assert report.key == read_sweep(store) and report.evaluation.accuracy > 0.9


@pytest.mark.parametrize(("views", "says"), [
    ("blocks.2", "comma list of layer|pool pairs"), ("blocks.2|mean", "bad pool"), ("blocks.2|all", "layer|pool"),
    ("blocks.2|avg,blocks.2|avg", "names a view twice"), ("blocks.99|avg", "layer the model does not have"),
])
def test_bad_views_are_refused_naming_the_parameter_and_the_flag(views, says, photo_folder, tmp_path, cli_run):
    with pytest.raises(ParameterError, match=says) as err:
        FeatureExtractor(views=views, **FAST).fit()
    assert err.value.param == "views" and str(err.value).startswith("The 'views' parameter")
    bad = cli_run("extract", photo_folder, "-o", tmp_path / "c", "--views", views, ok=False)
    assert bad.exit_code != 0 and "Invalid value for '--views'" in bad.output and says in bad.output
    assert not (tmp_path / "c").exists()


def test_views_refuses_layer_and_pool_beside_it(photo_folder, tmp_path, cli_run):
    bad = cli_run("extract", photo_folder, "-o", tmp_path / "c", "--views", VIEWS, "--layer", "auto", ok=False)
    assert bad.exit_code == 2 and "--views names the layers and pools itself" in bad.output
    with pytest.raises(ParameterError, match="leave 'layer' and 'pool' at their defaults"):
        FeatureExtractor(views=VIEWS, pool="max", **FAST).fit()


def test_extract_combine_from_the_cli(digits_folder, tmp_path, cli_run):
    """`extract --layer auto --combine` runs the selection and extracts its views; without --combine the sweep's
    single best view is the codes; --combine without --layer auto is refused before any work."""
    args = ("--image-size", "32", "--weights", "package", "--precision", "fp32", "--engine", "torch")
    out = cli_run("extract", digits_folder, "-o", tmp_path / "c", "--layer", "auto", "--combine", *args).output
    sweep = json.loads((tmp_path / "c" / "sweep.json").read_text())
    views = [f"{la}|{p}" for la, p in sweep["selection"]["views"]]
    assert len(views) > 1 and f"selection: views {'+'.join(views)}" in out, out  # on these digits a second view helps
    assert read_sweep(FeatureStore(tmp_path / "c")) == "+".join(views)
    cli_run("extract", digits_folder, "-o", tmp_path / "one", "--layer", "auto", *args)
    assert "selection" not in json.loads((tmp_path / "one" / "sweep.json").read_text())
    bad = cli_run("extract", digits_folder, "-o", tmp_path / "bad", "--combine", *args, ok=False)
    assert bad.exit_code == 2 and "--combine" in bad.output and "--layer auto" in bad.output
    assert not (tmp_path / "bad").exists()
