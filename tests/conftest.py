"""Shared fixtures: real images from scikit-learn, the packaged EfficientNet-Lite0, small folders on disk."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub path fails fast instead of retrying for a minute
torch.manual_seed(0)


@pytest.fixture(autouse=True)
def code_cache(tmp_path_factory, monkeypatch) -> Path:
    """Each test gets its own empty code cache, so no test reuses another's codes (or the user's)."""
    root = tmp_path_factory.mktemp("codecache")
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: thread synchronisation costs more than it saves (and 10x more on a busy machine).
    A module asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sample_images() -> dict[str, Image.Image]:
    """scikit-learn's two real photos: china.jpg (a temple) and flower.jpg (a daisy)."""
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    return {Path(f).name: Image.fromarray(img) for f, img in zip(data.filenames, data.images)}


@pytest.fixture(scope="session")
def lite0():
    """The default backbone with its packaged ImageNet weights."""
    from transferkit.models.backbones import create_backbone

    return create_backbone()


def _write_photo_folder(root: Path, sample_images) -> Path:
    """An ImageFolder tree with two classes of real photo crops (8 per class), as JPEG and PNG."""
    rng = np.random.default_rng(0)
    for cls, name in (("temple", "china.jpg"), ("flower", "flower.jpg")):
        img = sample_images[name]
        (root / cls).mkdir(parents=True)
        for i in range(8):
            x, y = rng.integers(0, img.width - 200), rng.integers(0, img.height - 200)
            crop = img.crop((x, y, x + 200, y + 200)).resize((64, 64))
            crop.save(root / cls / f"{i}.{'jpg' if i % 2 else 'png'}")
    return root


@pytest.fixture()
def photo_folder(tmp_path: Path, sample_images) -> Path:
    """An ImageFolder tree with two classes of real photo crops (8 per class), as JPEG and PNG."""
    return _write_photo_folder(tmp_path / "photos", sample_images)


@pytest.fixture(scope="module")
def shared_photo_folder(tmp_path_factory, sample_images) -> Path:
    """photo_folder, made once per module for module-scoped fixtures (a finished run to resume): only read it."""
    return _write_photo_folder(tmp_path_factory.mktemp("shared") / "photos", sample_images)


@pytest.fixture()
def digits_folder(tmp_path: Path) -> Path:
    """scikit-learn's handwritten digits as an ImageFolder: 10 classes x 20 PNGs (8x8 scans, 0..16 grey)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path / "digits"
    for label in range(10):
        (root / str(label)).mkdir(parents=True)
        for i, img in enumerate(digits.images[digits.target == label][:20]):
            Image.fromarray((img * 255 / 16).astype(np.uint8)).save(root / str(label) / f"{i:02d}.png")
    return root


@pytest.fixture(scope="session")
def cli_run():
    """Run the transferkit CLI in-process: `cli_run(*args, ok=True, catch=False)` -> click's Result.

    Each argument is passed as str(arg). `ok` asserts exit code 0 (showing the output if not). `catch=True` keeps an
    uncaught exception in the result (exit code 1, `result.exception`) instead of raising it in the test.
    """
    from click.testing import CliRunner

    from transferkit.cli import cli

    def run(*args, ok: bool = True, catch: bool = False):
        result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=catch)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    return run


@pytest.fixture(scope="session")
def old_probe_format():
    """Rewrite a saved probe folder (arrays.npz + probe.json) as transferkit wrote it before probes were calibrated
    (format 2: no temperature or Platt arrays, no 'calibration', no 'calibrate' parameter)."""
    import hashlib
    import io
    import json

    def rewrite(folder: Path) -> Path:
        meta = json.loads((folder / "probe.json").read_text())
        with np.load(folder / "arrays.npz") as npz:
            arrays = {k: npz[k] for k in npz.files if k not in ("temperature", "platt")}
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        (folder / "arrays.npz").write_bytes(buffer.getvalue())
        del meta["calibration"], meta["params"]["calibrate"]
        meta.update(version=2, arrays_sha256=hashlib.sha256(buffer.getvalue()).hexdigest())
        (folder / "probe.json").write_text(json.dumps(meta))
        return folder

    return rewrite
