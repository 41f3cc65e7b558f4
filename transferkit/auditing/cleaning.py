"""`audit --fix`: DATA as a cleaned CSV manifest, cleaned.csv in the audit's folder, that every transferkit command
reads as a data set (data.datasets: 'path' and 'label', or 'labels' for multi-label data).

Left out: the second image of each duplicate pair within DATA (the first stays), every DATA image leaked into TEST
(TEST keeps its copy: the test set stays as it was), and the likely label errors when `fix` is 'drop'; with
'relabel' those get the suggested label instead. The user's images and files are never touched: the manifest lists
the images where they are, by absolute path, so it can be read from anywhere.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path

from transferkit.auditing.duplicates import LEAKAGE
from transferkit.data.datasets import LABEL_SEPARATOR, ImageDataset
from transferkit.errors import ParameterError
from transferkit.runtime.atomic import write_text_atomic

FILE = "cleaned.csv"
DROP, RELABEL = "drop", "relabel"  # what happens to a likely label error (auditing.params.AUDIT['fix'])


def check_fixable(dataset: ImageDataset, fix: str | None) -> None:
    """A manifest lists image files: IDX images (rows of one file, in memory) have none to list."""
    if fix is not None and dataset.kind == "idx":
        raise ParameterError(f"The 'fix' parameter of audit needs DATA of image files (a folder or a CSV manifest): "
                             f"'{dataset.root}' is IDX, whose images have no file a manifest could list.", param="fix")


def write_cleaned(out: Path, dataset: ImageDataset, duplicates: Sequence[dict], issues: Sequence[dict],
                  fix: str) -> dict:
    """Write out/cleaned.csv (atomically); return what it keeps, leaves out and relabels, for summary.json.

    `duplicates` and `issues` are the audit's findings: pairs indexed DATA first (a leak's DATA image is its 'a'),
    issues by DATA index with their 'suggested' label."""
    n = len(dataset)
    leaked = {p["a"] for p in duplicates if p["scope"] == LEAKAGE}
    copies = {p["b"] for p in duplicates if p["scope"] != LEAKAGE and p["b"] < n} - leaked  # within DATA
    flagged = {r["index"]: r["suggested"] for r in issues} if fix == DROP else {}
    relabel = {r["index"]: r["suggested"] for r in issues} if fix == RELABEL else {}
    out_of = leaked | copies | set(flagged)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "labels" if dataset.multilabel else "label"])
    relabelled = 0
    for i, source in enumerate(dataset.sources):
        if i in out_of:
            continue
        given = _labels(dataset, i)
        label = relabel.get(i, given)
        relabelled += label != given
        writer.writerow([os.path.abspath(source), label])
    write_text_atomic(out / FILE, buf.getvalue())
    return {"file": FILE, "fix": fix, "images": n, "kept": n - len(out_of), "relabelled": relabelled,
            "left_out": {"leaked_into_test": len(leaked), "duplicates": len(copies),
                         "label_issues": len(set(flagged) - leaked - copies)}}


def _labels(dataset: ImageDataset, i: int) -> str:
    """Image i's class, or its labels joined as a manifest's 'labels' cell holds them."""
    if dataset.multilabel:
        return LABEL_SEPARATOR.join(c for c, on in zip(dataset.classes, dataset.targets[i]) if on)
    return dataset.classes[int(dataset.targets[i])]
