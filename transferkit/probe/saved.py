"""A probe folder on disk (`transferkit probe -o`): how to tell one, and how to load it with the extractor that
makes its codes. Used by the jobs (predict, evaluate) and by network surgery alike."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import clone

from transferkit.codes.extractor import FeatureExtractor
from transferkit.codes.params import POOL_NAMES, RENAMED
from transferkit.codes.spec import CodeSpec
from transferkit.data.transforms import MIRROR
from transferkit.errors import DataError
from transferkit.models.params import PRE_LOGITS
from transferkit.models.weights import weights_argument
from transferkit.probe.fileformat import META_FILE
from transferkit.probe.heads import flip_average
from transferkit.probe.linear import LinearProbe
from transferkit.probe.multilabel import MultiLabelProbe

PROBE_DIR = "probe"  # the folder inside a probe output that holds the model (arrays.npz + probe.json)
# a saved probe's record (its `extra_`) that it was trained on images and their mirror images (`transferkit probe
# --flip`), so it scores the mean of an image's and its mirror's scores; absent (older probes): one score each
FLIP = "flip"
AUGMENT = "augment"  # and how many shifted copies of each image it was refitted on (`probe --augment`); 0: none


def is_probe_dir(path: str | Path) -> bool:
    """Whether `path` is a folder written by `transferkit probe`."""
    return (Path(path) / PROBE_DIR).is_dir()


def _probe_class(folder: Path) -> type[LinearProbe]:
    """MultiLabelProbe for a probe trained on multi-label codes (its probe.json says so), else LinearProbe."""
    try:
        multilabel = json.loads((folder / META_FILE).read_text()).get("extra", {}).get("multilabel", False)
    except (OSError, ValueError, AttributeError):  # LinearProbe.load reports what is wrong with the file
        multilabel = False
    return MultiLabelProbe if multilabel else LinearProbe


def load_probe(path: str | Path) -> LinearProbe:
    """The probe saved in probe folder `path` (a MultiLabelProbe for multi-label codes), its record (`extra_`) in
    today's pool names; without building its extractor."""
    probe = _probe_class(Path(path) / PROBE_DIR).load(Path(path) / PROBE_DIR)
    if probe.extra_.get("pool_names") != POOL_NAMES:
        probe.extra_ = _renamed_pools(probe.extra_)
    return probe


def load_probe_meta(path: str | Path) -> dict:
    """What a saved probe records about its codes (model, weights, image size, layer, pool, key, classes), in
    today's pool names; without building its extractor."""
    return load_probe(path).extra_


def class_names(probe: LinearProbe) -> list[str]:
    """The names of a saved probe's score columns, in their order."""
    return [probe.extra_["classes"][int(c)] for c in probe.classes_]


def load_probe_dir(path: str | Path, *, batch_size: int = 64, progress: bool = False,
                   exact: bool = False) -> tuple[LinearProbe, FeatureExtractor]:
    """A saved probe and the fitted extractor that makes its codes, with the same backbone weights.

    `exact`: an fp32 backbone without folding, whatever the codes were made with (for network surgery).
    """
    probe = load_probe(path)
    spec = CodeSpec.from_probe(probe.extra_)
    one = spec.views is None  # else a combination: its views, side by side
    extractor = FeatureExtractor(
        spec.model, weights=weights_argument(probe.extra_["weights"]), layer=spec.layer if one else PRE_LOGITS,
        pool=spec.pool if one else "avg", views=None if one else spec.key, image_size=probe.extra_["image_size"],
        batch_size=batch_size, precision="fp32" if exact else spec.precision,
        fold_bn=not exact and spec.fold_bn is not False, engine="torch" if exact else "auto", progress=progress,
        exact_decode=spec.exact_decode, mirror=bool(spec.transform.get(MIRROR)),
    ).fit()
    # precision and folding settle when the extractor runs (and `exact` overrides them): compare the rest
    built = replace(extractor.code_spec(), precision=spec.precision,
                    int8=spec.int8, fold_bn=spec.fold_bn)
    if built.differences(spec):
        raise DataError(f"the extractor rebuilt for probe '{path}' makes other codes than the probe was trained "
                        f"with: {built.describe_differences(spec, ('now', 'trained'))}")
    return probe, extractor


def _renamed_pools(extra: dict) -> dict:
    """A probe saved before transferkit named pools as timm does, in today's names (codes.pooling.RENAMED)."""
    pool = RENAMED.get(extra["pool"], extra["pool"])
    extra = {**extra, "pool": pool, "key": f"{extra['layer']}|{pool}", "pool_names": POOL_NAMES}
    if "code_spec" in extra:
        extra["code_spec"] = {**extra["code_spec"], "pool": pool}
    return extra


def probe_scores(probe: LinearProbe, extractor: FeatureExtractor, images: Any) -> np.ndarray:
    """A saved probe's scores of `images` (anything `extractor.transform` takes): for a probe trained with flip
    (its `extra_` says so), the mean of each image's scores and its mirror image's (heads.flip_average), as it
    was scored on its test set."""
    scores = probe.decision_function(extractor.transform(images))
    if not probe.extra_.get(FLIP):
        return scores
    mirrored = clone(extractor).set_params(mirror=True).fit()  # the same codes of the mirror images
    return flip_average(scores, probe.decision_function(mirrored.transform(images)))
