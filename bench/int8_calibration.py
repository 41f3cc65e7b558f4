"""int8 calibration choices, measured: which images set the activation ranges, and how they are clipped.

Quantizes the fp32 ONNX Runtime engine of `tf_efficientnet_lite0` (packaged ImageNet weights) four ways,
calibrated on 256 images: random crops of scikit-learn's two sample photos (what transferkit ships, with 128
crops) or a random sample of the Fashion-MNIST training images themselves, each with percentile (99.999)
or min/max ranges. For each: model-only images/s (batch 64), the cosine of the Fashion-MNIST test codes to the
fp32 codes, and a linear probe (C=0.001) trained on 1,000/class and scored on the official test set.

    python bench/int8_calibration.py 64 blocks.4 4x4     # ~4 min on 2 cores
    python bench/int8_calibration.py 224                  # pre-logits at 224 px, ~20 min

Results are in docs/speed.md ("Calibration").
"""

import os
import sys
import time

import numpy as np
import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from PIL import Image

os.environ.setdefault("TRANSFERKIT_CACHE", "bench/.work/int8/cache")
from transferkit.codes.extractor import FeatureExtractor  # noqa: E402
from transferkit.codes.ort_engine import FOLDED, OrtEngine, calibration_crops, cosine  # noqa: E402
from transferkit.probe.linear import LinearProbe  # noqa: E402
from transferkit.recipes.demo import fashion_mnist  # noqa: E402

WORK = "bench/.work/int8"


def photo_batches(fe: FeatureExtractor, n: int, seed: int = 0) -> np.ndarray:
    """The first `n` of the crops transferkit calibrates on (ort_engine.calibration_crops), as model input."""
    return fe.normalize(torch.stack([fe.decode_(c) for c in calibration_crops(n, seed)])).numpy()


def data_batches(fe: FeatureExtractor, data, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(data._pixels), n, replace=False)
    out = [fe.decode_(Image.fromarray(data._pixels[i]).convert("RGB")) for i in idx]
    return fe.normalize(torch.stack(out)).numpy()


class Reader(CalibrationDataReader):
    def __init__(self, x: np.ndarray, bs: int = 32) -> None:
        self.it = iter([{"image": x[i:i + bs]} for i in range(0, len(x), bs)])

    def get_next(self):
        return next(self.it, None)


def main() -> None:
    size = None if sys.argv[1] == "224" else int(sys.argv[1])
    layer, pool = (sys.argv[2], sys.argv[3]) if len(sys.argv) > 3 else ("pre_logits", "avg")
    kw = {} if layer == "pre_logits" else {"layer": layer, "pool": pool}
    os.makedirs(WORK, exist_ok=True)
    fe = FeatureExtractor(image_size=size, precision="fp32", engine="onnxruntime", **kw).fit().prepare()
    fp32 = fe._engine.ort
    print("fp32 engine", fp32.path, fe.keys_)
    pre = f"{WORK}/pre.onnx"
    quant_pre_process(str(fp32.path), pre, skip_symbolic_shape=True)
    train, test = fashion_mnist("train", per_class=1000), fashion_mnist("t10k")
    engines = {"fp32": fp32}
    for name, calib in [("photos", lambda: photo_batches(fe, 256)), ("data", lambda: data_batches(fe, train, 256))]:
        for method in [CalibrationMethod.Percentile, CalibrationMethod.MinMax]:
            t = time.perf_counter()
            x = calib()
            q = f"{WORK}/{name}-{method.name}-{size}.onnx"
            extra = {"CalibPercentile": 99.999} if method == CalibrationMethod.Percentile else {}
            quantize_static(pre, q, Reader(x), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=method, extra_options=extra)
            m = onnx.load(q)
            onnx.helper.set_model_props(m, {FOLDED: str(fp32.folded)})
            onnx.save(m, q)
            print(name, method.name, "calib+quantize s", round(time.perf_counter() - t, 1), flush=True)
            engines[f"{name}-{method.name}"] = OrtEngine(q, fe.keys_, 2)
    xb = np.random.default_rng(0).standard_normal((64, 3, fe.side_, fe.side_)).astype(np.float32)
    for name, e in engines.items():
        e(xb)
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            e(xb)
            ts.append(time.perf_counter() - t)
        print(name, "model-only img/s", round(64 / np.median(ts)), flush=True)
    codes = {}
    for name, e in engines.items():
        fe._engine.ort = e
        t = time.perf_counter()
        tr, te = fe.transform(train), fe.transform(test)
        cos = ""
        if "fp32" in codes:
            c = cosine(te, codes["fp32"][1])
            cos = f"cos mean {c.mean():.4f} min {c.min():.4f}"
        codes[name] = (tr, te)
        acc = LinearProbe(C=0.001).fit(tr, train.targets).score(te, test.targets)
        print(name, f"probe {acc * 100:.2f}%", cos, f"{time.perf_counter() - t:.0f}s", flush=True)


if __name__ == "__main__":
    main()
