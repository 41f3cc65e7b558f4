"""Limits of the dense-prediction parameters, as plain data (transferkit.runtime.params): `dense_predict` validates
with them and `predict --dense` builds its options from them. Light: no torch, no sklearn."""

from __future__ import annotations

from numbers import Integral, Real

from transferkit.runtime.params import Interval

# Measured peak memory of a dense pass (fp32, receptive fields tracked): ~345 MB per input megapixel for
# EfficientNet-Lite0 and B3, ~150 MB for ResNet-50. 40 MP is ~14 GB: it fits a 24 GB machine with room to spare.
MAX_MEGAPIXELS = 40
DEFAULT_HEATMAPS = 3  # heat maps drawn when no class is named: the top classes (1 for a binary classifier)

DENSE = {
    "scale": [Interval(Real, 0, None, closed="neither")],  # resize factor: 0.5 halves both sides
    "short_side": [Interval(Integral, 1, None, closed="left")],  # pixels of the image's shorter side
    "top": [Interval(Integral, 1, None, closed="left")],
}
