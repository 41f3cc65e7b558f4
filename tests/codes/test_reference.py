"""Codes from the CLI equal a stored reference made by transferkit before the package was reorganised
(commit bfd6633, flat modules): a refactoring must not move a single bit of anyone's codes.

The reference was made on one CPU; oneDNN may pick other kernels on another, so there the codes are
compared to 1e-5 (relative) and bit-identity is asserted only on a CPU with the same model and flags.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

REFERENCE = Path(__file__).with_name("reference_codes.npz")


def photos(root: Path, sample_images) -> Path:
    """16 crops of scikit-learn's two photos, 64 px, the same as when the reference was made."""
    rng = np.random.default_rng(0)
    for cls, name in (("temple", "china.jpg"), ("flower", "flower.jpg")):
        img = np.asarray(sample_images[name])
        (root / cls).mkdir(parents=True)
        for i in range(8):
            x, y = rng.integers(0, img.shape[1] - 200), rng.integers(0, img.shape[0] - 200)
            Image.fromarray(img[y:y + 200, x:x + 200]).resize((64, 64)).save(root / cls / f"{i}.png")
    return root


def test_cli_codes_equal_the_reference_made_before_the_reorganisation(tmp_path, sample_images, cli_run):
    data = photos(tmp_path / "photos", sample_images)
    out = tmp_path / "codes"
    cli_run("-q", "extract", data, "--weights", "package", "--image-size", "32", "--layer", "blocks.2,pre_logits",
            "--pool", "avg,2x2", "--precision", "fp32", "--engine", "torch", "--no-cache", "-o", out)
    meta = json.loads((out / "meta.json").read_text())
    with np.load(out / meta["shards"][0]["file"]) as z:
        got = {k.replace("|", "__"): z[k] for k in z.files}
    ref = np.load(REFERENCE)
    lines = Path("/proc/cpuinfo").read_text().splitlines(keepends=True)
    cpu = "".join(ln for ln in lines if ln.startswith(("model name", "flags")))
    same_cpu = cpu.startswith(str(ref["cpu"]))
    for key in ("blocks.2__avg", "blocks.2__2x2", "pre_logits__avg", "labels", "index"):
        if same_cpu:
            np.testing.assert_array_equal(got[key], ref[key], err_msg=key)
        else:
            np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, atol=1e-6 * np.abs(ref[key]).max(), err_msg=key)
