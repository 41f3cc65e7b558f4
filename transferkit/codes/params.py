"""The FeatureExtractor's parameter limits, as plain data (transferkit.runtime.params): its
`_parameter_constraints`, the CLI's choices and the recipe validator all read this table. Light: no torch,
no sklearn, so `transferkit --help` stays fast."""

from __future__ import annotations

from numbers import Integral
from os import PathLike

from transferkit.data.params import IMAGE_SIZE
from transferkit.runtime.params import PRECISIONS, Interval, StrOptions

ENGINES = ("auto", "torch", "onnxruntime")
BATCH_SIZE = [Interval(Integral, 1, None, closed="left")]
NUM_WORKERS = [Interval(Integral, 0, None, closed="left")]

EXTRACTOR = {
    "model": [str],
    "weights": [str, PathLike],  # 'auto', 'package', 'hub', 'random' or a weights file
    "layer": [str, Integral, list, tuple],  # resolved against the network in fit
    "pool": [str, list, tuple],  # parsed by parse_pools: 'avg', 'max', '[cat]avgmax', 'NxN', lists, 'all'
    "image_size": IMAGE_SIZE,
    "batch_size": BATCH_SIZE,
    "precision": [StrOptions(PRECISIONS)],
    "num_workers": NUM_WORKERS,
    "fold_bn": ["boolean"],
    "engine": [StrOptions(ENGINES)],
    "exact_decode": ["boolean"],
    "decode_threads": [Interval(Integral, 1, None, closed="left"), None],  # None: measured per run
    "progress": ["boolean"],
}
