"""A probe ensemble on disk (`transferkit ensemble`): saved probes, each on its own codes (another backbone, other
views), that score an image by the mean of their calibrated probabilities.

Why: probes on different backbones err on different images. On Fashion-MNIST at 100 images per class, three
probes on lite0, lite1 and lite2 codes (each with its views chosen by CV) score 88.69% averaged against 87.35-88.14%
alone (docs/benchmarks.md 'probe-ensemble'). Averaging calibrated probabilities, not raw scores, lets members
with different heads and scales weigh alike (soft voting). Nothing is fine-tuned: each member is a linear probe
on frozen codes. (The mean of the members' temperature-scaled scores would be one linear classifier on all their
codes side by side; it scored 88.57% there.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.codes.extractor import FeatureExtractor
from transferkit.errors import DataError
from transferkit.probe.linear import LinearProbe
from transferkit.probe.saved import class_names, load_probe_dir, probe_scores

ENSEMBLE_FILE = "ensemble.json"  # what marks an ensemble folder: its members and classes
FORMAT = "transferkit.ensemble/1"
MEMBERS_DIR = "members"  # members/0, members/1, ...: each a copy of a member's probe folder


def is_ensemble_dir(path: str | Path) -> bool:
    """Whether `path` is a folder written by `transferkit ensemble`."""
    return (Path(path) / ENSEMBLE_FILE).is_file()


def refuse_ensemble(path: str | Path, needs: str) -> None:
    """Raise if `path` is an ensemble where one network is needed (`needs`: what needs it)."""
    if is_ensemble_dir(path):
        raise DataError(f"'{path}' is an ensemble of probes, each on its own backbone, and {needs} needs one "
                        f"network: give one of its members ('{Path(path) / MEMBERS_DIR / '0'}', ...)")


def read_ensemble(path: str | Path) -> dict:
    """An ensemble's record (format, classes, members), checked, so a damaged file fails here and says why."""
    file = Path(path) / ENSEMBLE_FILE
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"'{file}' cannot be read as an ensemble record: {err}") from err
    meta = meta if isinstance(meta, dict) else {}
    members = meta.get("members")
    valid = (meta.get("format") == FORMAT and isinstance(meta.get("classes"), list) and isinstance(members, list)
             and len(members) >= 2 and all(isinstance(m, dict) and isinstance(m.get("dir"), str) for m in members))
    if not valid:
        raise DataError(f"'{file}' is not a {FORMAT} record (format, classes, and two or more members with a "
                        "'dir'); make the ensemble again with `transferkit ensemble`")
    return meta


def member_dirs(path: str | Path, record: dict) -> list[Path]:
    """The member probe folders of ensemble `path` (its `record`, from read_ensemble), each inside it (a record
    naming a folder outside is refused)."""
    root = Path(path).resolve()
    dirs = [(root / m["dir"]).resolve() for m in record["members"]]
    if outside := [d for d in dirs if root not in d.parents]:
        raise DataError(f"'{Path(path) / ENSEMBLE_FILE}' names member '{outside[0]}' outside the ensemble folder")
    return dirs


def load_ensemble_dir(path: str | Path, *, batch_size: int = 64,
                      progress: bool = False) -> tuple[list[tuple[LinearProbe, FeatureExtractor]], list[str]]:
    """An ensemble's members (each probe with the extractor that makes its codes) and its classes."""
    record = read_ensemble(path)
    members = [load_probe_dir(d, batch_size=batch_size, progress=progress) for d in member_dirs(path, record)]
    return members, list(record["classes"])


def ensemble_proba(members: list[tuple[LinearProbe, FeatureExtractor]], classes: list[str],
                   images: Any) -> np.ndarray:
    """(n, len(classes)) mean of the members' calibrated probabilities of `images` (anything an extractor's
    `transform` takes), columns in `classes` order; flip probes score each image with its mirror, as alone."""
    return sum(_columns(probe, extractor, classes, images) for probe, extractor in members) / len(members)


def _columns(probe: LinearProbe, extractor: FeatureExtractor, classes: list[str], images: Any) -> np.ndarray:
    """One member's calibrated probabilities of `images`, its columns reordered to `classes`."""
    names = class_names(probe)
    return probe.proba_from_scores(probe_scores(probe, extractor, images))[:, [names.index(c) for c in classes]]
