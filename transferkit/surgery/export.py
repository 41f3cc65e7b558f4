"""ONNX export of a converted (fully convolutional) classifier, with dynamic batch, height and width.

The exporter is torch.onnx's dynamo path (needs the `onnxscript` package); height and width are symbolic,
so TF-"SAME" padding (timm's Conv2dSame) is computed from the actual input inside the graph, not frozen at
the export size. The file is checked in onnxruntime, when installed, on two input sizes against torch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from transferkit import __version__
from transferkit.errors import ModelError
from transferkit.runtime.atomic import atomic_write
from transferkit.runtime.outputs import check_output_file
from transferkit.surgery.dense import DenseClassifier

log = logging.getLogger(__name__)

FORMATS = ("onnx",)
PRODUCER = "transferkit.version"  # metadata key: the file was exported by transferkit (this version)


def export_onnx(clf: DenseClassifier, path: str | Path, *, opset: int = 18) -> Path:
    """Write `clf.net` as ONNX (input 'image' (B, 3, H, W), output 'scores' (B, K, h, w)); return the path."""
    path = check_output_file(path, written_here)
    h, w = clf.net.input_size
    x = torch.zeros(1, 3, 2 * h, 2 * w)  # an example larger than the minimum, so no size is special-cased
    dims = {0: torch.export.Dim("batch", min=1, max=1024), 2: torch.export.Dim("height", min=h, max=8192),
            3: torch.export.Dim("width", min=w, max=8192)}

    def write(tmp: Path) -> None:
        import onnx

        program = torch.onnx.export(clf.net.eval(), (x,), dynamo=True, input_names=["image"], output_names=["scores"],
                                    dynamic_shapes=({**dims},), opset_version=opset, verbose=False)
        program.save(str(tmp))
        model = onnx.load(str(tmp))
        onnx.helper.set_model_props(model, {PRODUCER: __version__})  # how a later export knows it may replace it
        onnx.save(model, str(tmp))

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, write)
    except OSError:  # a full or read-only disk: the CLI names the file
        raise
    except Exception as e:  # noqa: BLE001 - the exporter raises many types; all mean "not exportable"
        raise ModelError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
    return path


def written_here(path: Path) -> bool:
    """Whether `path` is an ONNX file that transferkit exported (so `export -o` may replace it)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not ONNX at all: not ours
        return False
    return any(prop.key == PRODUCER for prop in model.metadata_props)


def check_onnx(clf: DenseClassifier, path: str | Path, sizes: list[tuple[int, int]], *, seed: int = 0) -> list[dict]:
    """Run the ONNX file in onnxruntime at each (H, W) and compare with torch: max |difference| per size."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rows = []
    for h, w in sizes:
        x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            want = clf.net(x).numpy()
        got = session.run(["scores"], {"image": x.numpy()})[0]
        if got.shape != want.shape:
            raise ModelError(f"ONNX output {got.shape} differs in shape from torch {want.shape} at {h}x{w}")
        rows.append({"size": [h, w], "map": list(got.shape[-2:]), "max_abs_diff": float(np.abs(got - want).max())})
    return rows
