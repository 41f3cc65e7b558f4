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


def test_the_mirror_transform_is_the_transform_of_the_mirror_image(sample_images):
    """`mirror` flips after the resize: exactly the flipped eval transform, and to uint8 rounding the transform of
    the photo mirrored first; the description (the CodeSpec's transform) records it, so the cache keys it apart."""
    import torch

    from transferkit.data.transforms import build_transform, describe_transform, hflip

    config = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3,
              "crop_pct": 0.875}  # tf_efficientnet_lite0's pretrained config
    mirror, plain = ({**config, "mirror": m} for m in (True, False))
    for photo in (img.crop((0, 0, 320, 320)) for img in sample_images.values()):  # square: no crop offset to round
        ours = build_transform(mirror, 64, uint8=True)(photo)
        torch.testing.assert_close(ours, hflip(build_transform(plain, 64, uint8=True)(photo)), rtol=0, atol=0)
        theirs = build_transform(plain, 64, uint8=True)(photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
        assert (ours.int() - theirs.int()).abs().max() <= 1
    assert describe_transform(mirror, 64) == {**describe_transform(plain, 64), "mirror": True}
    assert "mirror" not in describe_transform(plain, 64)


def test_cli_probe_head_and_extract_mirror(photo_folder, tmp_path, cli_run):
    """`probe --head` reaches LinearProbe(head=...) and its metrics; a bad value is refused naming the flag;
    `extract --like TRAIN --mirror` makes the mirror images' codes like TRAIN's (cached apart), which a probe will
    not score as if they were TRAIN's kind."""
    from transferkit.codes.spec import CodeSpec
    from transferkit.codes.store import FeatureStore

    train, mirror = tmp_path / "train", tmp_path / "mirror"
    cli_run("extract", photo_folder, "-o", train, "--image-size", "32", "--precision", "fp32")
    cli_run("extract", photo_folder, "-o", mirror, "--like", train, "--mirror")
    plain, flipped = FeatureStore(train), FeatureStore(mirror)
    mine, theirs = (CodeSpec.from_meta(s.meta, "pre_logits|avg") for s in (flipped, plain))
    assert mine.differences(theirs) == ["transform"] and mine.transform == {**theirs.transform, "mirror": True}
    assert flipped.meta["cache"]["computed"] == len(plain)  # not served from the plain codes' cache space
    assert not np.allclose(flipped.load("pre_logits|avg"), plain.load("pre_logits|avg"))
    out = cli_run("probe", train, "--test", train, "--head", "ncm", "--cv", "2", "-o", tmp_path / "p").output
    assert "probe on pre_logits|avg: ncm, CV accuracy" in out
    metrics = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert (metrics["head"], metrics["C"]) == ("ncm", None) and metrics["test_accuracy"] >= 0.9
    refused = cli_run("probe", train, "--test", mirror, "-o", tmp_path / "m", ok=False)
    assert refused.exit_code == 1 and "transform.mirror None (train) vs True (test)" in refused.output
    bad = cli_run("probe", train, "--head", "cosine", "-o", tmp_path / "q", ok=False)
    assert bad.exit_code == 2 and "Invalid value for '--head'" in bad.output and "'cosine'" in bad.output
