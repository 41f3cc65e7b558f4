"""ONNX export of a converted (fully convolutional) classifier: dynamic batch, height and width, checked against
torch, and a file that describes itself.

Why this exporter: torch.onnx's dynamo path took 2-7 minutes (126-438 s), nearly all of it in torch.export's
symbolic shape tracing and ONNX translation (the breakdown is in docs/surgery.md). The tracing exporter
(`dynamo=False`, `dynamic_axes`) takes seconds; timm's TF-"SAME" layers are written as one ONNX node each
(`onnx_same`). Tracing records one path through Python: a size computed from Python ints would be frozen at the
export size, so the written file is checked against torch at the training size and at an odd larger size
(batch 2) before it is published.

The file's `metadata_props` say how to use it without transferkit: classes, mean, std, the training input size,
layout and dtype of the input, what the output is (logits or SVM scores per cell, multi-label thresholds), the
transferkit version (PRODUCER: a later export may replace only a file that carries it).
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from transferkit import __version__
from transferkit.codes.ort_engine import OPSET, quiet_exporter
from transferkit.errors import ModelError
from transferkit.runtime.atomic import atomic_write
from transferkit.runtime.outputs import check_output_file
from transferkit.runtime.params import validate
from transferkit.surgery.dense import DenseClassifier
from transferkit.surgery.onnx_same import exportable, register_symbolics
from transferkit.surgery.params import EXPORT, FORMATS, INPUT_FORMATS  # noqa: F401 - FORMATS: the public list

log = logging.getLogger(__name__)

PRODUCER = "transferkit.version"  # metadata key: the file was exported by transferkit (this version)
FILE_FORMAT = "transferkit.onnx/1"  # what the metadata keys below mean; bumped if that changes
# onnxruntime vs torch on the same input: max |difference| <= RTOL x max |torch score| (fp32: only summation
# order differs; measured 1e-5 to 5e-5 on lite0 logits of magnitude ~10-20)
RTOL = 1e-4
DIMS = {"float": {0: "batch", 2: "height", 3: "width"}, "uint8": {0: "batch", 2: "height", 3: "width"},
        "uint8-nhwc": {0: "batch", 1: "height", 2: "width"}}


class Pixels(nn.Module):
    """uint8 RGB pixels -> the net's normalised float input: x / 255, then (x - mean) / std, as one x·a + b."""

    def __init__(self, net: nn.Module, mean, std, nhwc: bool) -> None:
        super().__init__()
        self.net, self.nhwc = net, nhwc
        std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", 1 / (255 * std))
        self.register_buffer("shift", -torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) / std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2) if self.nhwc else x  # (B, H, W, 3) -> (B, 3, H, W)
        return self.net(x.float() * self.scale + self.shift)


@dataclass
class Exported:
    """What `export_onnx` did: the file, seconds per stage, and the parity rows of its check (`check_onnx`)."""

    path: Path
    seconds: dict[str, float] = field(default_factory=dict)
    checks: list[dict] = field(default_factory=list)


def export_onnx(clf: DenseClassifier, path: str | Path, *, input_format: str = "float", check: bool = True,
                progress: Callable[[str], object] | None = None, verbose: bool = False) -> Exported:
    """Write `clf.net` as ONNX: input 'image' ('float': (B, 3, H, W) normalised; 'uint8': raw (B, 3, H, W)
    pixels; 'uint8-nhwc': (B, H, W, 3)), output 'scores' (B, K, h, w). With `check`, the written file must
    match torch (`check_onnx`) before it replaces `path`. `progress` is called with each stage's name as it
    starts ('tracing', 'writing', 'checking'); `verbose` lets the exporter's own warnings and logs through."""
    validate(EXPORT, {"input_format": input_format, "check": check, "progress": progress}, "export_onnx")
    path = check_output_file(path, written_here)
    done = Exported(path)

    def write(tmp: Path) -> None:
        with _stage(done, "tracing", progress):
            graph = _trace(clf, input_format, verbose)
        with _stage(done, "writing", progress):
            import onnx

            model = onnx.load_from_string(graph)
            onnx.helper.set_model_props(model, metadata(clf, input_format))
            model.doc_string = (f"transferkit {__version__}: {clf.spec.get('model')} ({clf.spec.get('kind')}), "
                                "fully convolutional; see metadata_props")
            onnx.save(model, str(tmp))
        if check:
            with _stage(done, "checking", progress):
                try:
                    done.checks = check_onnx(clf, tmp, default_check_sizes(clf))
                except ModelError as e:
                    raise ModelError(f"{e}; '{path}' not written") from e

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, write)
    except (OSError, ModelError):  # a full disk (the CLI names the file), or a check that failed: said as is
        raise
    except Exception as e:  # noqa: BLE001 - the exporter raises many types; all mean "not exportable"
        raise ModelError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
    log.info("exported %s in %.1f s (%s)", path, sum(done.seconds.values()),
             ", ".join(f"{k} {v:.1f} s" for k, v in done.seconds.items()))
    return done


@contextmanager
def _stage(done: Exported, name: str, progress: Callable[[str], object] | None) -> Iterator[None]:
    """Time one stage into `done.seconds`, telling `progress` its name first."""
    if progress is not None:
        progress(name)
    start = time.perf_counter()
    yield
    done.seconds[name] = time.perf_counter() - start


def _trace(clf: DenseClassifier, input_format: str, verbose: bool) -> bytes:
    """The ONNX graph of `clf.net` (SAME layers as single nodes), traced once at the training size."""
    register_symbolics()
    net, _ = exportable(clf.net)
    h, w = clf.net.input_size
    example = torch.zeros(1, 3, h, w)
    if input_format != "float":
        net = Pixels(net, clf.mean, clf.std, nhwc=input_format == "uint8-nhwc").eval()
        example = torch.zeros(1, h, w, 3, dtype=torch.uint8) if net.nhwc else example.to(torch.uint8)
    buffer = io.BytesIO()
    with quiet_exporter(not verbose), torch.no_grad():
        torch.onnx.export(net, (example,), buffer, dynamo=False, input_names=["image"], output_names=["scores"],
                          dynamic_axes={"image": DIMS[input_format],
                                        "scores": {0: "batch", 2: "map_height", 3: "map_width"}},
                          opset_version=OPSET, do_constant_folding=True)
    return buffer.getvalue()


def metadata(clf: DenseClassifier, input_format: str = "float") -> dict[str, str]:
    """The file's metadata_props (strings; lists as JSON): everything needed to feed it and read its scores."""
    h, w = clf.net.input_size
    logits, multilabel = clf.scores == "logits", clf.multilabel
    kind = "logits" if logits else "SVM decision values"
    raw = input_format != "float"
    meta = {
        PRODUCER: __version__, "transferkit.format": FILE_FORMAT,
        "model": str(clf.spec.get("model")), "source_kind": str(clf.spec.get("kind")),
        "classes": json.dumps(clf.classes), "mean": json.dumps(list(clf.mean)), "std": json.dumps(list(clf.std)),
        "input_size": json.dumps([h, w]), "input_format": input_format,
        "layout": "NHWC" if input_format == "uint8-nhwc" else "NCHW", "input_dtype": "uint8" if raw else "float32",
        "input": ("RGB pixels 0-255; scaling and mean/std are inside the graph" if raw else
                  "RGB scaled to [0, 1], then (x - mean) / std per channel") +
                 f"; height and width are free (trained at {h}x{w}: resize a whole image to it to classify it "
                 "as in training" + ("" if clf.net.mean_is_logits else f"; at least {h}x{w}") + ")",
        "output": f"scores (batch, classes, map_height, map_width): {kind} of each cell's receptive field; "
                  + ("their mean over cells is the image's " + kind + " at any input size" if clf.net.mean_is_logits
                     else "at the training size the map is 1x1: the image's " + kind),
        "scores": "logits" if logits else "svm", "probabilities": clf.probability_kind,  # as predict --dense says
        "temperature": json.dumps(clf.temperature),  # scores are divided by it first; null: 1 (not calibrated)
        "multilabel": json.dumps(multilabel), "mean_is_logits": json.dumps(clf.net.mean_is_logits),
    }
    if not clf.net.mean_is_logits:
        meta["min_input_size"] = json.dumps([h, w])
    if multilabel:  # a label is present where its score (a sigmoid for logits) reaches its threshold
        meta["thresholds"] = json.dumps([t if np.isfinite(t) else str(t) for t in clf.thresholds])
        meta["thresholds_on"] = "sigmoid of the mean logit" if logits else "mean SVM score"
    return meta


def written_here(path: Path) -> bool:
    """Whether `path` is an ONNX file that transferkit exported (so `export -o` may replace it)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not ONNX at all: not ours
        return False
    return any(prop.key == PRODUCER for prop in model.metadata_props)


def default_check_sizes(clf: DenseClassifier) -> list[tuple[int, int, int]]:
    """(batch, H, W) the export is checked at: the training size, and an odd larger size (batch 2), so a size
    or batch frozen by tracing shows; only a little larger (a window head needs at least the training size),
    as the check runs the network twice (torch and onnxruntime) on every pixel."""
    h, w = clf.net.input_size
    return [(1, h, w), (2, h + h // 4 + 1, w + 5)]


def check_onnx(clf: DenseClassifier, path: str | Path, sizes: list[tuple[int, int] | tuple[int, int, int]], *,
               seed: int = 0) -> list[dict]:
    """Run the ONNX file in onnxruntime on random pixels at each (H, W) or (batch, H, W), fed as its metadata
    says (input_format), and compare with torch: one row per size; ModelError beyond RTOL."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as OrtEngine: no busy-waiting
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    form = session.get_modelmeta().custom_metadata_map.get("input_format", "float")
    rows = []
    for size in sizes:
        b, h, w = size if len(size) == 3 else (1, *size)
        pixels = np.random.default_rng(seed).integers(0, 256, (b, h, w, 3), dtype=np.uint8)
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
        x = (x - torch.tensor(clf.mean).view(1, 3, 1, 1)) / torch.tensor(clf.std).view(1, 3, 1, 1)
        with torch.no_grad():
            want = clf.net(x).numpy()
        feed = {"float": x.numpy(), "uint8": pixels.transpose(0, 3, 1, 2).copy(), "uint8-nhwc": pixels}[form]
        got = session.run(["scores"], {"image": feed})[0]
        if got.shape != want.shape:
            raise ModelError(f"the ONNX file's output {got.shape} differs in shape from torch's {want.shape} at "
                             f"{h}x{w}: the export froze a size")
        diff, scale = float(np.abs(got - want).max()), max(1.0, float(np.abs(want).max()))
        if not diff <= RTOL * scale:
            raise ModelError(f"the ONNX file differs from torch by {diff:.3g} at {h}x{w} (scores up to {scale:.3g}; "
                             f"allowed {RTOL:g} of that)")
        rows.append({"size": [h, w], "batch": b, "map": list(got.shape[-2:]), "max_abs_diff": diff})
    return rows
