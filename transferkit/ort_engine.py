"""ONNX Runtime as the engine for CNN codes on CPU: the network exported once, cached on disk, checked against torch.

Why: on this kind of CPU, ONNX Runtime's fp32 kernels (blocked NCHWc convolutions, fused depthwise + ReLU6)
run tf_efficientnet_lite0 faster than torch's bf16 path, and the codes stay fp32 (bench/inference_variants.py).
Exporting (torch.onnx, dynamo) costs seconds, so the file is cached under the code-cache root, keyed by
everything that changes the graph, and FeatureExtractor uses it only where that pays off. A fresh export is
compared with the torch network on an example batch and discarded if the two disagree, so a model the
exporter gets wrong costs speed, never accuracy.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from transferkit.atomic import atomic_write

log = logging.getLogger(__name__)

OPSET = 18
FOLDED = "transferkit.folded_batchnorms"  # metadata key in the exported file


def available() -> bool:
    """Whether onnxruntime and the exporter's onnxscript are installed (the `onnx` extra)."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnxscript", "onnx"))


class CodesNet(nn.Module):
    """A backbone as one graph: image batch in, a tuple of codes out (one per key, in `keys` order)."""

    def __init__(self, backbone: nn.Module, codes_fn, pairs: Sequence) -> None:
        super().__init__()
        self.backbone, self.codes_fn, self.pairs = backbone, codes_fn, list(pairs)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.codes_fn(self.backbone, x, self.pairs).values())


class OrtEngine:
    """Runs an exported CodesNet: (B, 3, H, W) float32 -> {key: (B, D) float32}.

    `folded` is the number of BatchNorms folded into the exported network (stored in the file), so a
    cached engine needs no torch network at all.
    """

    def __init__(self, path: Path, keys: Sequence[str], threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.keys, self.path = list(keys), path
        if len(self.session.get_outputs()) != len(self.keys):
            raise ValueError(f"{path} has {len(self.session.get_outputs())} outputs, expected {len(self.keys)}")
        self.folded = int(self.session.get_modelmeta().custom_metadata_map[FOLDED])

    def __call__(self, x: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
        x = x.float().contiguous().numpy() if isinstance(x, torch.Tensor) else np.ascontiguousarray(x, np.float32)
        return dict(zip(self.keys, self.session.run(None, {self.input: x})))


def export_codes(net: CodesNet, path: Path, side: int, folded: int) -> None:
    """Write `net` as ONNX with a dynamic batch and a fixed side x side input (the exporter's chatter silenced),
    recording `folded` in the file's metadata."""
    example = torch.zeros(2, 3, side, side)
    batch = torch.export.Dim("batch", min=1, max=65536)

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(net.eval(), (example,), dynamo=True, input_names=["image"],
                                        dynamic_shapes=({0: batch},), opset_version=OPSET, verbose=False)
            program.save(str(tmp))
        import onnx

        model = onnx.load(str(tmp))
        onnx.helper.set_model_props(model, {FOLDED: str(folded)})
        onnx.save(model, str(tmp))

    quiet = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "torch.export", "torch._dynamo")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        atomic_write(path, write)
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)


@torch.no_grad()
def load_or_export(build: Callable[[], tuple[CodesNet, int]], keys: Sequence[str], side: int, path: Path,
                   threads: int, *, rtol: float = 1e-3, atol: float = 1e-4) -> OrtEngine | None:
    """The engine from `path`, or exported from `build()` -> (net, BatchNorms folded) if the file is missing;
    None (torch stays) if either fails. `build` is only called for an export: a cached file needs no network.

    A new export must reproduce the torch codes on a random batch within rtol/atol (fp32 vs fp32: only
    summation order differs) before it is kept.
    """
    fresh = not path.is_file()
    try:
        if fresh:
            net, folded = build()
            log.info("exporting the network to ONNX Runtime once (a few seconds; cached in %s)", path.parent)
            path.parent.mkdir(parents=True, exist_ok=True)
            export_codes(net, path, side, folded)
        engine = OrtEngine(path, keys, threads)
        if fresh:
            x = torch.randn(3, 3, side, side, generator=torch.Generator().manual_seed(0))
            want = dict(zip(keys, (t.float().numpy() for t in net(x))))
            got = engine(x)
            for key in keys:
                if got[key].shape != want[key].shape or not np.allclose(got[key], want[key], rtol=rtol, atol=atol):
                    worst = float(np.abs(got[key] - want[key]).max()) if got[key].shape == want[key].shape else "shape"
                    raise ValueError(f"'{key}' differs from torch by up to {worst}")
        return engine
    except Exception as exc:  # noqa: BLE001 - exporter and runtime raise many types; all mean "use torch"
        log.warning("ONNX Runtime engine unavailable for this network (%s: %s); running torch",
                    type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
        path.unlink(missing_ok=True)
        return None
