"""Flip probes (`probe --flip`, train_probe(flip=True)): trained on a set's codes and its mirror images', scored
by the mean over each image and its mirror, saved so that predict and evaluate do the same.

Real Fashion-MNIST items (dataset-fashion-mnist) through the packaged EfficientNet-Lite0 at 32 px, fp32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import ImageOps
from sklearn.datasets import load_digits

from transferkit.codes.store import FeatureStore
from transferkit.errors import DataError, ParameterError
from transferkit.jobs import evaluate_model, extract_features, predict_images, store_images, train_probe
from transferkit.probe.linear import LinearProbe
from transferkit.probe.multilabel import MultiLabelProbe
from transferkit.probe.saved import FLIP, load_probe_dir, probe_scores

FASHION = Path("/usr/share/datasets/fashion-mnist")
SIZE = 32
pytestmark = [pytest.mark.skipif(not FASHION.is_dir(), reason="needs dataset-fashion-mnist"),
              pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def flip(fashion_probe) -> dict:
    """Codes of 5 training and 3 test items per class, and a logistic flip probe trained on them from the CLI."""
    return fashion_probe("--flip", "--head", "logistic", "--cv", "2")


def _mirror(codes: Path, out: Path) -> np.ndarray:
    """The mirror images' codes of a codes directory, extracted by hand (extract --like CODES --mirror)."""
    store = FeatureStore(codes)
    return extract_features(store_images(store), out, like=codes, mirror=True, progress=False).load(store.keys[0])


def test_cli_flip_probe_is_recorded_as_flip(flip):
    assert "flip-averaged" in flip["output"] and "accuracy" in flip["output"]
    assert json.loads((flip["out"] / "probe" / "probe.json").read_text())["extra"][FLIP] is True
    assert json.loads((flip["out"] / "metrics.json").read_text())[FLIP] is True


def test_flip_probe_is_the_head_refitted_on_images_and_mirrors(flip, tmp_path):
    probe, _ = load_probe_dir(flip["out"])
    train = FeatureStore(flip["train"])
    X, Xm = train.load(train.keys[0]), _mirror(flip["train"], tmp_path / "m")
    alone = LinearProbe(head="logistic", cv=2).fit(X, train.labels)  # what chose C: the images' own codes
    assert probe.best_C_ == alone.best_C_ and probe.temperature_ == pytest.approx(alone.temperature_)
    by_hand = LinearProbe(head="logistic", C=alone.best_C_, calibrate=False).fit(
        np.concatenate([X, Xm]), np.concatenate([train.labels] * 2))
    np.testing.assert_allclose(probe.arrays()["coef"], by_hand.arrays()["coef"], rtol=1e-6, atol=1e-8)


def test_saved_flip_probe_scores_the_mean_over_image_and_mirror(flip, tmp_path):
    probe, extractor = load_probe_dir(flip["out"])
    test = FeatureStore(flip["test"])
    Xt, Xtm = test.load(test.keys[0]), _mirror(flip["test"], tmp_path / "m")
    by_hand = (probe.decision_function(Xt) + probe.decision_function(Xtm)) / 2
    saved = probe_scores(probe, extractor, store_images(test))  # reloaded: the images encoded afresh
    np.testing.assert_allclose(saved, by_hand, rtol=1e-4, atol=1e-4)
    accuracy = float((probe.classes_[by_hand.argmax(1)] == test.labels).mean())
    metrics = json.loads((flip["out"] / "metrics.json").read_text())
    assert metrics["test_accuracy"] == pytest.approx(accuracy)
    assert evaluate_model(flip["out"], FASHION / "t10k", per_class=3, progress=False).accuracy == pytest.approx(
        accuracy)


def test_predict_and_evaluate_cli_on_a_flip_probe(flip, tmp_path, cli_run):
    probe, extractor = load_probe_dir(flip["out"])
    items = store_images(FeatureStore(flip["test"]))
    files, mirrors = [], []
    for i in range(0, 30, 3):  # image files, as a user has them, and their mirror images made with PIL
        files.append(tmp_path / f"{i}.png")
        items.image(i).save(files[-1])
        mirrors.append(ImageOps.mirror(items.image(i)))
    rows = predict_images(flip["out"], files, raw=True)
    by_hand = (probe.decision_function(extractor.transform([str(f) for f in files]))
               + probe.decision_function(extractor.transform(mirrors))) / 2
    np.testing.assert_allclose([[t["score"] for t in r["top"][:1]] for r in rows], by_hand.max(1, keepdims=True),
                               rtol=1e-3, atol=1e-3)
    names = [probe.extra_["classes"][int(c)] for c in probe.classes_]
    assert [r["label"] for r in rows] == [names[j] for j in by_hand.argmax(1)]
    out = cli_run("predict", flip["out"], *files).output
    assert [line.split("\t")[1] for line in out.splitlines()] == [r["label"] for r in rows]
    ev = cli_run("evaluate", flip["out"], FASHION / "t10k", "--per-class", 3).output
    assert f"{100 * json.loads((flip['out'] / 'metrics.json').read_text())['test_accuracy']:.2f}%" in ev


def test_flip_needs_the_images_the_codes_were_made_from(orphan_codes, tmp_path, cli_run):
    codes, gone = orphan_codes
    with pytest.raises(ParameterError, match="'flip' parameter needs the images of") as err:
        train_probe(codes, tmp_path / "p", flip=True, C=1.0)
    assert err.value.param == "flip" and str(gone) in str(err.value)
    result = cli_run("probe", codes, "-o", tmp_path / "p", "--flip", "--C", 1, ok=False)
    assert result.exit_code != 0 and "Invalid value for '--flip': needs the images of" in result.output
    assert not (tmp_path / "p").exists()
    train_probe(codes, tmp_path / "p", C=1.0)  # without flip the codes alone do


def test_flip_refuses_codes_of_mirror_images(flip, tmp_path):
    mirrored = tmp_path / "mirrored"
    extract_features(store_images(FeatureStore(flip["train"])), mirrored, like=flip["train"], mirror=True,
                     progress=False)
    with pytest.raises(ParameterError, match="already holds codes of mirror images") as err:
        train_probe(mirrored, tmp_path / "p", flip=True)
    assert err.value.param == "flip"


def test_refit_keeps_what_cv_chose_and_needs_the_same_classes():
    X, y = load_digits(return_X_y=True)
    probe = LinearProbe(cv=3).fit(X[:300], y[:300])
    C, temperature, cv = probe.best_C_, probe.temperature_, probe.cv_results_
    mirrors = X[:300].reshape(-1, 8, 8)[:, :, ::-1].reshape(-1, 64)  # each digit scan, left to right
    both, labels = np.concatenate([X[:300], mirrors]), np.concatenate([y[:300]] * 2)
    probe.refit(both, labels)
    assert (probe.best_C_, probe.temperature_, probe.cv_results_) == (C, temperature, cv)
    by_hand = LinearProbe(C=C, calibrate=False).fit(both, labels)
    np.testing.assert_array_equal(probe.predict(X[300:]), by_hand.predict(X[300:]))
    np.testing.assert_array_equal(probe.predict_from_scores(probe.decision_function(X[300:])), probe.predict(X[300:]))
    with pytest.raises(DataError, match="refit needs the classes fit saw"):
        probe.refit(X[y < 5], y[y < 5])



def test_a_multilabel_probe_is_not_refitted():
    X, y = load_digits(return_X_y=True)
    Y = np.stack([y % 2, (y > 4).astype(int)], axis=1)  # two labels per digit
    probe = MultiLabelProbe(C=0.01).fit(X[:200], Y[:200])
    before = probe.decision_function(X[200:260])
    with pytest.raises(DataError, match="refit is for single-label probes"):
        probe.refit(X[:200], Y[:200])
    np.testing.assert_array_equal(probe.decision_function(X[200:260]), before)

def test_images_of_codes_follow_their_rows(flip):
    store = FeatureStore(flip["train"])
    images = store_images(store)
    assert images.sources == store.sources and len(images) == len(store)
    assert (np.asarray(images.targets) == store.labels).all()


def test_flip_refuses_multilabel_codes(flip, multilabel_codes, tmp_path, cli_run):
    codes = multilabel_codes(store_images(FeatureStore(flip["test"])))
    result = cli_run("probe", codes, "-o", tmp_path / "p", "--flip", ok=False)
    assert result.exit_code != 0 and "Invalid value for '--flip': is for codes of one class per image" in result.output
