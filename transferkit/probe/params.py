"""LinearProbe's parameter limits, as plain data (transferkit.runtime.params): its `_parameter_constraints`, the
CLI's choices and the recipe validator all read this table. Light: no sklearn, so `transferkit --help` stays fast."""

from __future__ import annotations

import math
from numbers import Integral, Real

from transferkit.runtime.params import Interval, StrOptions

# 'l2': unit-length rows; 'center_l2' / 'standard_l2': centre / standardise each feature, then rows of length
# sqrt(n_features) (heads.UnitScaler: the scale of a standardised row, so the same Cs serve)
SCALINGS = ("standard", "l2", "none", "center_l2", "standard_l2")
HEADS = ("svm", "logistic", "ncm", "auto")  # linear SVM, multinomial logistic regression, cosine nearest-class-mean
MULTILABEL_HEADS = ("svm",)  # MultiLabelProbe: one linear SVM per label, its threshold tuned
AUTO_HEADS = ("svm", "logistic", "ncm")  # what head='auto' chooses among, by the CV that chooses C
# --layer auto --combine (greedy forward selection after the sweep, bench/multilayer.py): among the sweep's best
# SELECT_CANDIDATES views, at most SELECT_MAX_VIEWS, each adding more than SELECT_MIN_GAIN CV accuracy
SELECT_CANDIDATES, SELECT_MAX_VIEWS, SELECT_MIN_GAIN = 6, 3, 0.002
CLASS_WEIGHTS = ("balanced",)  # scikit-learn's: weight each class by n_samples / (n_classes x its count)
METRICS = ("auto", "accuracy", "balanced_accuracy")  # what chooses C and ranks the sweep; 'auto': by imbalance
# largest / smallest class count above which metric='auto' scores by balanced accuracy. At 1.5 the largest class
# is half again the smallest: plain accuracy starts to reward predicting it, while near-balanced sets that only
# lose a few images per class (ratio ~1.0-1.2) keep plain accuracy, and the results they always had.
AUTO_BALANCED_RATIO = 1.5
CV = [Interval(Integral, 2, None, closed="left")]
# train_probe's `augment` (probe --augment): shifted copies of each training image (data.transforms.ShiftCopy)
AUGMENT_COPIES = [Interval(Integral, 0, None, closed="left")]
PROBE_JOB = {"augment": AUGMENT_COPIES}  # the limits of train_probe's own parameters (LinearProbe's: PROBE)

PROBE = {
    "C": [Interval(Real, 0, math.inf, closed="neither"), StrOptions(("auto",))],
    "Cs": ["array-like"],  # each one a float > 0, checked in fit
    "scaling": [StrOptions(SCALINGS)],
    "cv": CV,
    "max_iter": [Interval(Integral, 1, None, closed="left")],
    "tol": [Interval(Real, 0, math.inf, closed="neither")],
    "n_jobs": [Integral, None],
    "random_state": ["random_state"],
    "cv_max_samples": [Interval(Integral, 2, None, closed="left"), None],  # and >= 2 x cv, checked in fit
    "class_weight": [StrOptions(CLASS_WEIGHTS), dict, None],  # dict: {class: weight}, Python only (as sklearn)
    "metric": [StrOptions(METRICS)],
    "calibrate": ["boolean"],  # predict_proba: a temperature fitted on out-of-fold scores
    "head": [StrOptions(HEADS)],
}
