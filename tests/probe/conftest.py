"""Fixtures shared by the probe tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def multilabel_codes(tmp_path):
    """`make(items)`: codes (32 px, fp32, packaged weights) of 8 real images of an ImageDataset `items`, saved as
    PNGs with a labels manifest: each labelled with its class and, every other one, 'odd' too."""
    from transferkit.jobs import extract_features

    def make(items) -> Path:
        rows = ["path,labels"]
        for i in range(8):
            items.image(i).save(tmp_path / f"{i}.png")
            rows.append(f"{i}.png,{items.classes[items.targets[i]]}{';odd' if i % 2 else ''}")
        (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
        extract_features(tmp_path / "labels.csv", tmp_path / "codes", weights="package", image_size=32,
                         precision="fp32", progress=False)
        return tmp_path / "codes"

    return make


@pytest.fixture(scope="module")
def fashion_probe(tmp_path_factory, cli_run):
    """`run(*probe_options)`: codes of 5 training and 3 test Fashion-MNIST items per class (32 px, fp32), and a
    probe trained on them from the CLI with those options, with a code cache of its own -> {'train', 'test',
    'out', 'output', 'cache'}; once per module: only read them."""
    from transferkit.jobs import extract_features

    fashion = Path("/usr/share/datasets/fashion-mnist")

    def run(*options) -> dict:
        tmp = tmp_path_factory.mktemp("probe")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TRANSFERKIT_CACHE", str(tmp / "cache"))
            train, test, out = tmp / "train", tmp / "test", tmp / "probe"
            extract_features(fashion / "train", train, per_class=5, weights="package", image_size=32,
                             precision="fp32", progress=False)
            extract_features(fashion / "t10k", test, per_class=3, like=train, progress=False)
            result = cli_run("probe", train, "-o", out, "--test", test, *options)
        return {"train": train, "test": test, "out": out, "output": result.output, "cache": tmp / "cache"}

    return run


@pytest.fixture
def orphan_codes(tmp_path) -> tuple[Path, Path]:
    """Codes of 2 Fashion-MNIST test items per class (32 px, fp32) whose images were deleted after extraction ->
    (codes directory, where the images were)."""
    import shutil

    from transferkit.jobs import extract_features

    copy = tmp_path / "idx"
    copy.mkdir()
    for f in Path("/usr/share/datasets/fashion-mnist").glob("t10k-*"):
        shutil.copy(f, copy / f.name)
    extract_features(copy / "t10k", tmp_path / "codes", per_class=2, weights="package", image_size=32,
                     precision="fp32", progress=False)
    shutil.rmtree(copy)
    return tmp_path / "codes", copy / "t10k"
