"""The command line end to end on real photos and Fashion-MNIST, and its one-line errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

FMNIST = Path("/usr/share/datasets/fashion-mnist")
COMMANDS = ["extract", "sweep", "probe", "predict", "layers", "demo", "finetune"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command, cli_run):
    assert "Usage:" in cli_run(command, "--help").output


def test_layers(cli_run):
    out = cli_run("layers").output
    assert "blocks.4" in out and "pre_logits" in out and "1280" in out


def test_extract_sweep_probe_predict(photo_folder, tmp_path, sample_images, cli_run):
    codes, probe = tmp_path / "codes", tmp_path / "probe"
    out = cli_run("extract", photo_folder, "-o", codes, "--image-size", "64", "--layer", "auto", "--batch-size", "8")
    assert "16 images" in out.output and "sweep: best codes" in out.output
    assert (codes / "sweep.png").stat().st_size > 1000
    table = cli_run("sweep", codes, "--cv", "2").output
    assert "pre_logits" in table and "*" in table
    test_codes = tmp_path / "test-codes"
    cli_run("extract", photo_folder, "-o", test_codes, "--like", codes)
    assert len(json.loads((test_codes / "meta.json").read_text())["keys"]) == 1
    out = cli_run("probe", codes, "--layer", "best", "--test", test_codes, "-o", probe, "--cv", "2").output
    assert "test accuracy: 100.00%" in out
    assert (probe / "confusion.png").is_file() and (probe / "metrics.json").is_file()
    report = (probe / "report.txt").read_text()
    assert "flower" in report and "temple" in report  # class names, not label indices
    # unseen crops of the two photos are classified as what they show
    new = tmp_path / "new"
    new.mkdir()
    sample_images["flower.jpg"].crop((150, 100, 450, 400)).save(new / "daisy.png")
    sample_images["china.jpg"].crop((50, 50, 350, 350)).save(new / "temple.jpg")
    rows = [json.loads(line) for line in cli_run("predict", probe, new, "--json").output.splitlines()]
    assert {Path(r["source"]).name: r["label"] for r in rows} == {"daisy.png": "flower", "temple.jpg": "temple"}


@pytest.mark.skipif(not FMNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_fashion_mnist_slice(tmp_path, cli_run):
    train, test, probe = tmp_path / "train", tmp_path / "test", tmp_path / "probe"
    cli_run("extract", FMNIST / "train", "--per-class", "20", "--image-size", "32", "--layer", "blocks.4",
            "--pool", "2x2", "-o", train)
    cli_run("extract", FMNIST / "t10k", "--per-class", "30", "--like", train, "-o", test)
    out = cli_run("probe", train, "--test", test, "-o", probe, "--cv", "3").output
    accuracy = float(out.split("test accuracy: ")[1].split("%")[0])
    assert accuracy > 65.0, out  # 200 training images; chance is 10%


def _bad(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], result.output


def test_errors_name_the_culprit(photo_folder, tmp_path, cli_run):
    out = tmp_path / "codes"
    _bad(cli_run("extract", photo_folder, "-o", out, "--model", "resnet_18", ok=False), "unknown model 'resnet_18'")
    _bad(cli_run("extract", photo_folder, "-o", out, "--layer", "blocks.99", ok=False), "unknown layer 'blocks.99'")
    _bad(cli_run("extract", photo_folder, "-o", out, "--pool", "mean", ok=False), "'mean'")
    wrong = tmp_path / "wrong.pth"
    import torch

    torch.save({"w": torch.zeros(3)}, wrong)
    _bad(cli_run("extract", photo_folder, "-o", out, "--weights", wrong, ok=False), "wrong.pth", "do not match")
    assert not out.exists()
    bad = cli_run("finetune", photo_folder, "-o", tmp_path / "run", "--crop-scale", "0.6", ok=False)
    assert bad.exit_code == 2 and "--crop-scale" in bad.output and "'0.6'" in bad.output
    assert not (tmp_path / "run").exists()


def test_bad_data_errors(photo_folder, tmp_path, caplog, cli_run):
    out = tmp_path / "codes"
    cli_run("extract", photo_folder, "-o", out, "--image-size", "32")
    before = (out / "meta.json").read_bytes()
    bad = photo_folder / "flower" / "5.jpg"
    bad.write_bytes(bad.read_bytes()[:400])  # truncated JPEG
    _bad(cli_run("extract", photo_folder, "-o", out, "--image-size", "32", ok=False), "5.jpg", "truncated")
    _bad(cli_run("extract", photo_folder, "-o", out, "--num-workers", "1", ok=False), "5.jpg", "truncated")
    assert (out / "meta.json").read_bytes() == before  # the earlier output is untouched
    with caplog.at_level(logging.WARNING):
        skipped = cli_run("extract", photo_folder, "-o", out, "--image-size", "32", "--skip-bad")
    assert "15 images" in skipped.output
    assert json.loads((out / "meta.json").read_text())["skipped"][0]["source"].endswith("5.jpg")
    assert caplog.text.count("5.jpg") == 2 and "skipped 1 unreadable image(s)" in caplog.text  # one line: file, error
    (photo_folder / "empty").mkdir()
    _bad(cli_run("extract", photo_folder, "-o", out, ok=False), "empty")
    single = tmp_path / "single"
    (single / "only").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(single / "only" / "a.png")
    _bad(cli_run("extract", single, "-o", out, ok=False), "single", "class")
    csv = tmp_path / "m.csv"
    csv.write_text(f"path,label\n{photo_folder}/temple/0.png,a\nmissing/x.png,b\n")
    _bad(cli_run("extract", csv, "-o", out, ok=False), "m.csv", "line 3", "missing/x.png")


def test_probe_refuses_mismatched_test_codes(photo_folder, tmp_path, cli_run):
    a, b = tmp_path / "a", tmp_path / "b"
    cli_run("extract", photo_folder, "-o", a, "--image-size", "32")
    cli_run("extract", photo_folder, "-o", b, "--image-size", "48")
    _bad(cli_run("probe", a, "--test", b, "-o", tmp_path / "p", ok=False), "transform.input_size", "--like")
    _bad(cli_run("probe", a, "--layer", "best", "-o", tmp_path / "p", ok=False), "no sweep")


def test_int8_from_the_cli_and_like(photo_folder, tmp_path, cli_run):
    """`extract --precision int8` records how it was quantized; `--like` encodes the test set the same way, and a
    probe refuses to score int8 codes against unquantized ones."""
    train, like, fp32 = tmp_path / "train", tmp_path / "like", tmp_path / "fp32"
    cli_run("extract", photo_folder, "-o", train, "--image-size", "32", "--precision", "int8")
    meta = json.loads((train / "meta.json").read_text())
    assert meta["precision"] == "int8" and meta["engine"] == "onnxruntime"
    assert meta["int8"]["calibration"] == "sklearn sample photos" and meta["int8"]["mean_cosine_to_fp32"] >= 0.95
    cli_run("extract", photo_folder, "-o", like, "--like", train)
    assert json.loads((like / "meta.json").read_text())["precision"] == "int8"
    cli_run("extract", photo_folder, "-o", fp32, "--image-size", "32", "--precision", "fp32")
    _bad(cli_run("probe", train, "--test", fp32, "-o", tmp_path / "p", ok=False), "int8", "--like")
    assert "test accuracy: 100.00%" in cli_run("probe", train, "--test", like, "-o", tmp_path / "p", "--cv", "2").output


def test_finetune_thin_slice(photo_folder, tmp_path, cli_run):
    stages = cli_run("finetune", "--list-stages").output
    assert "blocks.6" in stages and "head" in stages
    _bad(cli_run("finetune", photo_folder, "-o", tmp_path / "r", "--freeze-until", "blocks.99", ok=False),
         "blocks.99", "blocks.4")
    out = cli_run("finetune", photo_folder, "-o", tmp_path / "run", "--model", "test_resnet", "--weights", "random",
                  "--freeze-until", "layer3", "--epochs", "1", "--batch-size", "4", "--image-size", "32",
                  "--val-fraction", "0.25").output
    assert "validation accuracy" in out
    assert {"config.json", "metrics.csv", "model-best.safetensors"} <= {p.name for p in (tmp_path / "run").iterdir()}
