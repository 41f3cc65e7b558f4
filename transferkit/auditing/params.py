"""The audit's parameter limits, as plain data (transferkit.runtime.params): `audit` validates with them and the CLI
offers them. Light: no sklearn, so `transferkit --help` stays fast."""

from __future__ import annotations

import math
from numbers import Integral, Real

from transferkit.runtime.params import Interval, StrOptions

# Copy score (auditing.copies: correlation of 32 px grayscale thumbnails, best crop/blur view) at or above which two
# images are near-duplicates. Measured on 200 planted copies in Fashion-MNIST (bench/audit_duplicates.py,
# docs/audit.md): 96.5% of copies score >= 0.985 (crops are the misses); with mutual best matches, no pair beyond
# them and the set's own near-identical items is reported. Higher drops crops (0.995: recall 0.885).
NEAR_THRESHOLD = 0.985
NEAR_CANDIDATES = 10  # candidates per image: its nearest by codes and its nearest by 8 px thumbnails
NEIGHBORS = 5  # nearest neighbours per image for the outlier score
OUTLIER_MADS = 3.0  # an outlier's score is above its class's median + this many (scaled) MADs
CV = 5  # folds of the out-of-fold probabilities

AUDIT = {
    "near_threshold": [Interval(Real, 0, 1, closed="right")],
    "near_candidates": [Interval(Integral, 1, None, closed="left")],
    "neighbors": [Interval(Integral, 1, None, closed="left")],
    "outlier_mads": [Interval(Real, 0, math.inf, closed="neither")],
    "cv": [Interval(Integral, 2, None, closed="left")],
    "max_rows": [Interval(Integral, 0, None, closed="left")],  # rows per report.html section (the CSVs have all)
    "fix": [StrOptions(("drop", "relabel")), None],  # cleaned.csv: what becomes of likely label errors
}

RETRIEVAL = {  # `neighbors`
    "k": [Interval(Integral, 1, None, closed="left")],  # most similar images listed per query
}
