"""The command line end to end on real photos and Fashion-MNIST, and its one-line errors."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from transferkit.cli import cli
from transferkit.errors import ParameterError
from transferkit.finetune.config import FinetuneConfig

FMNIST = Path("/usr/share/datasets/fashion-mnist")
COMMANDS = ["extract", "sweep", "probe", "predict", "layers", "demo", "finetune"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command, cli_run):
    assert "Usage:" in cli_run(command, "--help").output


def test_help_says_codes(cli_run):
    """One word for the pooled activations: codes, in a codes directory (what `extract` writes)."""
    helps = {c: cli_run(*c.split(), "--help").output for c in [*COMMANDS, "evaluate", "convert", "cache", "cache info"]}
    assert not [c for c, text in helps.items() if "feature" in text.lower()]
    assert "Usage: cli sweep [OPTIONS] CODES" in helps["sweep"] and "CODES (a codes directory)" in helps["sweep"]
    assert "Codes directory to write." in helps["extract"] and "like this codes directory" in helps["extract"]
    assert "Codes directory to evaluate on" in helps["probe"]


def test_layers(cli_run):
    out = cli_run("layers").output
    assert "blocks.4" in out and "pre_logits" in out and "1280" in out
    assert out == cli_run("finetune", "--list-stages").output  # one table, one vocabulary
    resnet = cli_run("layers", "test_resnet").output
    assert resnet == cli_run("finetune", "--list-stages", "--model", "test_resnet").output and "layer3" in resnet


def test_extract_reads_every_stage_the_table_lists(photo_folder, tmp_path, cli_run):
    """`--layer` takes the names and indices `--list-stages` prints, also stages outside timm's feature_info."""
    args = ["extract", photo_folder, "--weights", "package", "--image-size", "32", "--precision", "fp32",
            "--engine", "torch", "--no-cache"]
    cli_run(*args, "--layer", "stem,blocks.3,6", "-o", tmp_path / "codes")
    meta = json.loads((tmp_path / "codes" / "meta.json").read_text())
    assert list(meta["keys"]) == ["stem|avg", "blocks.3|avg", "blocks.5|avg"]
    assert [meta["keys"][k]["dim"] for k in meta["keys"]] == [32, 80, 192]
    _bad(cli_run(*args, "--layer", "head", "-o", tmp_path / "head", ok=False),
         "Error: Invalid value for '--layer': must be a stage index or name of tf_efficientnet_lite0: 0 (stem), ",
         "'head' has no feature map (its pooled features are 'pre_logits'); Got 'head' instead.")
    assert not (tmp_path / "head").exists()


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
    bad = cli_run("probe", codes, "--layer", "best", "-o", tmp_path / "bad", "--C", "-1", ok=False)
    _bad(bad,  # LinearProbe's 'C' parameter is the flag --C
         "Error: Invalid value for '--C': must be a float in the range (0.0, inf) or a str among {'auto'}. "
         "Got -1.0 instead.")
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
    _bad(cli_run("extract", photo_folder, "-o", out, "--layer", "blocks.99", ok=False),
         "Invalid value for '--layer'", "Got 'blocks.99' instead")
    _bad(cli_run("extract", photo_folder, "-o", out, "--pool", "mean", ok=False), "'mean'")
    wrong = tmp_path / "wrong.pth"
    torch.save({"w": torch.zeros(3)}, wrong)
    _bad(cli_run("extract", photo_folder, "-o", out, "--weights", wrong, ok=False), "wrong.pth", "do not match")
    _bad(cli_run("extract", photo_folder, "-o", out, "--weights", "banana", ok=False),
         "Error: Invalid value for '--weights': must be a file (.safetensors, ", "Got 'banana' instead.")
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
    _bad(cli_run("probe", a, "--test", b, "-o", tmp_path / "p", ok=False), "transform.input_size", f"with like='{a}'")
    _bad(cli_run("probe", a, "--layer", "best", "-o", tmp_path / "p", ok=False), "one kind of codes", "layer='all'")


def test_probe_picks_the_codes_of_several_views(photo_folder, tmp_path, cli_run):
    """Codes of several layers: no --layer is an error naming --layer best (no sweep yet); --layer best sweeps
    first; after that, no --layer means the sweep's best."""
    codes = tmp_path / "codes"
    cli_run("extract", photo_folder, "-o", codes, "--image-size", "32", "--layer", "all", "--pool", "avg")
    _bad(cli_run("probe", codes, "-o", tmp_path / "p", ok=False), "Invalid value for '--layer'", "layer='best'",
         "pre_logits|avg")
    assert not (tmp_path / "p").exists()
    best = cli_run("probe", codes, "--layer", "best", "-o", tmp_path / "p", "--cv", "2").output
    assert (codes / "sweep.json").is_file()
    key = json.loads((tmp_path / "p" / "metrics.json").read_text())["key"]
    assert f"probe on {key}" in best
    cli_run("probe", codes, "-o", tmp_path / "p2", "--cv", "2")
    assert json.loads((tmp_path / "p2" / "metrics.json").read_text())["key"] == key


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
    _bad(cli_run("probe", train, "--test", fp32, "-o", tmp_path / "p", ok=False), "int8", f"with like='{train}'")
    assert "test accuracy: 100.00%" in cli_run("probe", train, "--test", like, "-o", tmp_path / "p", "--cv", "2").output


def test_finetune_thin_slice(photo_folder, tmp_path, cli_run):
    stages = cli_run("finetune", "--list-stages").output
    assert "blocks.6" in stages and "head" in stages
    _bad(cli_run("finetune", photo_folder, "-o", tmp_path / "r", "--freeze-until", "blocks.99", ok=False),
         "Error: Invalid value for '--freeze-until': must be 'none', 'head', a stage index or a stage name: ",
         "blocks.4", "Got 'blocks.99' instead.")
    out = cli_run("finetune", photo_folder, "-o", tmp_path / "run", "--model", "test_resnet", "--weights", "random",
              "--freeze-until", "layer3", "--epochs", "1", "--batch-size", "4", "--image-size", "32",
              "--val-fraction", "0.25").output
    assert "validation accuracy" in out
    assert {"config.json", "metrics.csv", "model-best.safetensors"} <= {p.name for p in (tmp_path / "run").iterdir()}


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused only without CUDA")
def test_library_errors_name_the_parameter_and_the_cli_the_flag(photo_folder, tmp_path, cli_run):
    config = FinetuneConfig(model="test_resnet", weights="random", precision="fp16")
    with pytest.raises(ParameterError, match="^The 'precision' parameter must not be fp16 here: fp16 needs a CUDA") \
            as err:
        config.validate()
    assert err.value.param == "precision"
    _bad(cli_run("finetune", photo_folder, "-o", tmp_path / "run", "--model", "test_resnet", "--weights", "random",
             "--precision", "fp16", ok=False),
         "Error: Invalid value for '--precision': must not be fp16 here: fp16 needs a CUDA device; use bf16 on CPU")
    assert not (tmp_path / "run").exists()


def test_nested_groups_name_the_flag_too():
    """`transferkit cache ...`: the group that ran the command maps the parameter to its flag."""
    assert isinstance(cli.commands["cache"], type(cli))

    @click.group(cls=type(cli))
    def top() -> None: ...

    @top.group()
    def inner() -> None: ...

    @inner.command()
    @click.option("-n", "--max-rows")
    def leaf(max_rows: str) -> None:
        raise ParameterError(f"The 'max_rows' parameter of leaf must be >= 1. Got {max_rows} instead.",
                             param="max_rows")

    @inner.command()
    def other() -> None:
        raise ParameterError("The 'rows' parameter of other must be >= 1. Got 0 instead.", param="rows")

    result = CliRunner().invoke(top, ["inner", "leaf", "-n", "0"], catch_exceptions=False)
    assert (result.exit_code, result.output) == (1, "Error: Invalid value for '--max-rows': must be >= 1. "
                                                    "Got 0 instead.\n")
    result = CliRunner().invoke(top, ["inner", "other"], catch_exceptions=False)  # no flag binds it: as raised
    assert (result.exit_code, result.output) == (1, "Error: The 'rows' parameter of other must be >= 1. "
                                                    "Got 0 instead.\n")


@pytest.mark.parametrize("args", [["--help"], ["recipes"], ["extract", "/no/such/data", "-o", "out"],
                                  ["run", "small-similar", "/no/such/data"], ["summary", "--image-size", "7"]],
                         ids=lambda a: " ".join(a))
def test_start_up_answers_before_torch_loads(args, tmp_path):
    """Help, the recipe list and argument errors come before torch, timm or scikit-learn load (1-4 s each on 2
    cores): checked by what the process imported, which timing on a shared machine could not show."""
    last, stderr = _heavy_imports(args, tmp_path)
    assert last.startswith("HEAVY []"), (last, stderr)
    assert last.endswith(" 0") == (args[0] in ("--help", "recipes")), (last, stderr)  # errors exit 2


def _heavy_imports(args: list, cwd: Path) -> tuple[str, str]:
    """Run `transferkit ARGS` in a fresh process: its last line ('HEAVY [heavy modules it imported] exit code'),
    and its stderr."""
    code = ("import sys\nfrom transferkit.cli import main\nsys.argv = ['transferkit', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
            "print('HEAVY', [m for m in ('torch', 'timm', 'sklearn') if m in sys.modules], code)")
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=120)
    return done.stdout.strip().splitlines()[-1], done.stderr


def test_a_model_refused_once_refuses_before_torch_loads(photo_folder, tmp_path, code_cache):
    """After the library refused a layer or stage of a model, its vocabulary is remembered (per timm version, in
    the cache root): the CLI then refuses an unknown --layer or --freeze-until without torch, in the library's
    words; a damaged table is ignored (the library checks as before)."""
    import timm

    from transferkit.models.layers import resolve_layers
    from transferkit.models.vocabulary import vocabulary_file

    model = ["--model", "test_resnet", "--weights", "random"]  # no table ships for it
    with pytest.raises(ParameterError) as refused:
        resolve_layers(timm.create_model("test_resnet", pretrained=False), "zz")
    last, stderr = _heavy_imports(["extract", photo_folder, "-o", tmp_path / "c", "--layer", "layer2,zz", *model],
                                  tmp_path)
    assert last == "HEAVY [] 1" and not (tmp_path / "c").exists(), (last, stderr)
    said = str(refused.value).removeprefix("The 'layer' parameter ")
    assert f"Error: Invalid value for '--layer': {said}" in stderr.splitlines()
    last, stderr = _heavy_imports(["finetune", photo_folder, "-o", tmp_path / "r", "--freeze-until", "zz", *model],
                                  tmp_path)
    assert last == "HEAVY [] 1" and "Invalid value for '--freeze-until'" in stderr and "Got 'zz' instead" in stderr
    file = vocabulary_file("test_resnet")
    assert file.is_relative_to(code_cache)
    file.write_text('{"model": "test_resnet", "accepted": 3}')  # damaged: no early answer
    last, _ = _heavy_imports(["extract", photo_folder, "-o", tmp_path / "c", "--layer", "zz", "--image-size", "32",
                              *model], tmp_path)
    assert last.startswith("HEAVY ['torch'") and last.endswith(" 1")  # the library refused it, after loading


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_the_packaged_models_tables_ship_and_answer_on_a_fresh_cache(name, photo_folder, tmp_path, code_cache):
    """The models whose weights transferkit installs ship their vocabulary for this timm version, equal to what the
    network says: a first bad --layer or --freeze-until is refused before torch loads, even on an empty cache.
    (After a timm upgrade: write the new tables with models.vocabulary.write_vocabulary(vocabulary(net),
    SHIPPED).)"""
    import timm

    from transferkit.models.layers import vocabulary
    from transferkit.models.vocabulary import SHIPPED, vocabulary_file

    shipped = vocabulary_file(name, SHIPPED)
    assert shipped.is_file(), f"no table for this timm version: {shipped}"
    assert json.loads(shipped.read_text()) == vocabulary(timm.create_model(name, pretrained=False))
    assert not any(code_cache.iterdir())
    for args in (["extract", photo_folder, "-o", tmp_path / "c", "--layer", "blocks.9"],
                 ["finetune", photo_folder, "-o", tmp_path / "r", "--freeze-until", "12"]):
        last, stderr = _heavy_imports([*args, "--model", name], tmp_path)
        assert last == "HEAVY [] 1" and ("Got 'blocks.9' instead" in stderr or "Got '12' instead" in stderr), (
            last, stderr)
    assert not (tmp_path / "c").exists() and not (tmp_path / "r").exists()


def test_argument_errors_come_before_torch_loads(photo_folder, tmp_path):
    """Unknown model names (checked against timm's names shipped for this timm version, which a test here keeps
    equal to timm.list_models()), a bad --pool, a folder that is no codes directory, a missing run, a bad recipe
    field: each one line, exit 1, before torch or timm load (run --set validates with scikit-learn's checker)."""
    import timm

    from transferkit.models.vocabulary import model_names_file

    assert model_names_file().read_text().split() == timm.list_models()
    not_codes = tmp_path / "not-codes"
    not_codes.mkdir()
    cases = {
        ("extract", photo_folder, "-o", "c", "--model", "resnet5"): "unknown model 'resnet5'. Did you mean: resnet50",
        ("finetune", photo_folder, "-o", "r", "--model", "lite0"): "unknown model 'lite0'",
        ("layers", "efficientnet_lite9"): "unknown model 'efficientnet_lite9'. Did you mean",
        ("export", "no/such/run", "-o", "f.onnx"): "'no/such/run': no such run, probe or converted model",
        ("summary", "bogus_net"): "unknown model 'bogus_net'",
        ("extract", photo_folder, "-o", "c", "--pool", "mean"): "Invalid value for '--pool': must be one of",
        ("probe", not_codes, "-o", "p"): f"'{not_codes}' is not a codes directory (no meta.json)",
        ("run", "small-similar", photo_folder, "--set", "epochs=2"): "unknown field 'epochs' in recipe",
    }
    for args, said in cases.items():
        last, stderr = _heavy_imports(list(args), tmp_path)
        assert last.startswith("HEAVY [") and "torch" not in last and last.endswith(" 1"), (args, last, stderr)
        assert stderr.splitlines()[-1].startswith(f"Error: {said}"), (args, stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-codes", "photos"]


def test_a_data_folder_without_classes_is_refused_before_torch_loads(photo_folder, tmp_path):
    """An empty DATA folder, one with a single class, or a class folder without images: refused in the words
    open_dataset uses, before torch loads, nothing written."""
    from transferkit.data.datasets import open_dataset
    from transferkit.errors import DataError

    empty, one, hollow = tmp_path / "empty", tmp_path / "one", tmp_path / "hollow"
    empty.mkdir()
    shutil.copytree(photo_folder / "flower", one / "flower")
    shutil.copytree(photo_folder, hollow)
    (hollow / "zebra" / "notes").mkdir(parents=True)
    (hollow / "zebra" / "notes" / "readme.txt").write_text("not an image")
    for data in (empty, one, hollow):
        with pytest.raises(DataError) as said:
            open_dataset(data)
        for args in (["extract", data, "-o", tmp_path / "c"], ["finetune", data, "-o", tmp_path / "r"],
                     ["run", "small-similar", data, "-o", tmp_path / "p"]):
            last, stderr = _heavy_imports(args, tmp_path)
            assert last == "HEAVY [] 1" and stderr.splitlines() == [f"Error: {said.value}"], (last, stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "hollow", "one", "photos"]


def test_log_lines_read_plainly():
    """No module names before each line (they come back at -vv); problems say what they are."""
    from transferkit.cli import _LogFormat

    def record(level):
        return logging.LogRecord("transferkit.codes.extract", level, __file__, 1, "did %s", ("it",), None)

    plain, named = _LogFormat(with_names=False), _LogFormat(with_names=True)
    assert plain.format(record(logging.INFO)) == "did it"
    assert plain.format(record(logging.WARNING)) == "warning: did it"
    assert plain.format(record(logging.ERROR)) == "error: did it"
    assert named.format(record(logging.DEBUG)) == "DEBUG transferkit.codes.extract: did it"


def test_progress_bars_only_on_a_terminal(monkeypatch, capsys):
    """Piped or logged stderr gets no carriage-return bars (blank remnants in logs); a terminal gets them."""
    from transferkit.runtime.progress import progress_bar

    for tty in (False, True):
        monkeypatch.setattr(sys.stderr, "isatty", lambda tty=tty: tty, raising=False)
        assert list(progress_bar(range(3), desc="work")) == [0, 1, 2]
        assert ("work" in capsys.readouterr().err) == tty
