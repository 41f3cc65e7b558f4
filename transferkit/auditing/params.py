"""The audit's parameter limits, as plain data (transferkit.runtime.params): `audit` validates with them and the CLI
offers them. Light: no sklearn, so `transferkit --help` stays fast."""

from __future__ import annotations

import math
from numbers import Integral, Real

from transferkit.runtime.params import Interval, StrOptions

# Cosine similarity of L2-normalised codes at or above which two images are near-duplicates. Measured (docs/audit.md):
# the closest distinct pair of 1,000 Fashion-MNIST images scores 0.954 (99th percentile 0.946), distinct overlapping
# photo crops up to 0.93: lower, and look-alikes flood the report. A JPEG-70 copy of a 64 px crop scores ~0.97, but a
# resized-and-back copy of a small image only 0.84-0.91: lower it for those (the CLI's --near-threshold).
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
    "fix": [StrOptions(("drop", "relabel")), None],  # cleaned.csv: what becomes of likely label errors
}

RETRIEVAL = {  # `neighbors`
    "k": [Interval(Integral, 1, None, closed="left")],  # most similar images listed per query
}
