"""BatchNorm folding: exact on real networks and real images, refused where the wiring is not conv -> bn."""

from __future__ import annotations

import copy
import logging
import re

import numpy as np
import pytest
import timm
import timm.data
import torch
from torch import nn

from transferkit.codes import ort_engine
from transferkit.codes.extractor import FeatureExtractor
from transferkit.data.datasets import open_dataset
from transferkit.models.fold_bn import fold_batchnorm, fold_checked

TOL = {"rtol": 1e-4, "atol": 1e-4}


def photo_batch(sample_images, model: nn.Module, size: int) -> torch.Tensor:
    cfg = {**timm.data.resolve_model_data_config(model), "input_size": (3, size, size), "crop_pct": 1.0}
    transform = timm.data.create_transform(**cfg)
    return torch.stack([transform(img) for img in sample_images.values()])


def test_lite0_folds_every_batchnorm_and_keeps_its_logits(lite0, sample_images):
    x = photo_batch(sample_images, lite0, 224)  # china.jpg and flower.jpg
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in lite0.modules())
    folded = copy.deepcopy(lite0)
    assert fold_batchnorm(folded) == n_bn == 49
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), lite0(x), **TOL)
        assert folded(x).argmax(1).tolist() == lite0(x).argmax(1).tolist()
    assert isinstance(folded.bn1, nn.Sequential) and isinstance(folded.bn1[0], nn.ReLU6)  # BN's act is kept


def test_resnet_with_real_statistics(sample_images):
    model = timm.create_model("resnet18", pretrained=False).eval()
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():  # non-trivial statistics, as trained weights would have
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    x = photo_batch(sample_images, model, 160)
    folded, n = fold_checked(model, x)
    assert n == 20  # 17 convs + 3 downsample convs, each followed by its BatchNorm
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), **TOL)


class NormFirst(nn.Module):
    """conv and bn registered in that order, but bn runs first: sibling order is not data flow."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.conv(self.bn(x))


def test_wrong_wiring_is_caught_and_the_original_kept(caplog):
    model = NormFirst().eval()
    with torch.no_grad():
        model.bn.running_mean.fill_(0.5)
        model.bn.running_var.fill_(4.0)
    x = torch.randn(2, 3, 16, 16)
    with caplog.at_level(logging.WARNING):
        kept, n = fold_checked(model, x)
    assert kept is model and n == 0 and "running unfolded" in caplog.text
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(NormFirst().train())


def test_extractor_codes_with_and_without_folding(photo_folder):
    data = open_dataset(photo_folder)
    kw = {"weights": "package", "layer": "blocks.4,pre_logits", "pool": "avg,2x2", "image_size": 64,
          "precision": "fp32"}
    folded = FeatureExtractor(**kw, engine="torch").fit()
    plain = FeatureExtractor(**kw, engine="torch", fold_bn=False).fit()
    assert folded.folded_ is None  # folding waits for the first batch (a cached run never needs it)
    a, b = folded.transform(data), plain.transform(data)
    assert folded.folded_ == 49 and plain.folded_ == 0
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


def test_torch_auto_precision_is_bf16_weights_where_the_cpu_runs_bf16(photo_folder, tmp_path):
    from transferkit.jobs import extract_features
    from transferkit.runtime.device import cpu_has_bf16

    data = open_dataset(photo_folder)
    auto = FeatureExtractor(weights="package", image_size=64, engine="torch").fit()
    fp32 = FeatureExtractor(weights="package", image_size=64, precision="fp32", engine="torch").fit()
    want = "bf16" if cpu_has_bf16() else "fp32"
    assert auto.precision_ == want and fp32.precision_ == "fp32"
    a, b = auto.transform(data), fp32.transform(data)
    assert next(auto._engine.net.parameters()).dtype == (torch.bfloat16 if want == "bf16" else torch.float32)
    assert next(auto.backbone_.parameters()).dtype == torch.float32  # the run casts a copy: fitted state stays
    assert a.dtype == np.float32
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99  # bf16 keeps ~3 significant digits; the codes point the same way
    store = extract_features(photo_folder, tmp_path / "codes", weights="package", image_size=64, engine="torch",
                             progress=False)
    assert store.meta["precision"] == want and store.meta["folded_batchnorms"] == 49  # the resolved choice
    assert store.meta["engine"] == "torch"


def test_onnxruntime_engine_matches_eager_fp32_and_is_reused(photo_folder, tmp_path, code_cache, caplog, cli_run):
    """The exported engine gives the eager fp32 codes (tolerance: 1e-4 of the largest code), every key;
    the file is cached, and 'auto' then uses it even for a few images; 'auto' on a few images and no
    file stays with torch (an export would cost more than it saves)."""
    from transferkit.jobs import extract_features
    from transferkit.runtime.device import resolve_precision

    data = open_dataset(photo_folder)
    kw = {"weights": "package", "layer": "blocks.2,pre_logits", "pool": "avg,2x2", "image_size": 48}
    eager = FeatureExtractor(**kw, precision="fp32", fold_bn=False, engine="torch").fit()
    want = eager.transform(data)
    small = FeatureExtractor(**kw).fit()
    small.transform(data)  # 16 images: an export would cost more than it saves
    assert small.engine_ == "torch" and small.precision_ == resolve_precision("auto", torch.device("cpu"))
    assert not list(code_cache.rglob("*.onnx"))
    ort = FeatureExtractor(**kw, engine="onnxruntime").fit()
    got = ort.transform(data)
    assert ort.engine_ == "onnxruntime" and ort.folded_ == 49
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    files = list((code_cache / "engines").glob("*.onnx"))
    assert len(files) == 1
    store = extract_features(photo_folder, tmp_path / "codes", **kw, cache=False, progress=False)
    assert store.meta["engine"] == "onnxruntime" and store.meta["precision"] == "fp32"  # auto: the file is there
    assert store.meta["folded_batchnorms"] == 49  # read from the file: a cached engine folds nothing itself
    np.testing.assert_allclose(np.concatenate([store.load(k) for k in ort.keys_], 1), want, rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())
    info = cli_run("cache", "info", ok=False, catch=True)
    assert info.exit_code == 0 and "1 exported ONNX Runtime engine(s)" in info.output, info.output
    # a broken file is reported, deleted and built again (tests/test_faults.py damages it in subtler ways)
    files[0].write_bytes(b"not an onnx file")
    broken = FeatureExtractor(**kw).fit()
    with caplog.at_level(logging.WARNING):
        codes = broken.transform(data)
    assert broken.engine_ == "onnxruntime" and "failed verification" in caplog.text and files[0].stat().st_size > 1000
    np.testing.assert_allclose(codes, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    files[0].write_bytes(b"an engine left behind")
    out = cli_run("cache", "clean", ok=False, catch=True)
    assert out.exit_code == 0 and "1 engine(s)" in out.output and not list(code_cache.rglob("*.onnx")), out.output


def test_batch_normalisation_equals_the_per_image_transform(photo_folder):
    """Workers hand over uint8 images and the batch is scaled and normalised at once: bit for bit what
    timm's per-image transform gives, at the pretrained size (resize + crop) and at a custom size."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    images = [Image.fromarray(a) for a in load_sample_images().images]
    images += [open_dataset(photo_folder).image(i) for i in range(3)]
    for size in (None, 48):
        fe = FeatureExtractor(weights="package", image_size=size).fit()
        for img in images:
            torch.testing.assert_close(fe.normalize(fe.decode_(img)[None])[0], fe.transform_(img), rtol=0, atol=0)


def test_cli_profile_times_decoding_and_the_model(photo_folder, tmp_path, cli_run):
    out = cli_run("extract", photo_folder, "-o", tmp_path / "c", "--weights", "package", "--image-size", "32",
                  "--profile", catch=True)
    line = next(x for x in out.output.splitlines() if x.startswith("profile on 16 images"))
    found = re.search(r"decoding (\d+) img/s in one thread, (\d+) in (\d+) \(at the size needed\); model (\d+) img/s "
                      r"\(torch, \w+\); (.*)$", line)
    assert found and all(int(v) > 0 for v in found.groups()[:4]), line
    one, _, threads, model_rate = (int(v) for v in found.groups()[:4])
    decoding = f"decoding is the bottleneck, so extract decodes in {threads} threads"
    model = "the model is the bottleneck, so extract decodes in turn"
    expected = {decoding, model} if one == model_rate else {decoding if one < model_rate else model}  # rounded
    assert found.group(5) in expected, line
    # 16 images: too few to time candidates on a machine without timings, and it says so
    assert re.search(r"^engine: torch \w+: 16 images at 32 px are too few to time", out.output, re.M), out.output


def test_int8_engine_stays_near_fp32_on_real_images_and_is_shared(tmp_path, code_cache, caplog):
    """--precision int8: quantized once from the fp32 export, calibrated on fixed photo crops (not the data).
    Tolerances, against eager fp32 on scikit-learn's handwritten digits (a domain far from the photos):
    codes' cosine >= 0.98 on average and >= 0.95 for every image (measured: 0.996, 0.987); a linear probe
    within 1 point (measured: 95.23% both).
    The file is cached and shared: 'auto' uses it for any run, a rebuild gives the same codes, and a broken
    file is rebuilt."""
    from sklearn.datasets import load_digits

    from transferkit.probe.linear import LinearProbe

    digits = load_digits()
    images, y = (digits.images * 255 / 16).astype(np.uint8), digits.target  # 1,797 real 8x8 scans
    kw = {"weights": "package", "layer": "blocks.4,pre_logits", "pool": "avg", "image_size": 48}
    eager = FeatureExtractor(**kw, precision="fp32", fold_bn=False, engine="torch").fit().transform(images)
    int8 = FeatureExtractor(**kw, precision="int8").fit()
    codes = int8.transform(images)
    assert int8.engine_ == "onnxruntime" and int8.precision_ == "int8" and int8.folded_ == 49
    assert int8.int8_cosine_ >= ort_engine.MIN_COSINE  # measured on held-out photo crops when it was built
    files = sorted((code_cache / "engines").glob("*.onnx"))
    assert [f.name.endswith("-int8.onnx") for f in files].count(True) == 1 and len(files) == 2  # fp32, then int8
    cos = ort_engine.cosine(codes, eager)
    assert cos.mean() >= 0.98 and cos.min() >= 0.95, (cos.mean(), cos.min())
    n = 1000
    acc = {name: LinearProbe(C=0.01).fit(x[:n], y[:n]).score(x[n:], y[n:]) for name, x in
           (("fp32", eager), ("int8", codes))}
    assert acc["fp32"] > 0.9 and abs(acc["int8"] - acc["fp32"]) <= 0.01, acc
    auto = FeatureExtractor(**kw).fit().plan(16)  # 16 images would never repay a quantization; the file is there
    assert auto.precision_ == "int8"
    assert FeatureExtractor(**{**kw, "image_size": 40}).fit().plan(16).precision_ != "int8"  # no file at 40 px
    int8_file = next(f for f in files if f.name.endswith("-int8.onnx"))
    int8_file.write_bytes(b"truncated")
    again = FeatureExtractor(**kw, precision="int8").fit()
    with caplog.at_level(logging.WARNING):
        rebuilt = again.transform(images[:64])
    assert "failed verification" in caplog.text and again.precision_ == "int8" and int8_file.stat().st_size > 10**6
    np.testing.assert_allclose(rebuilt, codes[:64], rtol=0, atol=1e-5 * np.abs(codes).max())  # deterministic


def test_int8_falls_back_to_fp32_when_quantization_strays(photo_folder, code_cache, monkeypatch, caplog):
    """A quantized file whose codes stray from fp32 (here: a bar no int8 file can meet) is not kept: 'auto'
    warns and runs unquantized, an explicit --precision int8 stops with the reason."""
    from transferkit.errors import ModelError

    monkeypatch.setattr(ort_engine, "MIN_COSINE", 1.01)
    kw = {"weights": "package", "image_size": 32}
    with caplog.at_level(logging.WARNING):  # a run this long would try int8 (transferkit.codes.timing)
        auto = FeatureExtractor(**kw).fit().plan(10**8)
    assert "int8 codes point away from fp32" in caplog.text and auto.precision_ != "int8"
    assert "not built: onnxruntime int8" in auto.engine_choice_["why"]
    assert not list(code_cache.rglob("*-int8.onnx"))
    with pytest.raises(ModelError, match="could not be quantized.*precision 'fp32'"):
        FeatureExtractor(**kw, precision="int8").fit().plan(16)
    with pytest.raises(ModelError, match="'int8' runs in ONNX Runtime"):
        FeatureExtractor(**kw, precision="int8", engine="torch").fit()
