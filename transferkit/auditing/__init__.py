"""Data set checks on CNN codes: duplicates and train/test leakage (`duplicates`), likely label errors by confident
learning (`label_issues`), outliers and class balance (`outliers`), the report files (`report`), and the job that
runs them all (`run`; its limits in `params`); the most similar images of a codes directory (`retrieval`:
`transferkit.neighbors`), on the same cosine similarity of codes as near-duplicates.

Named for the act, so that `transferkit.audit` is the job's function. A room above `jobs` (it encodes through
`jobs.extract_features`, like `transferkit extract`) and below `recipes`: it may import `jobs` and every room
below; `recipes` and `cli` may import it, nothing below does.
"""

from __future__ import annotations
