"""Faults injected on purpose: output folders transferkit did not write, the user's data as output, damaged
engines and cache parts, NaN codes, kills, full and read-only disks, concurrent writers, hostile pickles.

Each test is a promise of the README's "What transferkit promises": it fails if the promise is broken.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from transferkit.codes.store import FeatureStore
from transferkit.errors import TransferkitError
from transferkit.runtime.outputs import MARKER, OutputError, check_output, read_marker

FMNIST = Path("/usr/share/datasets/fashion-mnist")
FAST = ["--weights", "package", "--image-size", "32", "--precision", "fp32", "--engine", "torch"]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file below `root` (and `root` itself if it is a file) with its bytes."""
    if root.is_file():
        return {".": root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(cli_run):
    """The CLI as these faults meet it: quiet (-q), any exit code, an uncaught exception kept in the result."""
    return lambda *args: cli_run("-q", *args, ok=False, catch=True)


def subprocess_env(cache: Path) -> dict[str, str]:
    return {**os.environ, "TRANSFERKIT_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture()
def user_project(tmp_path: Path) -> Path:
    """A folder of someone else's work that happens to hold a `meta.json`."""
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "meta.json").write_text('{"name": "my-app"}')
    (proj / "src" / "main.py").write_text("print(1)\n")
    return proj


@pytest.fixture(scope="module")
def codes_dir(tmp_path_factory, run) -> Path:
    """A small real feature directory (2 classes of photo crops, 32 px) for commands that read one."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    root = tmp_path_factory.mktemp("faults")
    for name, img in zip(("temple", "flower"), load_sample_images().images):
        (root / "photos" / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(img[40 * i:40 * i + 120, 60 * i:60 * i + 120]).save(root / "photos" / name / f"{i}.png")
    with pytest.MonkeyPatch.context() as mp:  # module scope: the autouse cache fixture is per test
        mp.setenv("TRANSFERKIT_CACHE", str(root / "cache"))
        result = run("extract", root / "photos", *FAST, "-o", root / "codes")
    assert result.exit_code == 0, result.output
    return root / "codes"


# -- never delete a user's files ---------------------------------------------------------------------------


def test_extract_refuses_a_folder_it_did_not_write_and_leaves_it_byte_identical(user_project, photo_folder, run):
    """The reported reproduction: a folder with a meta.json was replaced, its other files deleted."""
    before = snapshot(user_project)
    result = run("extract", photo_folder, *FAST, "-o", user_project)
    assert result.exit_code == 1 and "was not written by transferkit" in result.output
    assert str(user_project) in result.output and result.output.count("\n") == 1  # one line
    assert snapshot(user_project) == before


@pytest.mark.parametrize("where", ["data", "inside", "parent"])
def test_extract_refuses_the_data_folder_itself_inside_it_and_above_it(photo_folder, where, run):
    (photo_folder / "meta.json").write_text("{}")  # the second reproduction: the images were all deleted
    out = {"data": photo_folder, "inside": photo_folder / "flower" / "codes", "parent": photo_folder.parent}[where]
    before = snapshot(photo_folder.parent)
    result = run("extract", photo_folder, *FAST, "-o", out)
    assert result.exit_code == 1, result.output
    assert ("input" in result.output or "not written by transferkit" in result.output), result.output
    assert snapshot(photo_folder.parent) == before


@pytest.mark.parametrize("where", ["data", "inside", "parent"])
@pytest.mark.parametrize("command", ["finetune", "run", "evaluate", "dense"])
def test_other_writers_refuse_the_data_folder_too(tmp_path, photo_folder, codes_dir, command, where, run):
    out = {"data": photo_folder, "inside": photo_folder / "flower" / "out", "parent": photo_folder.parent}[where]
    if command == "evaluate":
        assert run("probe", codes_dir, "-o", tmp_path / "model").exit_code == 0
    before = snapshot(photo_folder.parent)
    args = {
        "finetune": ["finetune", photo_folder, "--model", "test_resnet", "--weights", "random", "--epochs", "1"],
        "run": ["run", "small-similar", photo_folder],
        "evaluate": ["evaluate", tmp_path / "model", photo_folder],
        "dense": ["predict", "test_resnet", photo_folder / "flower", "--dense", "--weights", "random"],
    }[command]
    result = run(*args, "-o", out)
    assert result.exit_code == 1 and ("input" in result.output or "not written by" in result.output), result.output
    assert snapshot(photo_folder.parent) == before


@pytest.mark.parametrize("planted", ["meta.json", "shard-00000.npz", "checkpoint.json", "config.json", "notes.txt"])
@pytest.mark.parametrize("command", ["extract", "probe", "evaluate", "convert", "finetune", "run", "demo", "dense"])
def test_every_writer_refuses_a_folder_it_did_not_write(tmp_path, photo_folder, codes_dir, command, planted, run):
    out = tmp_path / "mine"
    out.mkdir()
    (out / planted).write_bytes(b'{"format": "transferkit.features/1"}')  # even a look-alike of ours
    (out / "keep.txt").write_text("my notes")
    before = snapshot(out)
    args = {
        "extract": ["extract", photo_folder, *FAST, "-o", out],
        "probe": ["probe", codes_dir, "-o", out],
        "evaluate": ["evaluate", tmp_path / "no-model", photo_folder, "-o", out],
        "convert": ["convert", "test_resnet", "--weights", "random", "-o", out],
        "finetune": ["finetune", photo_folder, "--model", "test_resnet", "--weights", "random", "--epochs", "1",
                     "-o", out],
        "run": ["run", "small-similar", photo_folder, "-o", out],
        "demo": ["demo", "-o", out],
        "dense": ["predict", "test_resnet", photo_folder / "flower" / "0.png", "--dense", "--weights", "random",
                  "-o", out],
    }[command]
    if command == "evaluate":  # a real model to evaluate: a probe on the small codes
        assert run("probe", codes_dir, "-o", tmp_path / "no-model").exit_code == 0
    result = run(*args)
    assert result.exit_code != 0, result.output
    assert snapshot(out) == before


def test_own_output_is_replaced_but_not_when_the_user_added_files(tmp_path, codes_dir, run):
    out = tmp_path / "probe"
    assert run("probe", codes_dir, "-o", out).exit_code == 0
    assert read_marker(out)["kind"] == "probe" and "probe/probe.json" in read_marker(out)["files"]
    assert run("probe", codes_dir, "-o", out).exit_code == 0  # its own output: replaced
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    result = run("probe", codes_dir, "-o", out)
    assert result.exit_code == 1 and "notes.txt" in result.output
    assert snapshot(out) == before
    result = run("extract", codes_dir.parent / "photos", *FAST, "-o", out)  # another kind: refused, not replaced
    assert result.exit_code == 1 and snapshot(out) == before


def test_probe_and_extract_like_never_overwrite_their_inputs(codes_dir, run):
    before = snapshot(codes_dir)
    assert run("probe", codes_dir, "-o", codes_dir).exit_code == 1
    assert run("extract", codes_dir.parent / "photos", "--like", codes_dir, "-o", codes_dir).exit_code == 1
    assert snapshot(codes_dir) == before


def test_export_replaces_only_a_file_it_exported(tmp_path, run):
    mine = tmp_path / "model.onnx"
    mine.write_bytes(b"someone else's model")
    result = run("export", "test_resnet", "--weights", "random", "-o", mine)
    assert result.exit_code == 1 and "not written by transferkit" in result.output
    assert mine.read_bytes() == b"someone else's model"


def test_stale_build_folders_of_dead_processes_are_removed_and_nothing_else(tmp_path, photo_folder, run):
    out = tmp_path / "codes"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".codes.{dead.pid}.0123abcd.tmp"
    live = tmp_path / f".codes.{os.getpid()}.4567abcd.tmp"
    foreign = tmp_path / f".codes.{dead.pid}.89abcdef.tmp"  # same pattern, but not ours: no marker
    for d in (stale, live, foreign):
        d.mkdir()
        (d / "shard-00000.npz").write_bytes(b"x")
    for d in (stale, live):
        (d / MARKER).write_text(json.dumps({"format": "transferkit.output/1", "kind": "features", "pid": 0,
                                            "host": __import__("socket").gethostname(), "files": None}))
    assert run("extract", photo_folder, *FAST, "-o", out).exit_code == 0
    assert not stale.exists() and live.exists() and foreign.exists()


def test_check_output_messages_name_the_folder(tmp_path, user_project):
    with pytest.raises(OutputError, match="proj"):
        check_output(user_project, "features")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        check_output(f, "features")
    assert check_output(tmp_path / "new", "features") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "empty", "features") == tmp_path / "empty"


# -- never serve wrong codes ------------------------------------------------------------------------------


def _flip_weight_signs(path: Path) -> None:
    """Flip the sign bit of 256 floats inside the largest weight tensor of an ONNX file, in place."""
    import onnx

    model = onnx.load(str(path))
    big = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    data = bytearray(path.read_bytes())
    start = data.find(big.raw_data[:256])
    assert start > 0
    for i in range(start + 3, start + 4 * 256, 4):  # little-endian float32: byte 3 holds the sign
        data[i] ^= 0x80
    path.write_bytes(bytes(data))


def test_damaged_engine_is_detected_rebuilt_and_never_gives_wrong_codes(photo_folder, tmp_path, code_cache, caplog):
    """The reproduction: sign bits flipped in a weight tensor of the cached engine gave codes 37% off, which then
    stayed in the code cache. Now every damage is caught at load (sha256 + check batch), the file rebuilt."""
    from transferkit.jobs import extract_features

    kw = {"weights": "package", "image_size": 32, "precision": "fp32", "engine": "onnxruntime", "progress": False}
    first = extract_features(photo_folder, tmp_path / "first", cache=False, **kw)
    want = first.load(first.keys[0])
    engine = next((code_cache / "engines").glob("*.onnx"))
    record = engine.with_name(engine.name + ".json")
    damages = {"sign bits": _flip_weight_signs,
               "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
               "no record": lambda p: record.unlink()}
    for i, (what, damage) in enumerate(damages.items()):
        damage(engine)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            again = extract_features(photo_folder, tmp_path / str(i), cache=i == 0, **kw)
        assert "failed verification" in caplog.text and engine.name in caplog.text, what
        assert again.meta["engine"] == "onnxruntime" and record.is_file(), what  # rebuilt and recorded
        np.testing.assert_array_equal(again.load(again.keys[0]), want, err_msg=what)
    cached = extract_features(photo_folder, tmp_path / "cached", **kw)  # what the code cache kept: right codes
    assert cached.meta["cache"]["cached"] == len(cached)
    np.testing.assert_array_equal(cached.load(cached.keys[0]), want)


def test_nan_codes_are_never_cached_or_written(photo_folder, tmp_path, code_cache, monkeypatch, run):
    from transferkit.codes.extractor import FeatureExtractor

    real = FeatureExtractor.model_codes

    def poisoned(self, x):
        codes = real(self, x)
        return {k: np.where(np.arange(len(v))[:, None] == 3, np.nan, v).astype(np.float32) for k, v in codes.items()}

    monkeypatch.setattr(FeatureExtractor, "model_codes", poisoned)
    result = run("extract", photo_folder, *FAST, "-o", tmp_path / "codes")
    assert result.exit_code == 1 and "not finite" in result.output and "flower" in result.output, result.output
    assert not (tmp_path / "codes").exists() and not list(code_cache.rglob("part-*.npz"))
    assert not list(tmp_path.glob(".codes.*"))


def test_cache_part_with_nan_is_dropped_and_recomputed(photo_folder, tmp_path, code_cache, caplog, run):
    assert run("extract", photo_folder, *FAST, "-o", tmp_path / "a").exit_code == 0
    part = next(code_cache.rglob("part-*.npz"))
    with np.load(part) as z:
        hashes, codes = z["hashes"], z["codes"].copy()
    codes[0, 0] = np.nan
    with open(part, "wb") as f:
        np.savez(f, hashes=hashes, codes=codes)
    with caplog.at_level(logging.WARNING):
        assert run("extract", photo_folder, *FAST, "-o", tmp_path / "b").exit_code == 0
    assert "NaN" in caplog.text
    a, b = FeatureStore(tmp_path / "a"), FeatureStore(tmp_path / "b")
    np.testing.assert_array_equal(a.load(a.keys[0]), b.load(b.keys[0]))
    assert b.meta["cache"]["computed"] == len(b)


# -- kills, full and read-only disks, concurrent writers ----------------------------------------------------


def _extract_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "transferkit", "-q", "extract", str(FMNIST / "train"), "--per-class", "100",
            "--batch-size", "4", *FAST, "-o", str(out), *extra]


@pytest.mark.skipif(not FMNIST.joinpath("train-images-idx3-ubyte.gz").exists(), reason="needs dataset-fashion-mnist")
def test_sigkill_during_extract_then_rerun_gives_bit_identical_codes(tmp_path):
    clean = subprocess.run(_extract_cmd(tmp_path / "clean", "--no-cache"), env=subprocess_env(tmp_path / "c0"),
                           capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr[-2000:]
    cache, out = tmp_path / "c1", tmp_path / "codes"
    proc = subprocess.Popen(_extract_cmd(out), env=subprocess_env(cache), start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(cache.rglob("part-*.npz"))) < 3 and proc.poll() is None:
        time.sleep(0.005)
    assert proc.poll() is None, "extract finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and list(tmp_path.glob(".codes.*.tmp"))  # nothing published, a build folder left
    rerun = subprocess.run(_extract_cmd(out), env=subprocess_env(cache), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert not list(tmp_path.glob(".codes.*"))  # the dead process's folder is gone
    a, b = FeatureStore(tmp_path / "clean"), FeatureStore(out)
    assert b.meta["cache"]["cached"] > 0 and b.sources == a.sources
    np.testing.assert_array_equal(b.load(b.keys[0]), a.load(a.keys[0]))


@pytest.mark.skipif(not FMNIST.joinpath("train-images-idx3-ubyte.gz").exists(), reason="needs dataset-fashion-mnist")
def test_concurrent_extracts_to_one_output_and_one_cache(tmp_path, monkeypatch, cli_run):
    cache, out = tmp_path / "cache", tmp_path / "codes"
    procs = [subprocess.Popen(_extract_cmd(out), env=subprocess_env(cache), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _ in results), results
    store = FeatureStore(out)
    assert len(store) == 1000 and not list(tmp_path.glob(".codes.*"))
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(cache))
    info = cli_run("cache", "info", "-v", ok=False, catch=True)
    assert info.exit_code == 0 and " 1000 images" in info.output, info.output  # each image once, not twice


@pytest.fixture()
def small_disk(tmp_path):
    """A 2 MiB tmpfs (needs root and mount rights; skipped with the reason otherwise)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_output_disk_names_the_path_and_leaves_nothing(small_disk, tmp_path):
    (small_disk / "filler").write_bytes(b"\0" * (2 * 1024 * 1024 - 64 * 1024))
    from transferkit.recipes.demo import fashion_mnist

    data = fashion_mnist("train").subset(30)
    from transferkit.jobs import extract_features

    with pytest.raises(OSError, match="No space left on device") as err:
        extract_features(data, small_disk / "codes", weights="package", image_size=64, layer="all", pool="all",
                         precision="fp32", engine="torch", cache=False, progress=False)
    assert str(small_disk) in str(err.value.filename)
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_read_only_output_and_cache_disks(small_disk, photo_folder, monkeypatch, caplog, run):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    result = run("extract", photo_folder, *FAST, "-o", small_disk / "codes")
    assert result.exit_code == 1 and str(small_disk) in result.output and "Read-only" in result.output
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(small_disk / "cache"))  # the cache is only an optimisation
    out = small_disk.parent / "codes"
    with caplog.at_level(logging.WARNING):
        result = run("extract", photo_folder, *FAST, "--batch-size", "4", "-o", out)
    assert result.exit_code == 0 and caplog.text.count("going on without storing codes") == 1, result.output
    assert len(FeatureStore(out)) == 16


# -- no pickle is ever executed ---------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def __reduce__(self):
        return (Path.touch, (self.flag,))


def test_untrusted_pickles_are_never_executed(tmp_path, codes_dir, photo_folder, code_cache, run):
    import shutil

    import torch

    flag = tmp_path / "pwned"
    # a weights file
    torch.save({"w": _Payload(flag)}, tmp_path / "evil.pth")
    assert run("extract", photo_folder, "--weights", tmp_path / "evil.pth", "--image-size", "32",
               "-o", tmp_path / "o1").exit_code == 1
    # a feature shard with an object array
    evil_codes = tmp_path / "evil-codes"
    shutil.copytree(codes_dir, evil_codes)
    shard = next(evil_codes.glob("shard-*.npz"))
    with np.load(shard) as z:
        arrays = dict(z)
    arrays[next(k for k in arrays if "|" in k)] = np.array([_Payload(flag)] * len(arrays["labels"]), dtype=object)
    np.savez(shard, **arrays)
    assert run("probe", evil_codes, "-o", tmp_path / "o2").exit_code == 1
    # a probe's arrays
    assert run("probe", codes_dir, "-o", tmp_path / "probe").exit_code == 0
    arrays_file = tmp_path / "probe" / "probe" / "arrays.npz"
    with np.load(arrays_file) as z:
        arrays = dict(z)
    arrays["coef"] = np.array([_Payload(flag)], dtype=object)
    np.savez(arrays_file, **arrays)
    assert run("predict", tmp_path / "probe", photo_folder / "flower" / "0.png").exit_code == 1
    # a code-cache part
    assert run("extract", photo_folder, *FAST, "-o", tmp_path / "o3").exit_code == 0
    part = next(code_cache.rglob("part-*.npz"))
    buf = io.BytesIO()
    pickle.dump(_Payload(flag), buf)
    with np.load(part) as z:
        arrays = dict(z)
    arrays["codes"] = np.array([_Payload(flag)] * len(arrays["hashes"]), dtype=object)
    np.savez(part, **arrays)
    assert run("extract", photo_folder, *FAST, "-o", tmp_path / "o4").exit_code == 0  # the part is dropped
    assert not flag.exists()


def test_library_errors_are_transferkit_errors():
    assert issubclass(OutputError, TransferkitError)


def test_skip_bad_reports_many_bad_files_in_one_line(photo_folder, tmp_path, caplog, run):
    for i in range(8):
        (photo_folder / "flower" / f"bad{i}.png").write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING):
        result = run("extract", photo_folder, *FAST, "--skip-bad", "-o", tmp_path / "codes")
    assert result.exit_code == 0, result.output
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 1 and "skipped 8 unreadable image(s)" in lines[0]
    assert len(set(re.findall(r"bad\d\.png", lines[0]))) == 3  # the first few; the rest only in meta.json
    assert len(FeatureStore(tmp_path / "codes").meta["skipped"]) == 8  # the full list


def test_cache_clean_removes_temp_files_of_dead_processes_only(code_cache, cli_run):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    space = code_cache / "codes" / "0123"
    space.mkdir(parents=True)
    stale, live = space / f".part-a.npz.{dead.pid}.x1y2.tmp", space / f".part-b.npz.{os.getpid()}.x3y4.tmp"
    for f in (stale, live):
        f.write_bytes(b"half a part")
    result = cli_run("cache", "clean", "--model", "none-such", ok=False, catch=True)
    assert result.exit_code == 0 and not stale.exists() and live.exists(), result.output
