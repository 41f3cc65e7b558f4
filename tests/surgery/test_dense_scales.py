"""Dense prediction at chosen scales (issue 18, item 6) and probabilities in every dense map (item 4), on real photos.

At scale 1 the maps are today's, to the bit; a larger short side gives more cells; several scales average to
per-cell distributions on the finest grid; the top-class map is written atomically and only where transferkit
may write; a wrong --class, --scale or --short-side is one error line naming the flag.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from transferkit.data.decode import load_image
from transferkit.runtime.outputs import OutputError
from transferkit.surgery.dense import dense_predict, load_classifier
from transferkit.surgery.multiscale import _resample
from transferkit.surgery.receptive_field import receptive_field


@pytest.fixture(scope="module")
def clf():
    return load_classifier("tf_efficientnet_lite0", weights="package")


@pytest.fixture()
def china(tmp_path, sample_images) -> Path:
    path = tmp_path / "china.jpg"  # 427x640
    sample_images["china.jpg"].save(path)
    return path


def test_scale_1_is_todays_dense_output_and_a_larger_short_side_gives_a_finer_map(clf, china, tmp_path):
    x = clf.preprocess(load_image(china))
    with torch.no_grad():
        want, field = receptive_field(clf.net, x)  # what dense_predict computed before scales existed
    want = want[0]
    row = dense_predict(clf, china, tmp_path / "d", scale=1.0)
    with np.load(tmp_path / "d" / "china.npz") as z:
        np.testing.assert_array_equal(z["scores"], want.numpy())  # parity: bit for bit
        np.testing.assert_array_equal(z["probabilities"], want.softmax(0).numpy())
        np.testing.assert_array_equal(z["top_class"], want.argmax(0).numpy())
        np.testing.assert_allclose(z["centres"], field.centres().numpy(), atol=1e-9)
        np.testing.assert_allclose(z["boxes"], field.boxes().numpy(), atol=1e-9)
    mean = want.mean((1, 2))
    assert [t["label"] for t in row["top"]] == [clf.classes[k] for k in mean.argsort(descending=True)[:5]]
    assert row["top"][0]["mean_score"] == pytest.approx(float(mean.max()))
    assert row["top"][0]["probability"] == pytest.approx(float(mean.softmax(0).max()))
    assert row["map_size"] == [14, 20] and row["probability"] == "softmax of the logits"
    image = load_image(china)
    coarse, fine = clf.maps(image, short_side=96), clf.maps(image, short_side=192)
    assert coarse.probabilities.shape[1:] == (3, 5) and fine.probabilities.shape[1:] == (6, 9)  # ceil(side / 32)
    assert fine.field.x.jump == pytest.approx(640 / 288 * 32)  # cells in the image's own pixels: 71 px apart


def test_several_scales_average_to_distributions_on_the_finest_grid(clf, china, tmp_path):
    sides = [96, 160, 224]
    row = dense_predict(clf, china, tmp_path / "d", short_side=sides, classes=["palace", "stupa"])
    assert row["map_size"] == [7, 11]  # 224x336 at stride 32: the finest of the three
    assert [s["input_size"] for s in row["scales"]] == [[96, 144], [160, 240], [224, 336]]
    with np.load(tmp_path / "d" / "china.npz") as z:
        assert z["probabilities"].shape == (1000, 7, 11) and "scores" not in z  # raw scores do not average
        np.testing.assert_allclose(z["probabilities"].sum(0), 1, atol=1e-5)  # every cell a distribution
        np.testing.assert_array_equal(z["top_class"], z["probabilities"].argmax(0))
        assert z["input_sizes"].tolist() == [[96, 144], [160, 240], [224, 336]]
        image_p = z["image_probabilities"]
    image = load_image(china)
    singles = [clf.maps(image, short_side=s) for s in sides]  # each scale alone, averaged by hand
    np.testing.assert_allclose(image_p, np.mean([m.image_probabilities.numpy() for m in singles], 0), atol=1e-6)
    finest = singles[-1]  # resampling a map onto its own cells changes nothing
    torch.testing.assert_close(_resample(finest.probabilities, finest.field, finest.field), finest.probabilities)
    for name in ("china-heatmap.png", "china-classes.png"):
        assert (tmp_path / "d" / name).stat().st_size > 10_000


def test_class_map_is_written_atomically_and_only_over_transferkit_files(clf, china, tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "china-classes.png").write_bytes(b"my own picture")
    with pytest.raises(OutputError, match="not written by transferkit"):
        dense_predict(clf, china, mine, short_side=64)
    assert [p.name for p in mine.iterdir()] == ["china-classes.png"]
    assert (mine / "china-classes.png").read_bytes() == b"my own picture"
    out = tmp_path / "maps"
    dense_predict(clf, china, out, short_side=64)
    first = (out / "china-classes.png").read_bytes()
    assert first.startswith(b"\x89PNG\r\n\x1a\n")
    write_bytes = Path.write_bytes

    def disk_full_halfway(self, data):  # the disk fills up while the class map's bytes go out
        if self.name.startswith(".china-classes.png."):
            write_bytes(self, data[:len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", disk_full_halfway)
    with pytest.raises(OSError, match="No space"):
        dense_predict(clf, china, out, short_side=96)
    monkeypatch.undo()
    assert (out / "china-classes.png").read_bytes() == first  # the previous map, whole; no temp file left
    assert sorted(p.name for p in out.iterdir()) == [".transferkit-output.json", "china-classes.png",
                                                     "china-heatmap.png", "china.npz"]


def test_bad_class_scale_and_short_side_are_one_line_errors_naming_the_flag(china, tmp_path, cli_run):
    out = tmp_path / "d"
    base = ("predict", "test_resnet", china, "--dense", "--weights", "random", "-o", out)
    for args, flag, text in [(("--class", "goldfsh"), "--class", "did you mean 'goldfish'?"),
                             (("--short-side", "16"), "--short-side", "to at least 32x32 (one stride"),
                             (("--scale", "0.5", "--scale", "20"), "--scale", "at most 40 megapixels")]:
        result = cli_run(*base, *args, ok=False)
        errors = [line for line in result.output.splitlines() if line.startswith("Error")]
        assert result.exit_code == 1 and len(errors) == 1, result.output
        assert errors[0].startswith(f"Error: Invalid value for '{flag}': ") and text in errors[0], errors[0]
    assert not out.exists()  # refused before anything was written
    result = cli_run(*base, "--scale", "0", ok=False)  # click checks the range before anything loads
    assert result.exit_code == 2 and "'--scale'" in result.output
    result = cli_run("predict", tmp_path, china, "--class", "x", ok=False)
    assert result.exit_code == 2 and "need --dense" in result.output


def test_probe_maps_are_calibrated_probabilities_of_its_margins_and_scales_help(tmp_path, photo_folder, sample_images,
                                                                               cli_run):
    """A probe trained on 64 px crops (200 px of the photos, shrunk 3x): the dense map prints probabilities that
    say what they are, and a hint names --short-side when the photo is far larger than the training items."""
    from transferkit.jobs import extract_features, train_probe

    extract_features(photo_folder, tmp_path / "codes", weights="package", image_size=64, progress=False)
    train_probe(tmp_path / "codes", tmp_path / "probe", cv=2)
    flower = tmp_path / "flower.jpg"
    sample_images["flower.jpg"].save(flower)
    result = cli_run("predict", tmp_path / "probe", flower, "--dense", "-o", tmp_path / "d")
    lines = result.output.splitlines()
    from transferkit.probe.linear import LinearProbe

    t = LinearProbe.load(tmp_path / "probe" / "probe").temperature_  # the probe's own calibration reaches the map
    assert t is not None and f"# probabilities: softmax of the SVM margins / temperature {t:.3g} (calibrated)" in lines
    assert "hint: " in result.output and "--short-side 64 --short-side 128 --short-side 256" in result.output
    with np.load(tmp_path / "d" / "flower.npz") as z:
        np.testing.assert_allclose(z["probabilities"], (torch.from_numpy(z["scores"]) / t).softmax(0).numpy(),
                                   rtol=1e-5)
    result = cli_run("predict", tmp_path / "probe", flower, "--dense", "--json", "--short-side", "64",
                     "--short-side", "128")
    row = json.loads(result.output.strip().splitlines()[-1])
    assert row["top"][0]["label"] == "flower" and row["top"][0]["probability"] > 0.5, row["top"]
    assert sum(t["probability"] for t in row["top"]) == pytest.approx(1, abs=1e-5) and "hint" not in result.output


def test_maps_of_other_scales_are_sampled_where_the_finest_cells_lie():
    """Bilinear sampling through each field's own stride and offset reproduces a map that is linear in the
    image's pixels exactly, inside the coarse map; past its last cell the border cell's value holds."""
    from transferkit.surgery.receptive_field import Axis, Field

    coarse = Field(Axis(64, 100, 31.5), Axis(64, 100, 40.0), (4, 6), (256, 384))
    fine = Field(Axis(32, 60, 15.5), Axis(32, 60, 15.5), (8, 12), (256, 384))
    c = coarse.centres()  # (4, 6, 2) as (y, x)
    values = torch.stack([c[..., 0], c[..., 1]]).float()  # channel 0: y, channel 1: x, at every coarse cell
    got = _resample(values, coarse, fine)
    want = fine.centres().permute(2, 0, 1).float()
    lo, hi = c.reshape(-1, 2).min(0).values.float(), c.reshape(-1, 2).max(0).values.float()
    torch.testing.assert_close(got, torch.maximum(torch.minimum(want, hi.view(2, 1, 1)), lo.view(2, 1, 1)))


def test_a_size_below_one_stride_is_refused_naming_the_parameter(clf, china):
    from transferkit.errors import ParameterError

    with pytest.raises(ParameterError, match="at least 32x32") as err:
        clf.maps(load_image(china), short_side=[128, 16])
    assert err.value.param == "short_side"
