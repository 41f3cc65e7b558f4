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

from transferkit.dense import DenseClassifier
from transferkit.errors import ModelError

log = logging.getLogger(__name__)

FORMATS = ("onnx",)


def export_onnx(clf: DenseClassifier, path: str | Path, *, opset: int = 18) -> Path:
    """Write `clf.net` as ONNX (input 'image' (B, 3, H, W), output 'scores' (B, K, h, w)); return the path."""
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as e:
        raise ModelError("ONNX export needs the 'onnxscript' and 'onnx' packages: "
                         "pip install onnx onnxscript onnxruntime") from e
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = clf.net.input_size
    x = torch.zeros(1, 3, 2 * h, 2 * w)  # an example larger than the minimum, so no size is special-cased
    dims = {0: torch.export.Dim("batch", min=1, max=1024), 2: torch.export.Dim("height", min=h, max=8192),
            3: torch.export.Dim("width", min=w, max=8192)}
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        program = torch.onnx.export(clf.net.eval(), (x,), dynamo=True, input_names=["image"], output_names=["scores"],
                                    dynamic_shapes=({**dims},), opset_version=opset, verbose=False)
        program.save(str(tmp))
    except Exception as e:  # noqa: BLE001 - the exporter raises many types; all mean "not exportable"
        tmp.unlink(missing_ok=True)
        raise ModelError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
    tmp.replace(path)
    return path


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
