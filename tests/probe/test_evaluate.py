"""predict and evaluate on both kinds of model directory: a linear probe and a fine-tuning run.

The run is made by hand, not by finetune(): the packaged EfficientNet-Lite0 with a linear head fitted
(scikit-learn's logistic regression on its pre-logits codes) to real 8x8 digits rendered as PNG folders.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix

from transferkit.codes.extractor import FeatureExtractor
from transferkit.data.datasets import open_dataset
from transferkit.data.transforms import describe_transform
from transferkit.errors import DataError, ParameterError
from transferkit.jobs import evaluate_model, extract_features, predict_images, train_probe

RUN_CLASSES = ["zero", "one", "two"]  # digit order; the folders sort as one, two, zero: matching is by name
SIZE = 32


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run faster on one thread


def _digit_folder(root: Path, names: list[str], start: int, n: int) -> Path:
    """Images start..start+n-1 of each named digit class, as 32 x 32 grey PNGs in one folder per class."""
    digits = load_digits()
    for name in names:
        (root / name).mkdir(parents=True)
        for i in np.flatnonzero(digits.target == RUN_CLASSES.index(name))[start:start + n]:
            pixels = (digits.images[i] * 255 / 16).astype(np.uint8)
            Image.fromarray(pixels).resize((SIZE, SIZE), Image.BILINEAR).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("digits")
    return {"train": _digit_folder(tmp / "train", RUN_CLASSES, 0, 10),
            "test": _digit_folder(tmp / "test", RUN_CLASSES, 10, 8)}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, folders):
    """A fine-tuning run directory: config.json, model-best.safetensors; plus the head as fitted by sklearn."""
    from transferkit.models.stages import replace_head

    out = tmp_path_factory.mktemp("run")
    # stands in for a fine-tuned network: fp32 and unfolded, as finetune() saves one
    extractor = FeatureExtractor("tf_efficientnet_lite0", weights="package", image_size=SIZE, precision="fp32",
                                 fold_bn=False).fit()
    train = open_dataset(folders["train"])
    y = np.array([RUN_CLASSES.index(train.classes[t]) for t in train.targets])
    head = LogisticRegression(max_iter=2000).fit(extractor.transform(train), y)
    model = replace_head(extractor.backbone_, len(RUN_CLASSES))
    with torch.no_grad():
        model.get_classifier().weight.copy_(torch.from_numpy(head.coef_))
        model.get_classifier().bias.copy_(torch.from_numpy(head.intercept_))
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(out / "model-best.safetensors"))
    config = {"model": "tf_efficientnet_lite0", "image_size": SIZE, "head": "linear", "precision": "fp32"}
    meta = {"format": "transferkit.finetune/1", "classes": RUN_CLASSES, "config": config,
            "transform": describe_transform(extractor.data_config_, SIZE)}
    (out / "config.json").write_text(json.dumps(meta))
    return out, head, extractor  # the new head does not change the extractor's pre-logits codes


def _direct(head: LogisticRegression, extractor: FeatureExtractor, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(true, predicted) run-class indices computed without the run directory: codes -> sklearn's head."""
    data = open_dataset(folder)
    y = np.array([RUN_CLASSES.index(data.classes[t]) for t in data.targets])
    return y, head.predict(extractor.transform(data))


def test_predict_with_a_run(run_dir, folders):
    out, head, extractor = run_dir
    rows = predict_images(out, [folders["test"]], batch_size=16)
    files = sorted(str(p) for p in folders["test"].rglob("*.png"))
    assert [r["source"] for r in rows] == files
    assert {r["label"] for r in rows} <= set(RUN_CLASSES)
    assert all(0 < r["score"] <= 1 for r in rows)
    proba = head.predict_proba(extractor.transform(files))  # the same head, on the same codes
    assert [r["label"] for r in rows] == [RUN_CLASSES[j] for j in proba.argmax(1)]
    np.testing.assert_allclose([r["score"] for r in rows], proba.max(1), atol=1e-4)
    assert sum(r["label"] == Path(r["source"]).parent.name for r in rows) >= 20  # 24 unseen digits, 3 classes
    raw = predict_images(out, [folders["test"]], batch_size=16, topk=3, raw=True)  # the logits, best first
    logits = head.decision_function(extractor.transform(files))
    assert all(r["score_kind"] == "logit" and len(r["top"]) == 3 for r in raw)
    np.testing.assert_allclose([[t["score"] for t in r["top"]] for r in raw], -np.sort(-logits, 1), atol=1e-3)


@pytest.mark.parametrize("split", ["train", "test"])
def test_evaluate_a_run_matches_direct_computation(run_dir, folders, split, tmp_path):
    out, head, extractor = run_dir
    ev = evaluate_model(out, folders[split], out=tmp_path / "eval", batch_size=16, progress=False)
    y, pred = _direct(head, extractor, folders[split])
    assert ev.accuracy == pytest.approx(float(np.mean(y == pred)))
    assert ev.labels == RUN_CLASSES
    np.testing.assert_array_equal(ev.confusion, confusion_matrix(y, pred, labels=[0, 1, 2]))
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["accuracy"] == ev.accuracy and metrics["n"] == len(y) == (30 if split == "train" else 24)
    assert metrics["model_dir"] == str(out) and metrics["data"] == str(folders[split])
    assert "zero" in (tmp_path / "eval" / "report.txt").read_text()
    assert (tmp_path / "eval" / "confusion.png").stat().st_size > 1000


def test_evaluate_a_run_on_data_lacking_a_class(run_dir, tmp_path):
    out, head, extractor = run_dir
    folder = _digit_folder(tmp_path / "two-classes", ["two", "zero"], 10, 8)  # indices 0, 1 here; 2, 0 in the run
    ev = evaluate_model(out, folder, progress=False)
    y, pred = _direct(head, extractor, folder)
    assert ev.accuracy == pytest.approx(float(np.mean(y == pred))) and ev.accuracy > 0.8
    assert ev.labels == RUN_CLASSES and ev.per_class["one"]["support"] == 0
    assert ev.per_class["two"]["support"] == ev.per_class["zero"]["support"] == 8


@pytest.fixture(scope="module")
def probe_dir(folders, tmp_path_factory):
    """A probe folder trained on the digit folders (and its train_probe report): only read it."""
    tmp = tmp_path_factory.mktemp("probe")
    codes, test_codes, probe = tmp / "codes", tmp / "test-codes", tmp / "probe"
    extract_features(folders["train"], codes, weights="package", image_size=SIZE, progress=False)
    extract_features(folders["test"], test_codes, like=codes, progress=False)
    return probe, train_probe(codes, probe, test=test_codes, cv=2)


def test_evaluate_a_probe_equals_train_probe(folders, probe_dir, tmp_path):
    probe, report = probe_dir
    ev = evaluate_model(probe, folders["test"], out=tmp_path / "eval", progress=False)
    assert ev.accuracy == report.evaluation.accuracy and ev.labels == report.evaluation.labels
    np.testing.assert_array_equal(ev.confusion, report.evaluation.confusion)
    assert ev.report == report.evaluation.report
    rows = predict_images(probe, [folders["test"] / "two"])
    assert len(rows) == 8 and {r["label"] for r in rows} <= set(RUN_CLASSES)


def test_cli_predict_prints_calibrated_probabilities_topk_and_raw_scores(folders, probe_dir, cli_run):
    from transferkit.probe.saved import load_probe_dir

    out, images = probe_dir[0], folders["test"] / "two"
    rows = [line.split("\t") for line in cli_run("predict", out, images).output.splitlines()]
    assert len(rows) == 8 and all(len(r) == 3 and r[1] in RUN_CLASSES and 0 <= float(r[2]) <= 1 for r in rows)
    for r in (line.split("\t") for line in cli_run("predict", out, images, "--topk", "3").output.splitlines()):
        p = [float(v) for v in r[2::2]]  # source, then label and probability of each of the top 3
        assert sorted(r[1::2]) == sorted(RUN_CLASSES) and p == sorted(p, reverse=True)
        assert sum(p) == pytest.approx(1, abs=2e-3)
    js = [json.loads(line) for line in cli_run("predict", out, images, "--json", "--topk", "2").output.splitlines()]
    probe, extractor = load_probe_dir(out)
    codes = extractor.transform([r["source"] for r in js])
    P, S = probe.predict_proba(codes), probe.decision_function(codes)
    assert all(r["score_kind"] == "probability" and len(r["top"]) == 2 and r["label"] == r["top"][0]["label"]
               for r in js)
    np.testing.assert_allclose([[t["score"] for t in r["top"]] for r in js], -np.sort(-P, 1)[:, :2], atol=1e-4)
    raw = [json.loads(line) for line in cli_run("predict", out, images, "--json", "--raw").output.splitlines()]
    assert all(r["score_kind"] == "svm_score" for r in raw)
    np.testing.assert_allclose([r["score"] for r in raw], S.max(1), atol=1e-4)
    assert [r["label"] for r in raw] == [r["label"] for r in js]
    assert 0 <= json.loads((out / "metrics.json").read_text())["test_ece"] <= 1
    with pytest.raises(ParameterError, match="'topk'") as err:  # before any work: the CLI names --topk
        predict_images(out, [images], topk=0)
    assert err.value.param == "topk"


def test_cli_predict_with_a_probe_saved_before_calibration(folders, probe_dir, tmp_path, cli_run, old_probe_format,
                                                          caplog):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(probe_dir[0], old)
    old_probe_format(old / "probe")
    with caplog.at_level(logging.WARNING):
        rows = [json.loads(line) for line in cli_run("predict", old, folders["test"] / "two", "--json").output
                .splitlines()]
    assert "saved before probes were calibrated" in caplog.text
    new = predict_images(probe_dir[0], [folders["test"] / "two"], raw=True)
    assert [r["label"] for r in rows] == [r["label"] for r in new] and len(rows) == 8
    assert all(r["score_kind"] == "svm_score" for r in rows)
    np.testing.assert_allclose([r["score"] for r in rows], [r["score"] for r in new], atol=1e-5)


def _one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], result.output


def test_cli_predict_and_evaluate_a_run(run_dir, folders, tmp_path, cli_run):
    out = run_dir[0]
    result = cli_run("predict", out, folders["test"] / "one", "--json")
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert len(rows) == 8 and all(r["label"] in RUN_CLASSES and 0 < r["score"] <= 1 for r in rows)
    result = cli_run("-q", "evaluate", out, folders["test"], "-o", tmp_path / "eval", "--per-class", "4")
    assert "accuracy: " in result.output and "(12 images)" in result.output and "zero" in result.output
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n"] == 12


def test_cli_errors_name_the_culprit(run_dir, folders, tmp_path, cli_run):
    (tmp_path / "empty").mkdir()
    for command in ("predict", "evaluate"):
        _one_line_error(cli_run(command, tmp_path / "empty", folders["test"], ok=False), str(tmp_path / "empty"),
                        "probe", "run")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"format": "something-else"}))
    _one_line_error(cli_run("evaluate", tmp_path / "other", folders["test"], ok=False), "config.json",
                    "fine-tuning run")
    extra = _digit_folder(tmp_path / "extra", ["zero", "one"], 0, 2)
    (extra / "three").mkdir()
    Image.new("L", (SIZE, SIZE)).save(extra / "three" / "0.png")
    _one_line_error(cli_run("evaluate", run_dir[0], extra, ok=False), "'three'", "zero, one, two")
    with pytest.raises(DataError, match="'three'"):
        evaluate_model(run_dir[0], extra, progress=False)


def test_evaluate_help(cli_run):
    result = cli_run("evaluate", "--help", ok=False)
    assert result.exit_code == 0 and "MODEL DATA" in result.output and "--per-class" in result.output


def test_evaluate_a_run_with_flip_tta(run_dir, folders):
    """--tta: the prediction is the argmax of the mean softmax of each image and its mirror image."""
    from transferkit.data.transforms import build_transform
    from transferkit.finetune.rundir import load_finetuned

    out = run_dir[0]
    model, meta = load_finetuned(out)
    data = open_dataset(folders["test"])
    items = data.with_transform(build_transform(meta["transform"]))
    x = torch.stack([items[i][0] for i in range(len(data))])
    with torch.no_grad():
        p = (model(x).softmax(1) + model(x.flip(-1)).softmax(1)) / 2
    y = np.array([RUN_CLASSES.index(data.classes[t]) for t in data.targets])
    ev = evaluate_model(out, folders["test"], progress=False, tta=True)
    assert ev.accuracy == pytest.approx(float(np.mean(p.argmax(1).numpy() == y)))


@pytest.fixture(scope="module")
def ensemble_dir(folders, probe_dir, tmp_path_factory):
    """An ensemble of probe_dir's probe (lite0, SVM) and a flip probe on lite1's codes (logistic), made from
    copies of both, which are then deleted: the ensemble must not need them. -> (ensemble, [member copies' twins])"""
    import shutil

    from transferkit.jobs import ensemble_probes

    tmp = tmp_path_factory.mktemp("ensemble")
    extract_features(folders["train"], tmp / "codes1", model="tf_efficientnet_lite1", weights="package",
                     image_size=SIZE, progress=False)
    train_probe(tmp / "codes1", tmp / "lite1", cv=2, head="logistic", flip=True)
    shutil.copytree(probe_dir[0], tmp / "gone0")
    shutil.copytree(tmp / "lite1", tmp / "gone1")
    ensemble_probes([tmp / "gone0", tmp / "gone1"], tmp / "ensemble")
    shutil.rmtree(tmp / "gone0"), shutil.rmtree(tmp / "gone1")
    return tmp / "ensemble", [probe_dir[0], tmp / "lite1"]


def _member_proba(member: Path, files: list[str]) -> np.ndarray:
    """A member's probabilities of `files` in RUN_CLASSES order, from predict on the member alone."""
    rows = predict_images(member, files, topk=3)
    return np.array([[{t["label"]: t["score"] for t in r["top"]}[c] for c in RUN_CLASSES] for r in rows])


def test_an_ensemble_scores_the_mean_of_its_members_probabilities(ensemble_dir, folders, tmp_path):
    from transferkit.probe.ensemble import read_ensemble

    ensemble, members = ensemble_dir
    files = sorted(str(p) for p in folders["test"].rglob("*.png"))
    mean = sum(_member_proba(m, files) for m in members) / 2
    rows = predict_images(ensemble, files, topk=3)
    assert all(r["score_kind"] == "probability" for r in rows)
    got = np.array([[{t["label"]: t["score"] for t in r["top"]}[c] for c in RUN_CLASSES] for r in rows])
    np.testing.assert_allclose(got, mean, atol=1e-6)
    assert [r["label"] for r in rows] == [RUN_CLASSES[j] for j in mean.argmax(1)]
    y = np.array([RUN_CLASSES.index(Path(f).parent.name) for f in files])
    ev = evaluate_model(ensemble, folders["test"], out=tmp_path / "eval", progress=False)
    assert ev.accuracy == pytest.approx(float(np.mean(mean.argmax(1) == y))) and ev.accuracy > 0.8
    assert sorted(ev.labels) == sorted(RUN_CLASSES) and (tmp_path / "eval" / "confusion.png").is_file()
    record = read_ensemble(ensemble)
    assert [m["model"] for m in record["members"]] == ["tf_efficientnet_lite0", "tf_efficientnet_lite1"]


def test_cli_ensemble_predict_and_evaluate(ensemble_dir, probe_dir, folders, tmp_path, cli_run):
    members = ensemble_dir[1]
    result = cli_run("ensemble", *members, "-o", tmp_path / "e")
    assert "ensemble of 2 probes" in result.output and (tmp_path / "e" / "ensemble.json").is_file()
    result = cli_run("-q", "evaluate", tmp_path / "e", folders["test"])
    assert "accuracy: " in result.output and "(24 images)" in result.output
    rows = [json.loads(line) for line in cli_run("predict", tmp_path / "e", folders["test"] / "two", "--json")
            .output.splitlines()]
    assert len(rows) == 8 and all(r["label"] in RUN_CLASSES and 0 < r["score"] <= 1 for r in rows)
    cli_run("ensemble", *reversed(members), "-o", tmp_path / "e")  # its own output: replaced
    assert json.loads((tmp_path / "e" / "ensemble.json").read_text())["members"][0]["source"] == str(members[1])
    _one_line_error(cli_run("predict", tmp_path / "e", folders["test"] / "two", "--raw", ok=False), "'--raw'")
    _one_line_error(cli_run("evaluate", tmp_path / "e", folders["test"], "--tta", ok=False), "ensemble")
    _one_line_error(cli_run("summary", tmp_path / "e", ok=False), "ensemble", "members")
    _one_line_error(cli_run("convert", tmp_path / "e", "-o", tmp_path / "c", ok=False), "ensemble")
    assert not (tmp_path / "c").exists()


def test_cli_ensemble_refuses_bad_members_and_keeps_files(ensemble_dir, probe_dir, folders, tmp_path, cli_run,
                                                         multilabel_codes, old_probe_format):
    import shutil

    members = [str(m) for m in ensemble_dir[1]]
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    _one_line_error(cli_run("ensemble", *members, "-o", user, ok=False), "not written by transferkit")
    assert (user / "notes.txt").read_text() == "keep me" and len(list(user.iterdir())) == 1
    _one_line_error(cli_run("ensemble", members[0], "-o", tmp_path / "e", ok=False), "'PROBES'", "two or more")
    _one_line_error(cli_run("ensemble", members[0], members[0], "-o", tmp_path / "e", ok=False), "twice")
    _one_line_error(cli_run("ensemble", members[0], folders["test"], "-o", tmp_path / "e", ok=False),
                    str(folders["test"]), "not one")
    _one_line_error(cli_run("ensemble", *members, "-o", Path(members[0]) / "inside", ok=False), "input")
    two = _digit_folder(tmp_path / "two", ["zero", "one"], 0, 6)
    extract_features(two, tmp_path / "codes2", weights="package", image_size=SIZE, progress=False)
    train_probe(tmp_path / "codes2", tmp_path / "p2", cv=2)
    _one_line_error(cli_run("ensemble", members[0], tmp_path / "p2", "-o", tmp_path / "e", ok=False),
                    "same classes", "one, two, zero", "one, zero")
    train_probe(multilabel_codes(open_dataset(folders["train"])), tmp_path / "ml", cv=2)
    _one_line_error(cli_run("ensemble", members[0], tmp_path / "ml", "-o", tmp_path / "e", ok=False), "multi-label")
    _one_line_error(cli_run("evaluate", ensemble_dir[0], tmp_path / "labels.csv", ok=False), "multi-label",
                    "one class per image")  # multilabel_codes' manifest
    shutil.copytree(members[0], tmp_path / "old")
    old_probe_format(tmp_path / "old" / "probe")
    _one_line_error(cli_run("ensemble", members[1], tmp_path / "old", "-o", tmp_path / "e", ok=False),
                    "calibrated")
    assert not (tmp_path / "e").exists()


def test_a_damaged_ensemble_record_is_refused(ensemble_dir, folders, tmp_path):
    import shutil

    shutil.copytree(ensemble_dir[0], tmp_path / "e")
    record = json.loads((tmp_path / "e" / "ensemble.json").read_text())
    (tmp_path / "e" / "ensemble.json").write_text(json.dumps({**record, "members": record["members"][:1]}))
    with pytest.raises(DataError, match="two or more members"):
        evaluate_model(tmp_path / "e", folders["test"], progress=False)
    outside = [{"dir": "../../elsewhere"}, *record["members"][1:]]
    (tmp_path / "e" / "ensemble.json").write_text(json.dumps({**record, "members": outside}))
    with pytest.raises(DataError, match="outside the ensemble"):
        predict_images(tmp_path / "e", [folders["test"] / "two"])
