"""ONNX export: TF-"SAME" layers stay dynamic, the file matches torch at sizes it was not traced at, it describes
itself well enough to classify a real photo with onnxruntime alone, and the command is quiet.

Tolerance: onnxruntime vs torch, max |difference| <= RTOL (1e-4) x the largest |score| (fp32 on both sides;
only summation order differs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import onnx
import pytest
import torch
from timm.layers import create_conv2d, create_pool2d

from transferkit.errors import ModelError
from transferkit.surgery.dense import load_classifier, save_converted
from transferkit.surgery.export import PRODUCER, RTOL, check_onnx, export_onnx, written_here
from transferkit.surgery.onnx_same import exportable, register_symbolics

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is needed to run the exported files")


def test_same_layers_trace_to_one_node_each_and_stay_dynamic(tmp_path):
    """timm's SAME conv (odd, even and 1x1 kernels, stride 1-2) and SAME max/avg pools: one auto_pad node
    each, no Pad, and the traced graph matches timm at sizes other than the one traced, down to 1x1."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(create_conv2d(3, 8, 3, stride=2, padding="same"),
                              create_pool2d("max", 3, 2, padding="same"), create_pool2d("avg", 3, 2, padding="same"),
                              create_conv2d(8, 4, 4, stride=1, padding="same", bias=False),
                              create_conv2d(4, 4, 1, stride=2, padding="same"),
                              create_conv2d(4, 4, 5, stride=2, padding="same")).eval()
    swapped, n = exportable(net)
    assert n == 6
    register_symbolics()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(swapped, (torch.zeros(1, 3, 32, 32),), tmp_path / "same.onnx", dynamo=False,
                          input_names=["image"], dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}})
    graph = onnx.load(tmp_path / "same.onnx").graph
    assert "Pad" not in {node.op_type for node in graph.node}
    pads = [a.s for node in graph.node for a in node.attribute if a.name == "auto_pad"]
    assert pads == [b"SAME_UPPER"] * 6
    session = ort.InferenceSession(str(tmp_path / "same.onnx"), providers=["CPUExecutionProvider"])
    for b, h, w in [(1, 32, 32), (2, 37, 50), (1, 31, 29), (1, 100, 77), (1, 9, 8), (1, 1, 1)]:
        x = torch.randn(b, 3, h, w)
        with torch.no_grad():
            want = net(x).numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        assert got.shape == want.shape, (h, w)
        np.testing.assert_allclose(got, want, atol=1e-5)


class PadToMultiple(torch.nn.Module):
    """Pads H and W up to a multiple of 32, computed with Python ints: tracing freezes it at the export size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        return torch.nn.functional.pad(x, (0, -w % 32, 0, -h % 32))


def test_a_size_frozen_by_tracing_fails_the_check_and_writes_nothing(tmp_path):
    clf = load_classifier("test_resnet", weights="random")
    clf.net.trunk = torch.nn.Sequential(PadToMultiple(), clf.net.trunk)
    out = tmp_path / "frozen.onnx"
    with pytest.raises(ModelError, match="froze a size|differs from torch"):
        export_onnx(clf, out)
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The converted packaged EfficientNet-Lite0 exported by the real command in its own process (default
    logging, no -q): (converted dir, ONNX file, the process's stderr, the converted classifier)."""
    root = tmp_path_factory.mktemp("export")
    conv = root / "lite0-fc"
    clf = load_classifier("tf_efficientnet_lite0", weights="package")
    save_converted(clf, conv)
    onnx_file = root / "lite0.onnx"
    env = {**os.environ, "TRANSFERKIT_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "transferkit", "export", str(conv), "-o", str(onnx_file)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    return conv, onnx_file, proc.stderr, clf


def test_export_is_quiet_and_says_its_stages(exported):
    _, _, stderr, _ = exported
    lines = stderr.splitlines()
    assert len(lines) <= 5, stderr  # the stages and one summary; no exporter INFO, no tracer warnings
    assert [line for line in lines if line.startswith("export: ")] == [
        "export: loading...", "export: tracing...", "export: writing...", "export: checking..."]
    assert not any("onnx_ir" in line or "Warning" in line for line in lines), stderr


def test_exported_file_describes_itself(exported):
    _, onnx_file, _, clf = exported
    model = onnx.load(onnx_file)
    meta = {p.key: p.value for p in model.metadata_props}
    assert written_here(onnx_file) and meta[PRODUCER]
    assert json.loads(meta["classes"]) == clf.classes and len(clf.classes) == 1000
    assert json.loads(meta["mean"]) == pytest.approx(clf.mean) and json.loads(meta["std"]) == pytest.approx(clf.std)
    assert json.loads(meta["input_size"]) == [224, 224] and meta["layout"] == "NCHW"
    assert meta["input_format"] == "float" and meta["scores"] == "logits" and meta["multilabel"] == "false"
    assert meta["mean_is_logits"] == "true" and "softmax" in meta["probabilities"]
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (model.graph.input[0], model.graph.output[0])]
    assert dims == [["batch", 3, "height", "width"], ["batch", 1000, "map_height", "map_width"]]


def test_exported_file_matches_torch_at_sizes_it_was_not_traced_at(exported):
    _, onnx_file, _, clf = exported
    rows = check_onnx(clf, onnx_file, [(1, 224, 224), (2, 256, 320), (1, 231, 199), (1, 97, 33)])
    assert [r["map"] for r in rows] == [[7, 7], [8, 10], [8, 7], [4, 2]]  # ceil(size / 32): SAME padding


def test_onnxruntime_with_only_the_files_metadata_matches_predict(exported, sample_images, lite0, tmp_path, cli_run):
    """Classify a real photo with onnxruntime, preprocessing it only as the file's metadata says, and compare
    with `transferkit predict --dense` on the converted model (the same image at its own size)."""
    conv, onnx_file, _, _ = exported
    image = tmp_path / "flower.jpg"
    sample_images["flower.jpg"].save(image)
    result = cli_run("predict", conv, image, "--dense", "--json")
    want = json.loads(result.output.strip().splitlines()[-1])["top"]

    from PIL import Image

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    classes, mean, std = (json.loads(meta[k]) for k in ("classes", "mean", "std"))
    x = np.asarray(Image.open(image).convert("RGB"), np.float32) / 255  # as "input" says: RGB in [0, 1], ...
    x = ((x - np.array(mean, np.float32)) / np.array(std, np.float32)).transpose(2, 0, 1)[None]  # NCHW
    scores = session.run(["scores"], {"image": x})[0][0].mean((1, 2))  # "output": the mean over cells
    assert meta["probabilities"].startswith("softmax")  # "probabilities": a softmax of scores / "temperature"
    logits = scores / (json.loads(meta["temperature"]) or 1.0)
    probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    got = [{"label": classes[k], "probability": float(probabilities[k])} for k in np.argsort(-probabilities)[:5]]
    assert got[0]["label"] == want[0]["label"]
    by_label = {g["label"]: g["probability"] for g in got}
    for w in want[:3]:
        assert by_label[w["label"]] == pytest.approx(w["probability"], abs=1e-4)
    # at the training size the file says, the whole photo resized gives the original network's top class
    h, w = json.loads(meta["input_size"])
    small = np.asarray(Image.open(image).convert("RGB").resize((w, h), Image.BICUBIC), np.float32) / 255
    small = ((small - np.array(mean, np.float32)) / np.array(std, np.float32)).transpose(2, 0, 1)[None]
    with torch.no_grad():
        logits = lite0.eval()(torch.from_numpy(small))[0].numpy()
    onnx_logits = session.run(["scores"], {"image": small})[0][0].mean((1, 2))
    np.testing.assert_allclose(onnx_logits, logits, atol=RTOL * np.abs(logits).max())


def test_uint8_input_bakes_in_the_preprocessing(tmp_path, sample_images):
    """--input-format uint8-nhwc: raw photo pixels in, the same scores as the float file fed normalised images."""
    clf = load_classifier("test_resnet", weights="random")
    plain, raw = tmp_path / "float.onnx", tmp_path / "uint8.onnx"
    export_onnx(clf, plain)
    done = export_onnx(clf, raw, input_format="uint8-nhwc")
    assert [r["batch"] for r in done.checks] == [1, 2]
    pixels = np.asarray(sample_images["china.jpg"].resize((199, 131)))[None]  # (1, H, W, 3) uint8
    meta = ort.InferenceSession(str(raw)).get_modelmeta().custom_metadata_map
    assert (meta["input_format"], meta["layout"], meta["input_dtype"]) == ("uint8-nhwc", "NHWC", "uint8")
    x = ((pixels / 255 - np.array(clf.mean)) / np.array(clf.std)).astype(np.float32).transpose(0, 3, 1, 2)
    want = ort.InferenceSession(str(plain)).run(None, {"image": x})[0]
    got = ort.InferenceSession(str(raw)).run(None, {"image": pixels})[0]
    np.testing.assert_allclose(got, want, atol=RTOL * max(1.0, np.abs(want).max()))
    with pytest.raises(ModelError, match="'input_format' parameter"):
        export_onnx(clf, tmp_path / "x.onnx", input_format="uint16")
