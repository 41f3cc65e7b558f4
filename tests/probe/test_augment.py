"""Augmented probes (`probe --augment N`, train_probe(augment=N)): the head refitted, at the C chosen on a set's
own codes, on them and on the codes of N randomly shifted copies of each image (data.transforms.ShiftCopy).

Real Fashion-MNIST items (dataset-fashion-mnist) and scikit-learn's photos through the packaged EfficientNet-Lite0
at 32 px, fp32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transferkit.codes.extractor import FeatureExtractor
from transferkit.codes.store import FeatureStore
from transferkit.data.transforms import SHIFT_COPY, SHIFT_MAX, ShiftCopy, build_transform, describe_transform
from transferkit.errors import ParameterError
from transferkit.jobs import like_options, store_images, train_probe
from transferkit.probe.linear import LinearProbe
from transferkit.probe.saved import AUGMENT, FLIP, load_probe_dir

FASHION = Path("/usr/share/datasets/fashion-mnist")
SIZE = 32
COPIES = 2
pytestmark = [pytest.mark.skipif(not FASHION.is_dir(), reason="needs dataset-fashion-mnist"),
              pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def augmented(fashion_probe) -> dict:
    """Codes of 5 training and 3 test items per class, and an SVM probe refitted on 2 shifted copies of each
    training image, from the CLI; and what its code cache holds after."""
    result = fashion_probe("--augment", COPIES, "--cv", "2")
    return {**result, "cached": sorted(p.name for p in (result["cache"] / "codes").iterdir())}


def _copies(codes: Path) -> list[np.ndarray]:
    """The codes of the shifted copies of a codes directory's images, made by hand without the code cache."""
    store = FeatureStore(codes)
    images = store_images(store)
    return [FeatureExtractor(**{**like_options(store), "shift_copy": k}).fit().transform(images)
            for k in range(1, COPIES + 1)]


def test_cli_augmented_probe_is_recorded(augmented):
    assert f"{COPIES} shifted copies" in augmented["output"] and "accuracy" in augmented["output"]
    extra = json.loads((augmented["out"] / "probe" / "probe.json").read_text())["extra"]
    assert extra[AUGMENT] == COPIES and extra[FLIP] is False
    assert json.loads((augmented["out"] / "metrics.json").read_text())[AUGMENT] == COPIES


def test_augmented_probe_is_the_head_refitted_on_images_and_their_copies(augmented):
    probe, _ = load_probe_dir(augmented["out"])
    train = FeatureStore(augmented["train"])
    X, copies = train.load(train.keys[0]), _copies(augmented["train"])
    assert all(c.shape == X.shape and not np.allclose(c, X) for c in copies)
    assert not np.allclose(copies[0], copies[1])  # each copy draws its own shifts
    alone = LinearProbe(cv=2).fit(X, train.labels)  # what chose C: the images' own codes
    assert probe.best_C_ == alone.best_C_
    by_hand = LinearProbe(C=alone.best_C_, calibrate=False).fit(
        np.concatenate([X, *copies]), np.concatenate([train.labels] * (1 + COPIES)))
    np.testing.assert_allclose(probe.arrays()["coef"], by_hand.arrays()["coef"], rtol=1e-5, atol=1e-7)


def test_copies_are_cached_apart_and_reused(augmented, tmp_path):
    """Each copy has a cache entry of its own (one per CodeSpec: the images', train and test alike, and one per
    copy), and a second run makes no code: it reads them, and fits the same probe."""
    assert len(augmented["cached"]) == 1 + COPIES
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRANSFERKIT_CACHE", str(augmented["cache"]))
        mp.setattr(FeatureExtractor, "model_codes", lambda *a: pytest.fail("encoded an image again"))
        again = train_probe(augmented["train"], tmp_path / "again", augment=COPIES, cv=2, progress=False)
    first, _ = load_probe_dir(augmented["out"])
    np.testing.assert_array_equal(again.probe.arrays()["coef"], first.arrays()["coef"])


def test_a_shifted_copy_depends_on_the_pixels_and_the_copy_number_only(sample_images):
    photo = sample_images["china.jpg"].crop((0, 0, 200, 150))
    one, other = ShiftCopy(1), ShiftCopy(2)
    assert np.array_equal(np.asarray(one(photo)), np.asarray(ShiftCopy(1)(photo.copy())))
    assert not np.array_equal(np.asarray(one(photo)), np.asarray(other(photo)))
    assert one(photo).size == photo.size and one(photo).mode == photo.mode


def test_a_shift_moves_content_by_at_most_a_tenth_of_the_side_and_mirrors_half_the_copies():
    """A single bright pixel off-centre: where it lands gives each copy's shift and mirroring."""
    side, (y, x) = 60, (20, 25)
    dot = np.zeros((side, side), np.uint8)
    dot[y, x] = 255
    moves, mirrored = [], 0
    for k in range(1, 41):
        (ys, xs) = np.argwhere(np.asarray(ShiftCopy(k)(Image.fromarray(dot))) == 255)[0]
        flipped = abs(xs - (side - 1 - x)) < abs(xs - x)
        mirrored += flipped
        moves.append((ys - y, (side - 1 - xs if flipped else xs) - x))
    moves = np.array(moves)
    assert np.abs(moves).max() <= round(SHIFT_MAX * side) and len({tuple(m) for m in moves}) > 20
    assert 10 <= mirrored <= 30


def test_the_edges_are_repeated_into_the_gap():
    ramp = Image.fromarray(np.tile(np.arange(0, 250, 5, dtype=np.uint8), (50, 1)))  # left to right: 0 .. 245
    for k in range(1, 6):
        out = np.asarray(ShiftCopy(k)(ramp))
        assert set(np.unique(out)) <= set(np.unique(np.asarray(ramp)))  # no new values: no black bars
        assert (out == out[0]).all()  # each column holds one of the ramp's values still


def test_the_description_keys_each_copy_apart():
    config = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3,
              "crop_pct": 0.875}
    plain = describe_transform(config, 64)
    assert SHIFT_COPY not in plain
    assert describe_transform({**config, SHIFT_COPY: 3}, 64) == {**plain, SHIFT_COPY: {"copy": 3, "max": SHIFT_MAX}}
    copy = describe_transform({**config, SHIFT_COPY: 3}, 64)
    assert repr(build_transform(copy, 64).transforms[0]) == "ShiftCopy(copy=3)"  # a description rebuilds it


def test_bad_augment_values_are_refused_naming_the_parameter_and_flag(augmented, tmp_path, cli_run):
    with pytest.raises(ParameterError, match="'augment'") as err:
        train_probe(augmented["train"], tmp_path / "p", augment=-1)
    assert err.value.param == "augment" and not (tmp_path / "p").exists()
    result = cli_run("probe", augmented["train"], "-o", tmp_path / "p", "--augment", "-1", ok=False)
    assert result.exit_code != 0 and "'--augment'" in result.output and not (tmp_path / "p").exists()


def test_augment_refuses_multilabel_codes(augmented, multilabel_codes, tmp_path, cli_run):
    codes = multilabel_codes(store_images(FeatureStore(augmented["test"])))
    result = cli_run("probe", codes, "-o", tmp_path / "p", "--augment", 1, ok=False)
    assert result.exit_code != 0 and "Invalid value for '--augment': is for codes of one class per image" in \
        result.output
    assert not (tmp_path / "p").exists()


def test_augment_needs_the_images_the_codes_were_made_from(orphan_codes, tmp_path, cli_run):
    codes, gone = orphan_codes
    result = cli_run("probe", codes, "-o", tmp_path / "p", "--augment", 2, "--C", 1, ok=False)
    assert result.exit_code != 0 and "Invalid value for '--augment': needs the images of" in result.output
    assert str(gone) in result.output and not (tmp_path / "p").exists()
