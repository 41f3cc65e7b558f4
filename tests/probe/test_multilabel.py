"""Multi-label data end to end: a manifest's 'labels' column, one SVM per label with thresholds chosen out of
fold, mAP and F1 in reports and metrics.json; and the bad inputs a user can bring, each a one-line error."""

import csv
import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from transferkit.data.datasets import open_dataset
from transferkit.errors import DataError
from transferkit.probe.multilabel import MultiLabelProbe, best_thresholds, mean_average_precision


def write_mosaics(folder, n, seed):
    """2x2 mosaics of real Fashion-MNIST items (56x56 PNG), labelled with the classes present; every 10th
    mosaic is blank (no label: all negatives)."""
    from transferkit.recipes.demo import fashion_mnist

    data = fashion_mnist("t10k", per_class=60)
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        tiles = rng.choice(len(data), 4, replace=False)
        canvas = np.zeros((56, 56), np.uint8)
        labels = set()
        if i % 10:
            for k, t in enumerate(tiles):
                canvas[28 * (k // 2):28 * (k // 2) + 28, 28 * (k % 2):28 * (k % 2) + 28] = data._pixels[t]
                labels.add(data.classes[data.targets[t]])
        Image.fromarray(canvas).save(folder / f"m{i:04d}.png")
        rows.append((f"m{i:04d}.png", ";".join(sorted(labels))))
    manifest = folder / "labels.csv"
    with manifest.open("w", newline="") as f:
        csv.writer(f).writerows([("path", "labels"), *rows])
    return manifest


@pytest.fixture(scope="module")
def mosaics(tmp_path_factory):
    root = tmp_path_factory.mktemp("mosaics")
    return write_mosaics(root / "train", 300, 0), write_mosaics(root / "test", 150, 1)


def test_a_labels_column_makes_multi_hot_targets(mosaics):
    data = open_dataset(mosaics[0])
    assert data.multilabel and data.targets.shape == (300, 10) and set(np.unique(data.targets)) == {0, 1}
    assert data.targets[0].sum() == 0 and 1 <= data.targets[1].sum() <= 4  # blank, then up to 4 classes
    with pytest.raises(DataError, match="'per_class' parameter does not apply to multi-label"):
        data.subset(5)


def test_probe_from_the_cli_finds_the_items_of_a_mosaic(mosaics, tmp_path, cli_run):
    """Measured: test mAP 0.71 (lite0 blocks.4 in a 2x2 grid at 64 px, 300 training mosaics; pre-logits 0.65),
    against ~0.31 (the labels' prevalence) for random scores."""
    train, test = tmp_path / "train", tmp_path / "test"
    cli_run("extract", mosaics[0], "-o", train, "--weights", "package", "--image-size", "64", "--layer", "blocks.4",
            "--pool", "2x2")
    cli_run("extract", mosaics[1], "-o", test, "--like", train)
    assert json.loads((train / "meta.json").read_text())["multilabel"] is True
    out = cli_run("probe", train, "--test", test, "-o", tmp_path / "p", "--cv", "3").output
    assert "test mAP: " in out and "micro-F1: " in out, out
    metrics = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert metrics["mAP"] >= 0.6 and metrics["micro_f1"] >= 0.5, {k: metrics[k] for k in ("mAP", "micro_f1")}
    assert set(metrics["per_label"]) == set(open_dataset(mosaics[0]).classes)
    assert {"ap", "f1", "precision", "recall", "support", "threshold"} <= set(metrics["per_label"]["Bag"])
    probe = MultiLabelProbe.load(tmp_path / "p" / "probe")
    from transferkit.codes.store import FeatureStore

    X = FeatureStore(test).load(FeatureStore(test).keys[0])
    np.testing.assert_array_equal(probe.decision_function(X).shape, (150, 10))
    assert probe.score(X, FeatureStore(test).labels) == pytest.approx(metrics["mAP"], abs=1e-6)
    # predict lists every label at or above its threshold: the same sets as the probe's on the stored codes
    files = [str(mosaics[1].parent / f"m{i:04d}.png") for i in range(10)]
    rows = [json.loads(line) for line in cli_run("predict", tmp_path / "p", *files, "--json").output.splitlines()]
    names = open_dataset(mosaics[0]).classes
    want = [{names[j] for j in np.flatnonzero(r)} for r in probe.predict(X[:10])]
    assert [{x["label"] for x in row["labels"]} for row in rows] == want and any(want), (rows, want)
    P = probe.predict_proba(X[:10])  # each label found with its own calibrated probability (Platt)
    assert all(row["score_kind"] == "probability" for row in rows)
    np.testing.assert_allclose([x["score"] for row in rows for x in row["labels"]],
                               [P[i, names.index(x["label"])] for i, row in enumerate(rows) for x in row["labels"]],
                               atol=1e-4)
    _converts_to_per_label_score_maps(tmp_path / "p", probe, files, tmp_path, cli_run)


def _converts_to_per_label_score_maps(probe_dir, probe, files, tmp_path, cli_run):
    """convert and dense prediction on a multi-label probe: one map per label (not a binary SVM's pair), the
    converted net equal to the probe on the same fp32 codes, and the labels found as the thresholds say."""
    import torch

    from transferkit.codes.extractor import FeatureExtractor
    from transferkit.data.decode import load_image
    from transferkit.surgery.dense import dense_predict, load_converted, save_converted

    cli_run("convert", probe_dir, "-o", tmp_path / "conv")
    clf = load_converted(tmp_path / "conv")
    assert clf.multilabel and clf.scores == "svm" and clf.thresholds == pytest.approx(probe.thresholds_.tolist())
    extractor = FeatureExtractor(weights="package", layer="blocks.4", pool="2x2", image_size=64,
                                 precision="fp32").fit()
    want = probe.decision_function(extractor.transform(files))
    x = torch.stack([extractor.transform_(load_image(f)) for f in files])
    with torch.no_grad():
        got = clf.net.logits(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)  # (10 images, 10 labels)
    big = tmp_path / "big.png"  # a mosaic at 4x: the 2x2-grid head slides, one score map per label
    Image.open(files[1]).convert("RGB").resize((224, 224), Image.BICUBIC).save(big)
    row = dense_predict(clf, big, tmp_path / "maps")
    maps = np.load(tmp_path / "maps" / "big.npz")
    assert maps["scores"].shape[0] == 10 and maps["thresholds"] == pytest.approx(clf.thresholds)
    image_scores, thresholds = maps["scores"].mean((1, 2)), np.asarray(clf.thresholds)
    # probabilities: sigmoid(score - threshold), per cell and for the image (0.5 = the label's threshold)
    np.testing.assert_allclose(maps["probabilities"], 1 / (1 + np.exp(thresholds[:, None, None] - maps["scores"])),
                               rtol=1e-5, atol=1e-6)
    image_p = 1 / (1 + np.exp(thresholds - image_scores))
    assert [x["label"] for x in row["labels"]] == [clf.classes[k] for k in np.argsort(-image_p)
                                                   if image_scores[k] >= clf.thresholds[k]]
    out = cli_run("predict", tmp_path / "conv", big, "--dense").output
    assert "# probabilities: sigmoid of SVM score minus the label's threshold" in out
    assert out.split("\t")[-1].strip() == ("; ".join(f"{x['label']} {x['probability']:.3f}" for x in row["labels"])
                                           or "-")
    clf.thresholds = [float("inf"), float("-inf"), *clf.thresholds[2:]]  # labels never / always seen in training
    save_converted(clf, tmp_path / "conv2")
    assert load_converted(tmp_path / "conv2").thresholds == clf.thresholds  # JSON has no infinity: kept as text


def test_thresholds_maximise_f1_and_map_is_macro_ap():
    Y = np.array([[1, 0], [1, 0], [0, 1], [0, 0]])
    S = np.array([[2.0, 0.1], [0.5, 0.2], [0.4, 3.0], [-1.0, 0.3]])
    t = best_thresholds(Y, S)
    assert t[0] == 0.5 and t[1] == 3.0  # both positives of label 0 and none of the negatives above 0.5
    assert mean_average_precision(Y, S) == 1.0
    probe = MultiLabelProbe(C=1.0, cv=2).fit(np.random.default_rng(0).normal(size=(40, 5)) + np.repeat(
        np.eye(5)[:2], 20, 0) * 3, np.repeat([[1, 0], [0, 1]], 20, 0))
    assert probe.predict(np.eye(5)[:2] * 3).tolist() == [[1, 0], [0, 1]]


@pytest.mark.parametrize("text, match", [
    ("path,label,labels\na.png,x,x;y\n", "line 1: both a 'label' and a 'labels' column"),
    ('path,labels\na.png,"x;""y;z"""\n', 'line 2: a quote inside a label'),
    ("path,labels\na.png,x;;y\n", "line 2: an empty label between two ';'"),
    ("path,labels\n", "has a header but no rows"),
    ("", "is empty"),
])
def test_bad_manifests_are_one_line_errors_naming_the_row(tmp_path, text, match):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(DataError, match=match) as err:
        open_dataset(tmp_path / "m.csv")
    assert "\n" not in str(err.value)


def test_a_class_never_seen_in_training_is_named_with_its_image(mosaics, tmp_path, cli_run):
    train = tmp_path / "train"
    cli_run("extract", mosaics[0], "-o", train, "--weights", "package", "--image-size", "32")
    Image.new("RGB", (56, 56)).save(tmp_path / "odd.png")
    (tmp_path / "odd.csv").write_text("path,labels\nodd.png,Bag;Parrot\n")
    cli_run("extract", tmp_path / "odd.csv", "-o", tmp_path / "odd", "--like", train)
    out = cli_run("probe", train, "--test", tmp_path / "odd", "-o", tmp_path / "p", "--cv", "2", ok=False)
    assert out.exit_code != 0 and "odd.png' is labelled 'Parrot', a class the model was not trained on" in out.output
    assert not (tmp_path / "p").exists()  # nothing written
    cli_run("probe", train, "-o", tmp_path / "p", "--cv", "2")  # and at evaluate time, on the images
    out = cli_run("evaluate", tmp_path / "p", tmp_path / "odd.csv", "-o", tmp_path / "ev", ok=False)
    assert out.exit_code != 0 and "odd.png' is labelled 'Parrot', a class the model was not trained on" in out.output
    errors = [line for line in out.output.splitlines() if line.startswith("Error")]  # after the progress bar
    assert len(errors) == 1 and "Parrot" in errors[0] and not (tmp_path / "ev").exists()


def test_finetune_multilabel_sigmoid_head_thresholds_predict_and_evaluate(mosaics, tmp_path, cli_run):
    """A sigmoid head with binary cross-entropy, biases at each label's log-odds, thresholds chosen on the
    validation split; predict lists labels, evaluate reports mAP. Measured: val mAP 0.67 (30 images), test mAP
    0.57 after 2 epochs of the head and the last stage at 64 px (chance ~0.31)."""
    run = tmp_path / "run"
    cli_run("finetune", mosaics[0], "-o", run, "--weights", "package", "--image-size", "64", "--epochs", "2",
            "--freeze-until", "blocks.6", "--lr", "0.01", "--batch-size", "32")
    meta = json.loads((run / "config.json").read_text())
    thresholds = [meta["val"]["per_label"][c]["threshold"] for c in meta["classes"]]
    assert meta["multilabel"] is True and len(thresholds) == 10 and meta["val"]["mAP"] > 0.5, meta["val"]
    out = cli_run("evaluate", run, mosaics[1], "-o", tmp_path / "ev").output
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert "mAP: " in out and metrics["mAP"] > 0.5 and set(metrics["per_label"]) == set(meta["classes"]), out
    rows = [json.loads(x) for x in cli_run("predict", run, mosaics[1].parent / "m0001.png", "--json").output.split("\n")
            if x]
    assert len(rows) == 1 and all(x["score"] >= thresholds[meta["classes"].index(x["label"])]
                                  for x in rows[0]["labels"])
    # converted: a sigmoid per label and cell, the run's thresholds, labels from the map's mean logits
    from transferkit.surgery.dense import dense_predict, load_classifier

    clf = load_classifier(run)
    assert clf.multilabel and clf.thresholds == pytest.approx(thresholds)
    row = dense_predict(clf, mosaics[1].parent / "m0001.png", tmp_path / "maps")
    maps = np.load(tmp_path / "maps" / "m0001.npz")
    np.testing.assert_allclose(maps["probabilities"], 1 / (1 + np.exp(-maps["scores"])), rtol=1e-5, atol=1e-6)
    mean = 1 / (1 + np.exp(-maps["scores"].mean((1, 2))))
    assert {x["label"] for x in row["labels"]} == {c for c, p, t in zip(meta["classes"], mean, thresholds) if p >= t}


def recipes_flip() -> bool:
    from transferkit import recipes

    return recipes.get("small-different").settings.flip


def test_advise_the_recipes_the_sweep_and_the_lr_finder_take_multilabel_data(mosaics, tmp_path, cli_run):
    """advise counts images per label and ranks layers by CV mAP; a probe recipe with layer 'auto' sweeps by mAP
    and reports the test mAP; the LR finder trains the sigmoid head it would fine-tune."""
    from transferkit.recipes.advise import advise

    data = open_dataset(mosaics[0])
    advice = advise(data, sample=150, progress=False)
    assert advice.multilabel and advice.cv_metric == "mAP" and advice.recipe.startswith("small-")
    assert advice.class_counts == dict(zip(data.classes, data.targets.sum(0).tolist()))
    assert 0.31 < advice.top_accuracy <= 1 and 0.31 < advice.best_earlier_accuracy <= 1  # above prevalence
    assert advice.wins + advice.losses > 0 and "images per label (multi-label): " in advice.report()
    tuning = dataclasses.replace(advice, recipe="large-different", class_weight="balanced")  # no sampler here
    assert tuning.balancing() == {"class_weight": "balanced"}
    out = cli_run("run", "small-different", mosaics[0], "--test", mosaics[1], "-o", tmp_path / "r", "--set",
                  "image_size=32", "--set", "cv=3").output
    result = json.loads((tmp_path / "r" / "result.json").read_text())
    sweep = json.loads((tmp_path / "r" / "train" / "sweep.json").read_text())
    assert "test mAP" in out and result["accuracy"] is None and result["mAP"] > 0.5, out
    assert recipes_flip() and result["details"]["flip"] is False  # the recipe's mirrors are for one class per image
    assert result["details"]["head"] == "svm"  # its logistic head too: multi-label is one SVM per label
    assert sweep["metric"] == "mAP" and result["details"]["codes"].startswith(sweep["best"]["layer"] + "|")
    cli_run("finetune", mosaics[0], "-o", tmp_path / "lr", "--find-lr", "--weights", "package", "--image-size", "32",
            "--freeze-until", "blocks.6", "--batch-size", "16")
    found = json.loads((tmp_path / "lr" / "lr_find.json").read_text())
    assert np.isfinite(found["losses"]).sum() > 20 and 1e-6 < found["suggestion"] < 1
