"""Limits of the surgery parameters, as plain data (transferkit.runtime.params): `dense_predict` and `export_onnx`
validate with them, and `predict --dense` and `export` build their options from them. Light: no torch, no sklearn,
so `transferkit --help` stays fast."""

from __future__ import annotations

from numbers import Integral, Real

from transferkit.runtime.params import Interval, StrOptions

# Measured peak memory of a dense pass (fp32, receptive fields tracked): ~345 MB per input megapixel for
# EfficientNet-Lite0 and B3, ~150 MB for ResNet-50. 40 MP is ~14 GB: it fits a 24 GB machine with room to spare.
MAX_MEGAPIXELS = 40
DEFAULT_HEATMAPS = 3  # heat maps drawn when no class is named: the top classes (1 for a binary classifier)

DENSE = {
    "scale": [Interval(Real, 0, None, closed="neither")],  # resize factor: 0.5 halves both sides
    "short_side": [Interval(Integral, 1, None, closed="left")],  # pixels of the image's shorter side
    "top": [Interval(Integral, 1, None, closed="left")],
}

FORMATS = ("onnx",)
# what the exported file takes: "float" (B, 3, H, W) float32 already scaled to [0, 1] and normalised with the
# file's mean/std; "uint8" (B, 3, H, W) and "uint8-nhwc" (B, H, W, 3) raw 0-255 RGB pixels, the scaling and
# normalisation inside the graph
INPUT_FORMATS = ("float", "uint8", "uint8-nhwc")

EXPORT = {
    "fmt": [StrOptions(FORMATS)],
    "input_format": [StrOptions(INPUT_FORMATS)],
    "check": ["boolean"],
    "progress": [callable, None],  # called with each stage's name
}
