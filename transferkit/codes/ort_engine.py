"""ONNX Runtime as the engine for CNN codes on CPU: the network exported once, cached on disk, checked against torch.

Why: on this kind of CPU, ONNX Runtime's fp32 kernels (blocked NCHWc convolutions, fused depthwise + ReLU6)
run tf_efficientnet_lite0 faster than torch's bf16 path, and the codes stay fp32 (bench/inference_variants.py).
Exporting (torch.onnx, dynamo) costs seconds, so the file is cached under the code-cache root, keyed by
everything that changes the graph, and FeatureExtractor uses it only where that pays off. A fresh export is
compared with the torch network on an example batch and discarded if the two disagree, so a model the
exporter gets wrong costs speed, never accuracy.

int8 (`quantize`): ONNX Runtime's static quantization of that fp32 file (QDQ; int8 weights per output channel,
uint8 activations whose ranges come from running a fixed set of calibration images). On CPUs with
AVX512-VNNI it runs the codes 2-2.5x faster than fp32 (docs/speed.md). The calibration images are crops of
scikit-learn's two sample photos, chosen by a fixed seed, not the user's data: so every run, on every data
set, gets the same quantizer for the same network, and a training set and its test set are encoded alike.
A new int8 file is kept only if its codes on other crops point the way the fp32 codes do (MIN_COSINE).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from transferkit.runtime.atomic import atomic_write, file_sha256, write_json_atomic

log = logging.getLogger(__name__)

OPSET = 18
FOLDED = "transferkit.folded_batchnorms"  # metadata key in the exported file
COSINE = "transferkit.int8_cosine"  # metadata key of an int8 file: mean cosine of its codes to fp32's
# What defines an int8 engine (part of its cache key and recorded in meta.json). Percentile calibration:
# at 224 px, MinMax (every value seen, however rare) gave codes with cosine 0.96 mean / 0.80 worst to fp32,
# percentile 0.98 / 0.91 (bench/int8_calibration.py, docs/speed.md). `crops` is the most; see int8_recipe
INT8 = {"calibration": "sklearn sample photos", "crops": 128, "seed": 0, "method": "percentile 99.999",
        "format": "QDQ", "weights": "int8 per channel", "activations": "uint8"}
# Calibration cost grows with the pixels calibrated, and the first run at 224 px paid 43.7 s for 128 crops. 32 crops
# at 224 px (11.4 s) kept the codes: Fashion-MNIST test codes' cosine to fp32 0.979 (128) vs 0.980 (32) mean, and a
# probe on 1,000 training images scored 84.50% (128) vs 84.65% (32), fp32 84.45% (2,000 test images, 2026-11-26).
# Small inputs need the crops (at 32 px, 32 crops left the check at 0.949 < MIN_COSINE) and cost little: so a
# fixed number of pixels, 32 crops' worth at 224 px, within 32..128 crops
CALIBRATION_PIXELS = 32 * 224 * 224
MIN_COSINE = 0.95  # mean cosine to the fp32 codes, on held-out crops, for a new int8 file to be kept
SIDECAR_FORMAT = "transferkit.engine/1"  # ENGINE.onnx.json: sha256 and check-batch signature (open_verified)
# How far a cached engine's codes on the check batch may move from those recorded when it was built (relative L2
# of the signature): fp32 is checked against torch's codes (only summation order differs); int8 against its own
# (another CPU may round a few activations differently)
FP32_TOLERANCE, INT8_TOLERANCE = 1e-3, 2e-2


def _why(exc: Exception) -> str:
    """'Type: first line of the message', short enough for a one-line warning."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


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
        # no busy-waiting between kernels: the cores go to the thread decoding the next batch (data.decode_ahead)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.keys, self.path = list(keys), path
        if len(self.session.get_outputs()) != len(self.keys):
            raise ValueError(f"{path} has {len(self.session.get_outputs())} outputs, expected {len(self.keys)}")
        meta = self.session.get_modelmeta().custom_metadata_map
        self.folded = int(meta[FOLDED])
        self.cosine = float(meta[COSINE]) if COSINE in meta else None  # int8 files only

    def __call__(self, x: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
        x = x.float().contiguous().numpy() if isinstance(x, torch.Tensor) else np.ascontiguousarray(x, np.float32)
        return dict(zip(self.keys, self.session.run(None, {self.input: x})))


def check_batch(side: int) -> torch.Tensor:
    """The fixed input every engine is checked on, when built and at each load: 3 images of seeded noise."""
    return torch.randn(3, 3, side, side, generator=torch.Generator().manual_seed(0))


def _signature(codes: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """A fixed random projection of each key's (3, D) codes to 3 x 8 numbers: small enough for JSON, and any
    change of the codes beyond rounding changes it."""
    sig = {}
    for key, c in codes.items():
        c = np.asarray(c, np.float64).reshape(len(c), -1)
        proj = np.random.default_rng(0).standard_normal((c.shape[1], 8)) / np.sqrt(c.shape[1])
        sig[key] = (c @ proj).ravel().tolist()
    return sig


def record(path: Path, reference: dict[str, np.ndarray], tolerance: float) -> None:
    """Write `path`'s sidecar: its sha256 and the signature of `reference` (its codes of `check_batch`), which
    `open_verified` checks before the engine is used. Without a sidecar an engine file is never used."""
    write_json_atomic(sidecar(path), {"format": SIDECAR_FORMAT, "sha256": file_sha256(path),
                                      "bytes": path.stat().st_size, "signature": _signature(reference),
                                      "tolerance": tolerance})


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def discard(path: Path) -> None:
    """Delete an engine file and its sidecar."""
    path.unlink(missing_ok=True)
    sidecar(path).unlink(missing_ok=True)


def open_verified(path: Path, keys: Sequence[str], threads: int, side: int) -> OrtEngine | None:
    """The engine cached at `path` if it is the file that was built (sha256) and still gives the codes it gave
    then on `check_batch` (within the recorded tolerance); else None, the file deleted with a warning so the
    caller builds it again. A damaged engine costs a rebuild, never wrong codes."""
    try:
        info = json.loads(sidecar(path).read_text())
        if not isinstance(info, dict) or info.get("format") != SIDECAR_FORMAT:
            raise ValueError(f"{sidecar(path).name} is missing or not an engine record")
        if path.stat().st_size != info["bytes"] or file_sha256(path) != info["sha256"]:
            raise ValueError("the file differs from the one built (sha256): damaged or replaced")
        engine = OrtEngine(path, keys, threads)
        got, want = _signature(engine(check_batch(side))), info["signature"]
        for key in keys:
            a, b = np.asarray(got[key]), np.asarray(want[key])
            err = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)) if a.shape == b.shape else np.inf
            if not err <= info["tolerance"]:
                raise ValueError(f"its '{key}' codes on the check batch moved by {err:.2g} (relative) since it was "
                                 "built")
        return engine
    except Exception as exc:  # noqa: BLE001 - a truncated, foreign or unverifiable file raises many types
        log.warning("cached engine %s failed verification (%s); deleting it, it will be built again", path.name,
                    _why(exc))
        discard(path)
        return None


@contextlib.contextmanager
def quiet_exporter(enabled: bool = True) -> Iterator[None]:
    """Silence torch.onnx and its helpers while exporting (~100 INFO lines, tracer and deprecation warnings and
    prints per export), so a command shows only its own lines; `enabled=False` (the CLI's -v) lets them through."""
    if not enabled:
        yield
        return
    quiet = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir", "torch.export",
                                                "torch._dynamo")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)


def export_codes(net: CodesNet, path: Path, side: int, folded: int) -> None:
    """Write `net` as ONNX with a dynamic batch and a fixed side x side input (the exporter's chatter silenced),
    recording `folded` in the file's metadata."""
    example = torch.zeros(2, 3, side, side)
    batch = torch.export.Dim("batch", min=1, max=65536)

    def write(tmp: Path) -> None:
        program = torch.onnx.export(net.eval(), (example,), dynamo=True, input_names=["image"],
                                    dynamic_shapes=({0: batch},), opset_version=OPSET, verbose=False)
        program.save(str(tmp))
        import onnx

        model = onnx.load(str(tmp))
        onnx.helper.set_model_props(model, {FOLDED: str(folded)})
        onnx.save(model, str(tmp))

    with quiet_exporter():
        atomic_write(path, write)


@torch.no_grad()
def load_or_export(build: Callable[[], tuple[CodesNet, int]], keys: Sequence[str], side: int, path: Path,
                   threads: int, *, rtol: float = 1e-3, atol: float = 1e-4) -> OrtEngine | None:
    """The engine from `path` (verified: `open_verified`), or exported from `build()` -> (net, BatchNorms
    folded) if the file is missing or fails verification; None (torch stays) if the export fails. `build` is
    only called for an export: a cached file needs no network.

    A new export must reproduce the torch codes on `check_batch` within rtol/atol (fp32 vs fp32: only
    summation order differs) before it is kept; those torch codes are recorded for every later load.
    """
    engine = open_verified(path, keys, threads, side) if path.is_file() else None
    if engine is not None:
        return engine
    try:
        net, folded = build()
        log.info("exporting the network to ONNX Runtime once (a few seconds; cached in %s)", path.parent)
        path.parent.mkdir(parents=True, exist_ok=True)
        export_codes(net, path, side, folded)
        engine = OrtEngine(path, keys, threads)
        x = check_batch(side)
        want = dict(zip(keys, (t.float().numpy() for t in net(x))))
        got = engine(x)
        for key in keys:
            if got[key].shape != want[key].shape or not np.allclose(got[key], want[key], rtol=rtol, atol=atol):
                worst = float(np.abs(got[key] - want[key]).max()) if got[key].shape == want[key].shape else "shape"
                raise ValueError(f"'{key}' differs from torch by up to {worst}")
        record(path, want, FP32_TOLERANCE)  # the torch codes: a later load is checked against torch's answer
        return engine
    except Exception as exc:  # noqa: BLE001 - exporter and runtime raise many types; all mean "use torch"
        log.warning("ONNX Runtime engine unavailable for this network (%s); running torch", _why(exc))
        discard(path)
        return None


def int8_recipe(side: int) -> dict:
    """The int8 recipe (INT8) at input `side`: as many crops as CALIBRATION_PIXELS allow, 32 to 128."""
    return {**INT8, "crops": int(min(INT8["crops"], max(32, -(-CALIBRATION_PIXELS // side ** 2))))}


def calibration_crops(n: int, seed: int) -> list:
    """`n` square crops of scikit-learn's sample photos (china.jpg, flower.jpg) at random scales, some mirrored
    and some in grey: the fixed, offline image set that int8 activation ranges are measured on."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(n):
        photo = photos[i % len(photos)]
        side = int(rng.uniform(0.1, 1.0) * min(photo.size))
        x, y = (int(rng.integers(0, d - side + 1)) for d in photo.size)
        crop = photo.crop((x, y, x + side, y + side))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if rng.random() < 0.3:
            crop = crop.convert("L").convert("RGB")
        crops.append(crop)
    return crops


class _Batches:
    """onnxruntime's CalibrationDataReader over an array, a batch at a time; `set_range` lets quantize_static
    collect statistics one batch at a time (CalibStridedMinMax), so calibration memory stays one batch's."""

    def __init__(self, x: np.ndarray, name: str, batch: int = 16) -> None:
        self.items = [{name: x[i:i + batch]} for i in range(0, len(x), batch)]
        self.set_range(0, len(self.items))

    def __len__(self) -> int:
        return len(self.items)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.it = iter(self.items[start_index:end_index])

    def get_next(self) -> dict | None:
        return next(self.it, None)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, D) arrays (1 where both rows are zero)."""
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return np.where((na == 0) & (nb == 0), 1.0, (a * b).sum(1) / np.maximum(na * nb, 1e-30))


def quantize(fp32: OrtEngine, path: Path, calibration: np.ndarray, check: np.ndarray,
             threads: int) -> OrtEngine | None:
    """The int8 engine at `path`, quantized from `fp32` with activation ranges measured on `calibration`
    (N, 3, H, W) float32, or None (fp32 stays) if that fails or its codes on `check` stray from fp32's:
    mean cosine below MIN_COSINE for any key."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    def write(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="transferkit-int8-") as work:
            pre = Path(work) / "pre.onnx"
            quant_pre_process(str(fp32.path), str(pre), skip_symbolic_shape=True)  # shapes + fusions first
            with contextlib.redirect_stdout(io.StringIO()):  # the calibrator prints per batch
                quantize_static(str(pre), str(tmp), _Batches(calibration, fp32.input), quant_format=QuantFormat.QDQ,
                                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                calibrate_method=CalibrationMethod.Percentile,
                                extra_options={"CalibPercentile": 99.999, "CalibStridedMinMax": 1})
        import onnx

        model = onnx.load(str(tmp))
        onnx.helper.set_model_props(model, {FOLDED: str(fp32.folded)})
        onnx.save(model, str(tmp))
        want, got = fp32(check), OrtEngine(tmp, fp32.keys, threads)(check)
        worst = min(float(cosine(got[k], want[k]).mean()) for k in fp32.keys)
        if worst < MIN_COSINE:
            raise ValueError(f"int8 codes point away from fp32 (mean cosine {worst:.3f} < {MIN_COSINE})")
        onnx.helper.set_model_props(model, {FOLDED: str(fp32.folded), COSINE: f"{worst:.4f}"})
        onnx.save(model, str(tmp))

    try:
        log.info("quantizing the network to int8 once (calibration on %d photo crops; cached in %s)",
                 len(calibration), path.parent)
        atomic_write(path, write)
        engine = OrtEngine(path, fp32.keys, threads)
        record(path, engine(check_batch(calibration.shape[-1])), INT8_TOLERANCE)
        return engine
    except Exception as exc:  # noqa: BLE001 - the quantizer raises many types; all mean "stay fp32"
        log.warning("int8 engine unavailable for this network (%s); running fp32", _why(exc))
        discard(path)
        return None
