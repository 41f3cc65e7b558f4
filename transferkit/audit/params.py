"""The audit's parameter limits, as plain data (transferkit.runtime.params): `audit` validates with them and the CLI
offers them. Light: no sklearn, so `transferkit --help` stays fast."""

from __future__ import annotations

import math
from numbers import Integral, Real

from transferkit.runtime.params import Interval

# Cosine similarity of L2-normalised pre_logits codes at or above which two images are near-duplicates. Measured
# (docs/audit.md): a photo and its resized / JPEG-70 re-encoded copy score >= 0.97, distinct crops of one photo
# <= 0.93 and the closest distinct Fashion-MNIST pairs about 0.95; 0.95 keeps the planted copies and few others.
NEAR_THRESHOLD = 0.95
NEIGHBORS = 5  # nearest neighbours per image: candidate near-duplicates and the outlier score's k
OUTLIER_MADS = 3.0  # an outlier's score is above its class's median + this many (scaled) MADs
CV = 5  # folds of the out-of-fold probabilities

AUDIT = {
    "near_threshold": [Interval(Real, 0, 1, closed="right")],
    "neighbors": [Interval(Integral, 1, None, closed="left")],
    "outlier_mads": [Interval(Real, 0, math.inf, closed="neither")],
    "cv": [Interval(Integral, 2, None, closed="left")],
    "max_rows": [Interval(Integral, 0, None, closed="left")],  # rows per report.html section (the CSVs have all)
}
