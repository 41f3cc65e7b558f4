"""The code cache: the same images are never encoded twice, new ones only are, corrupt parts are redone."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from transferkit.codes.cache import CodeCache
from transferkit.codes.store import FeatureStore
from transferkit.jobs import extract_features
from transferkit.recipes.demo import fashion_mnist

OPTS = {"weights": "package", "image_size": 32, "layer": "blocks.2,pre_logits", "pool": "avg,2x2",
        "precision": "fp32", "progress": False}


def codes(store: FeatureStore) -> dict[str, np.ndarray]:
    return {k: store.load(k) for k in store.keys}


@pytest.fixture(scope="module")
def fmnist():
    return fashion_mnist("train")


def test_second_run_reads_every_code_from_the_cache(fmnist, tmp_path):
    data = fmnist.subset(12)  # 120 real Fashion-MNIST images, classes interleaved in file order
    first = extract_features(data, tmp_path / "a", **OPTS)
    assert first.meta["cache"]["computed"] == 120 and first.meta["cache"]["cached"] == 0
    again = extract_features(data, tmp_path / "b", **OPTS)
    assert again.meta["cache"] == {**first.meta["cache"], "cached": 120, "computed": 0}
    assert first.meta["engine"] == "torch" and again.meta["engine"] is None  # all cached: the network never ran
    assert again.meta["folded_batchnorms"] is None
    plain = extract_features(data, tmp_path / "c", cache=False, **OPTS)
    assert plain.meta["cache"] is None
    for key, value in codes(first).items():
        np.testing.assert_array_equal(codes(again)[key], value)  # the stored codes, bit for bit
        np.testing.assert_allclose(codes(plain)[key], value, rtol=1e-5, atol=1e-6)  # and what encoding gives
    assert again.sources == first.sources and np.array_equal(again.labels, first.labels)


def test_adding_images_encodes_only_the_new_ones_in_item_order(fmnist, tmp_path):
    extract_features(fmnist.subset(5), tmp_path / "few", **OPTS)
    more = fmnist.subset(9)  # 50 cached images scattered among 40 new ones
    grown = extract_features(more, tmp_path / "more", batch_size=16, **OPTS)
    assert grown.meta["cache"]["cached"] == 50 and grown.meta["cache"]["computed"] == 40
    fresh = extract_features(more, tmp_path / "fresh", cache=False, **OPTS)
    assert grown.sources == fresh.sources == list(more.sources)  # item order kept through the merge
    np.testing.assert_array_equal(grown.labels, more.targets)
    for key, value in codes(fresh).items():
        np.testing.assert_allclose(codes(grown)[key], value, rtol=1e-5, atol=1e-6)


def test_other_settings_never_hit_and_moved_files_do(photo_folder, tmp_path):
    opts = {**OPTS, "layer": "pre_logits", "pool": "avg"}
    extract_features(photo_folder, tmp_path / "a", **opts)
    other = extract_features(photo_folder, tmp_path / "b", **{**opts, "image_size": 48})
    assert other.meta["cache"]["cached"] == 0  # another transform: another kind of codes
    bf16 = extract_features(photo_folder, tmp_path / "c", **{**opts, "precision": "bf16"})
    assert bf16.meta["cache"]["cached"] == 0
    moved = tmp_path / "moved"
    shutil.copytree(photo_folder, moved)
    for f in moved.rglob("*.png"):
        f.rename(f.with_name("renamed-" + f.name))
    again = extract_features(moved, tmp_path / "d", **opts)
    assert again.meta["cache"]["cached"] == 16 and again.meta["cache"]["computed"] == 0  # content, not name


def test_corrupt_or_truncated_parts_are_detected_and_redone(fmnist, tmp_path, code_cache, caplog):
    data = fmnist.subset(4)
    first = extract_features(data, tmp_path / "a", **OPTS)
    parts = sorted(code_cache.rglob("part-*.npz"))
    assert len(parts) == len(first.keys) == 3  # one per kind of codes (no 2x2 of the 1x1 final map at 32 px)
    blob = bytearray(parts[0].read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # a flipped bit in the codes
    parts[0].write_bytes(bytes(blob))
    parts[1].write_bytes(parts[1].read_bytes()[:200])  # a truncated file
    again = extract_features(data, tmp_path / "b", **OPTS)
    assert "is corrupt" in caplog.text and not parts[0].exists() and not parts[1].exists()
    assert again.meta["cache"]["computed"] == 40
    for key, value in codes(first).items():
        np.testing.assert_allclose(codes(again)[key], value, rtol=1e-5, atol=1e-6)
    assert extract_features(data, tmp_path / "c", **OPTS).meta["cache"]["cached"] == 40  # redone and re-cached


def test_cli_no_cache_info_and_clean(photo_folder, tmp_path, code_cache, cli_run):
    args = ["extract", photo_folder, "--weights", "package", "--image-size", "32"]
    cli_run(*args, "-o", tmp_path / "a", catch=True)
    out = cli_run(*args, "-o", tmp_path / "b", ok=False, catch=True)
    assert out.exit_code == 0 and "16 from the code cache, 0 encoded" in out.output, out.output
    out = cli_run(*args, "-o", tmp_path / "c", "--no-cache", ok=False, catch=True)
    assert out.exit_code == 0 and "code cache" not in out.output
    assert json.loads((tmp_path / "c" / "meta.json").read_text())["cache"] is None
    info = cli_run("cache", "info", ok=False, catch=True)
    assert info.exit_code == 0 and info.output.startswith("1 kind(s) of codes, 16 rows")  # a summary, first
    assert "tf_efficientnet_lite0: 1 kind(s), 16 rows" in info.output and "pre_logits|avg" not in info.output
    info = cli_run("cache", "info", "-v", ok=False, catch=True)  # details: one line per kind of codes
    assert info.exit_code == 0 and "tf_efficientnet_lite0  pre_logits|avg" in info.output and "16 images" in info.output
    sweeps = code_cache / "sweeps"
    sweeps.mkdir()
    (sweeps / f"{'0' * 64}.json").write_text("{}")  # a remembered sweep (transferkit.probe.sweep_cache)
    assert "1 remembered sweep result(s)" in cli_run("cache", "info", ok=False, catch=True).output
    clean = cli_run("cache", "clean", "--model", "resnet18", ok=False, catch=True)
    assert "deleted 0" in clean.output and len(CodeCache().info()) == 1 and len(list(sweeps.iterdir())) == 1
    clean = cli_run("cache", "clean", ok=False, catch=True)
    assert clean.exit_code == 0 and "deleted 1" in clean.output and CodeCache().info() == []
    assert "1 sweep result(s)" in clean.output and list(sweeps.iterdir()) == []


def test_two_processes_extract_what_one_does(fmnist, tmp_path, code_cache):
    """torchrun, 2 CPU processes with gloo: each rank encodes half, rank 0 publishes; same rows as one process."""
    import os
    import subprocess
    import sys

    from transferkit.data.datasets import open_dataset

    data = fmnist.subset(6)
    one = extract_features(data, tmp_path / "one", cache=False, **OPTS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "transferkit", "-q", "extract", str(fmnist.root), "--per-class", "6", "--weights", "package",
           "--image-size", "32", "--layer", OPTS["layer"], "--pool", OPTS["pool"], "--precision", "fp32"]
    for name in ("two", "again"):
        proc = subprocess.run([*cmd, "-o", str(tmp_path / name)], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    two, again = FeatureStore(tmp_path / "two"), FeatureStore(tmp_path / "again")
    assert two.meta["processes"] == 2 and len(two.meta["shards"]) == 2  # one shard per rank
    assert two.meta["cache"]["computed"] == 60 and again.meta["cache"]["cached"] == 60  # each rank cached its half
    assert two.sources == one.sources and np.array_equal(two.labels, one.labels)
    for key, value in codes(one).items():
        np.testing.assert_allclose(codes(two)[key], value, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(codes(again)[key], codes(two)[key])
    assert not list(tmp_path.glob(".*.tmp")) and len(open_dataset(fmnist.root).subset(6)) == 60
