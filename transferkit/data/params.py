"""Limits of the data parameters, as plain data (transferkit.runtime.params): the transforms, the extractor,
fine-tuning, the CLI and the recipe files read them. Light: no torch, no sklearn."""

from __future__ import annotations

from numbers import Integral

from transferkit.runtime.params import Interval

IMAGE_SIZE = [Interval(Integral, 8, None, closed="left"), None]  # None: the model's pretrained input size
