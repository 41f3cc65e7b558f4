"""The probe's heads (SVM, logistic regression, nearest class mean), its L2 scalings and flip averaging: on
scikit-learn's real 8x8 digits as stand-in codes, and mirrored codes of real photos with the packaged Lite0."""

import json

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from transferkit.errors import ModelError, ParameterError
from transferkit.probe.heads import flip_average
from transferkit.probe.linear import LinearProbe


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return train_test_split(X, y, test_size=0.3, stratify=y, random_state=0)  # Xtr, Xte, ytr, yte


@pytest.mark.parametrize("head", ["svm", "logistic", "ncm"])
@pytest.mark.parametrize("scaling", ["standard", "center_l2", "standard_l2"])
def test_each_head_fits_with_calibrated_probabilities(digits, head, scaling):
    Xtr, Xte, ytr, yte = digits
    probe = LinearProbe(head=head, scaling=scaling, cv=3).fit(Xtr, ytr)
    assert probe.head_ == head and (probe.best_C_ is None) == (head == "ncm")
    assert probe.score(Xte, yte) >= (0.85 if head == "ncm" else 0.93)  # NCM: one mean per class, no fit
    proba = probe.predict_proba(Xte)
    np.testing.assert_allclose(proba.sum(1), 1.0)
    np.testing.assert_array_equal(probe.classes_[proba.argmax(1)], probe.predict(Xte))


def test_auto_head_is_the_best_cv_score_over_heads_and_Cs(digits):
    Xtr, Xte, ytr, yte = digits
    probe = LinearProbe(head="auto", cv=3).fit(Xtr, ytr)
    assert {r["head"] for r in probe.cv_results_} == {"svm", "logistic", "ncm"}
    best = max(probe.cv_results_, key=lambda r: r["mean"])
    assert (probe.head_, probe.best_C_, probe.cv_score_) == (best["head"], best["C"], best["mean"])
    alone = LinearProbe(head=probe.head_, cv=3).fit(Xtr, ytr)  # the same CV, one head: the same choice
    assert alone.best_C_ == probe.best_C_
    np.testing.assert_array_equal(alone.decision_function(Xte), probe.decision_function(Xte))


def test_fixed_C_with_auto_head_chooses_only_the_head(digits):
    Xtr, _, ytr, _ = digits
    probe = LinearProbe(head="auto", C=0.01, cv=3).fit(Xtr, ytr)
    assert [(r["head"], r["C"]) for r in probe.cv_results_] == [("svm", 0.01), ("logistic", 0.01), ("ncm", None)]


def test_unit_scalings_give_rows_of_length_sqrt_d(digits):
    Xtr, Xte, ytr, _ = digits
    for scaling in ("center_l2", "standard_l2"):
        scaled = LinearProbe(head="ncm", scaling=scaling).fit(Xtr, ytr).pipeline_.named_steps["scale"].transform(Xte)
        np.testing.assert_allclose(np.linalg.norm(scaled, axis=1), np.sqrt(Xte.shape[1]))


@pytest.mark.parametrize(("head", "scaling"), [("logistic", "standard_l2"), ("ncm", "center_l2"), ("svm", "l2")])
def test_save_load_round_trip_is_bit_exact(digits, tmp_path, head, scaling):
    Xtr, Xte, ytr, _ = digits
    probe = LinearProbe(head=head, scaling=scaling, cv=3).fit(Xtr, ytr)
    loaded = LinearProbe.load(probe.save(tmp_path / "probe"))
    np.testing.assert_array_equal(loaded.decision_function(Xte), probe.decision_function(Xte))
    np.testing.assert_array_equal(loaded.predict_proba(Xte), probe.predict_proba(Xte))
    assert (loaded.head_, loaded.best_C_, loaded.get_params()) == (head, probe.best_C_, probe.get_params())
    assert json.loads((tmp_path / "probe" / "probe.json").read_text())["head"] == head


def test_probe_saved_before_heads_loads_as_an_svm(digits, tmp_path):
    """Format 3 had no head: such a probe must load, as the SVM it is, and predict as before."""
    import hashlib

    Xtr, Xte, ytr, _ = digits
    probe = LinearProbe(cv=3).fit(Xtr, ytr)
    out = probe.save(tmp_path / "probe")
    meta = json.loads((out / "probe.json").read_text())
    del meta["head"], meta["params"]["head"]
    meta["version"] = 3
    assert meta["arrays_sha256"] == hashlib.sha256((out / "arrays.npz").read_bytes()).hexdigest()
    (out / "probe.json").write_text(json.dumps(meta))
    loaded = LinearProbe.load(out)
    assert loaded.head == loaded.head_ == "svm"
    np.testing.assert_array_equal(loaded.decision_function(Xte), probe.decision_function(Xte))


def test_bad_head_is_named_with_the_allowed_values(digits):
    Xtr, _, ytr, _ = digits
    with pytest.raises(ModelError) as info:
        LinearProbe(head="cosine").fit(Xtr, ytr)
    assert str(info.value) == ("The 'head' parameter of LinearProbe must be a str among "
                               "{'svm', 'logistic', 'ncm', 'auto'}. Got 'cosine' instead.")


def test_multilabel_probe_refuses_other_heads():
    from transferkit.probe.multilabel import MultiLabelProbe

    X, y = load_digits(return_X_y=True)
    with pytest.raises(ParameterError, match="'head' parameter of MultiLabelProbe must be 'svm'"):
        MultiLabelProbe(head="ncm").fit(X[:100], np.eye(10, dtype=int)[y[:100]])


def test_flip_average_is_the_mean_of_the_two_score_matrices(digits):
    Xtr, Xte, ytr, _ = digits
    probe = LinearProbe(head="logistic", cv=3).fit(Xtr, ytr)
    mirrored = Xte.reshape(-1, 8, 8)[:, :, ::-1].reshape(len(Xte), -1)  # the digits' own mirror images
    a, b = probe.decision_function(Xte), probe.decision_function(mirrored)
    np.testing.assert_array_equal(flip_average(a, b), (a + b) / 2)
    assert not np.array_equal(a, b)


def test_mirrored_codes_are_the_codes_of_the_mirror_images(sample_images):
    """extract's `mirror` flips after the resize; the codes of photos mirrored before it agree to rounding, and the
    mirror is part of the CodeSpec, so the code cache keeps the two apart."""
    from transferkit.codes.extractor import FeatureExtractor

    photos = [img.crop((0, 0, 320, 320)) for img in sample_images.values()]
    kw = {"layer": "pre_logits", "image_size": 64, "precision": "fp32", "engine": "torch"}
    mirror = FeatureExtractor(mirror=True, **kw).fit()
    plain = FeatureExtractor(**kw).fit()
    ours = mirror.transform(photos)
    theirs = plain.transform([p.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for p in photos])
    own = plain.transform(photos)
    assert np.abs(ours - theirs).max() < 0.1 * np.abs(own - theirs).max()
    spec, plain_spec = mirror.code_specs()["pre_logits|avg"], plain.code_specs()["pre_logits|avg"]
    assert spec.transform["mirror"] is True and "mirror" not in plain_spec.transform
    assert spec.digest() != plain_spec.digest()


def test_extract_like_with_mirror_gives_the_mirror_codes_of_the_same_spec(photo_folder, tmp_path):
    """A test set's mirror codes, made like the training codes (extract --like TRAIN --mirror), and cached apart."""
    from transferkit.codes.spec import CodeSpec
    from transferkit.jobs import extract_features

    kw = {"layer": "blocks.4", "pool": "avg", "image_size": 32, "precision": "fp32", "engine": "torch",
          "progress": False}
    plain = extract_features(photo_folder, tmp_path / "plain", **kw)
    mirror = extract_features(photo_folder, tmp_path / "mirror", like=tmp_path / "plain", mirror=True,
                              progress=False)
    mine, theirs = (CodeSpec.from_meta(s.meta, "blocks.4|avg") for s in (mirror, plain))
    assert mine.differences(theirs) == ["transform"] and mine.transform == {**theirs.transform, "mirror": True}
    assert mirror.meta["cache"]["computed"] == len(plain)  # not served from the plain codes' cache space
    assert not np.allclose(mirror.load("blocks.4|avg"), plain.load("blocks.4|avg"))
