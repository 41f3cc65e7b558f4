"""Limits of the export parameters, as plain data (transferkit.runtime.params): `export_onnx` validates with them
and the CLI's `export` options read them. Light: no torch, no sklearn, so `transferkit --help` stays fast."""

from __future__ import annotations

from transferkit.runtime.params import StrOptions

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
