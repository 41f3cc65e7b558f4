"""Extraction jobs: codes of a dataset to a folder (`extract_features`), the same codes again for another set
(`like_options`), and the layer sweep that chooses them (`sweep_features`, `read_sweep`)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.codes.extract import extract
from transferkit.codes.extractor import FeatureExtractor
from transferkit.codes.params import COMBINED
from transferkit.codes.spec import CodeSpec
from transferkit.codes.store import KIND, FeatureStore
from transferkit.data.datasets import ImageDataset, open_dataset
from transferkit.data.transforms import MIRROR, SHIFT_COPY, shift_copy
from transferkit.errors import DataError, ParameterError
from transferkit.models.params import DEFAULT_MODEL, PRE_LOGITS
from transferkit.models.weights import weights_argument
from transferkit.probe.params import SELECT_CANDIDATES, SELECT_MAX_VIEWS, SELECT_MIN_GAIN  # noqa: F401 - jobs API
from transferkit.probe.sweep import SweepResult, select_views, sweep
from transferkit.probe.sweep_cache import cached_sweep
from transferkit.runtime.atomic import write_json_atomic
from transferkit.runtime.outputs import add_files, check_output, new_tmp

SWEEP_FILE = "sweep.json"
SWEEP_FILES = (SWEEP_FILE, "sweep.png")  # what a sweep adds to a codes directory
SWEEP_SAMPLES = 2000  # --layer auto on more images sweeps a stratified sample, then extracts only the winner


def load_data(data: str | Path, *, per_class: int | None = None, skip_bad: bool = False) -> ImageDataset:
    """Open a folder, CSV or IDX dataset, optionally keeping the first `per_class` items of each class."""
    dataset = open_dataset(data, skip_bad=skip_bad)
    return dataset.subset(per_class) if per_class else dataset


# Over 60 lines only by its 23 parameters, one a line: the body is a few checks and one extraction.
def extract_features(
    data: str | Path | ImageDataset,
    out: str | Path,
    *,
    model: str = DEFAULT_MODEL,
    weights: str = "auto",
    layer: str = PRE_LOGITS,
    pool: str = "avg",
    views: str | Sequence | None = None,
    image_size: int | None = None,
    batch_size: int = 64,
    precision: str = "auto",
    num_workers: int = 0,
    per_class: int | None = None,
    skip_bad: bool = False,
    like: str | Path | None = None,
    sweep_samples: int = SWEEP_SAMPLES,
    combine: bool = False,
    cache: bool = True,
    fold_bn: bool = True,
    engine: str = "auto",
    exact_decode: bool = False,
    decode_threads: int | None = None,
    progress: bool = True,
    mirror: bool = False,
) -> FeatureStore:
    """Extract codes to `out`. layer='auto' extracts layer 'all' (timm's feature stages and pre_logits) x every
    pooling and runs the sweep (on a sample of `sweep_samples` images for larger sets, then only the winner for
    all images). `combine`: the sweep's best views may be a combination (greedy selection: `sweep_features`),
    whose views are then extracted; off by default here (it won at 10 and 1,000 images per class, not at 100:
    docs/benchmarks.md 'multilayer'), on in the small-different recipe. `views`
    ('blocks.2|4x4,blocks.4|catavgmax') asks for a combination explicitly.

    `like` copies the CodeSpec of another feature directory's chosen codes (`like_options`), so a test set
    is encoded exactly as its training set was. With `cache`, codes already
    in the code cache (same model, weights, layer, pooling, transform and image bytes) are reused.
    `exact_decode` decodes every image in full instead of no larger than the transform needs. `mirror`: the codes
    of each image's horizontal mirror (what a flip-averaged probe scores beside the image's own).
    """
    if like is not None:
        same = like_options(FeatureStore(like), fold_bn)
        model, weights, layer, pool, views = (same[k] for k in ("model", "weights", "layer", "pool", "views"))
        image_size, precision, fold_bn, exact_decode = (same[k] for k in ("image_size", "precision", "fold_bn",
                                                                          "exact_decode"))
        mirror = mirror or same["mirror"]
    auto = _check_auto(layer, views)
    dataset = data if isinstance(data, ImageDataset) else load_data(data, per_class=per_class, skip_bad=skip_bad)
    check_output(out, KIND, inputs=[like, dataset.root])  # before the backbone loads: never the user's folders
    extractor = FeatureExtractor(
        model, weights=weights, layer="all" if auto else layer, pool="all" if auto else pool, views=views,
        image_size=image_size, batch_size=batch_size, precision=precision, num_workers=num_workers,
        fold_bn=fold_bn, engine=engine, exact_decode=exact_decode, decode_threads=decode_threads, progress=progress,
        mirror=mirror,
    )
    if like is not None:
        check_like(extractor.fit(), FeatureStore(like))
    if auto and len(dataset) > sweep_samples:
        return _extract_best(dataset, Path(out), extractor, sweep_samples, skip_bad, progress, cache, combine)
    store = extract(dataset, out, extractor, skip_bad=skip_bad, cache=cache)
    if auto:
        sweep_features(store, progress=progress, select=combine, cache=cache)
    return store


def _check_auto(layer: str, views: object) -> bool:
    """Whether `layer` is 'auto' (a sweep chooses the codes), where that is possible."""
    auto = layer == "auto"
    if auto and views is not None:
        raise ParameterError("The 'views' parameter names the codes itself: leave 'layer' at its default, not "
                             f"'auto'. Got views={views!r} instead.", param="views")
    if auto and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ParameterError("The 'layer' parameter must not be 'auto' under torchrun: the sweep runs in one "
                             "process. Name the layer and pooling, or sweep first without torchrun and then extract "
                             "like its output", param="layer")
    return auto


def like_options(ref: FeatureStore, fold_bn: bool = True, key: str | None = None) -> dict[str, Any]:
    """The FeatureExtractor parameters (model, weights, layer, pool, views, image_size, precision, fold_bn,
    exact_decode, mirror, shift_copy) that make the codes of `ref` again: its `key` codes if given, else its chosen
    codes (`read_sweep`: the sweep's winner, or the combination of views it holds), else all its codes, read from
    their CodeSpecs.

    The weights argument and image size are the requests that led to the specs' weights sha256 and
    transform; `fold_bn` is kept where `ref` predates CodeSpec and did not record it.
    """
    best = key or read_sweep(ref)
    specs = [CodeSpec.from_meta(ref.meta, k) for k in ([best] if best else ref.keys)]
    spec = specs[0]  # the codes of one directory share all but layer and pool
    combined = spec.views is not None
    return {"model": spec.model, "weights": weights_argument(ref.meta["weights"]),
            "layer": PRE_LOGITS if combined else ",".join(dict.fromkeys(s.layer for s in specs)),
            "pool": "avg" if combined else ",".join(dict.fromkeys(s.pool for s in specs)),
            "views": spec.key if combined else None, "image_size": ref.meta["image_size"],
            "precision": spec.precision, "fold_bn": fold_bn if spec.fold_bn is None else spec.fold_bn,
            "exact_decode": spec.exact_decode, "mirror": bool(spec.transform.get(MIRROR)),
            "shift_copy": shift_copy(spec.transform)}


def check_like(extractor: FeatureExtractor, ref: FeatureStore) -> None:
    """Stop before any image is encoded when the extractor rebuilt from `ref`'s specs makes other codes than
    `ref` holds (with `mirror` or `shift_copy`: than `ref` would hold of the mirror images or shifted copies): its
    weights resolve to another file now (weights 'auto'), or the model's config changed."""
    for key, mine in extractor.code_specs().items():
        theirs = CodeSpec.from_meta(ref.meta, key)  # a view of a combination: stored as any other
        if extractor.mirror:  # asked for: the mirror images' codes, made like `ref`'s in every other respect
            theirs = replace(theirs, transform={**theirs.transform, MIRROR: True})
        if extractor.shift_copy:  # likewise a shifted copy's
            theirs = replace(theirs, transform={**theirs.transform, SHIFT_COPY: mine.transform[SHIFT_COPY]})
        if mine.scoring_differences(theirs):
            raise DataError(f"the codes made like '{ref.path}' would differ from its own: "
                            f"{mine.describe_differences(theirs, ('now', 'there'), mine.scoring_differences(theirs))}"
                            "; extract both sets again with the same weights")


def _extract_best(
    dataset: ImageDataset, out: Path, extractor: FeatureExtractor, n: int, skip_bad: bool, progress: bool,
    cache: bool = True, combine: bool = True,
) -> FeatureStore:
    """Sweep layer 'all' x every pooling on a stratified sample of `n` images, then extract only the winner (one
    view or a combination) for all.

    Keeps disk and memory in proportion to the chosen codes, not to every candidate's.
    """
    from sklearn.model_selection import train_test_split

    idx, _ = train_test_split(np.arange(len(dataset)), train_size=n, random_state=0,
                              stratify=None if dataset.multilabel else dataset.targets)  # multi-label: random
    check_output(out, KIND, inputs=[dataset.root])  # before the sweep's work, not after it
    scratch = new_tmp(out.with_name(f"{out.name}.sweep"), KIND)  # marked and hidden: never a user's folder
    try:
        sample = extract(dataset.select(np.sort(idx)), scratch / "codes", extractor, skip_bad=skip_bad, cache=cache)
        sweep_features(sample, progress=progress, select=combine, cache=cache)
        spec = CodeSpec.from_meta(sample.meta, read_sweep(sample))
        if spec.views is None:
            extractor.set_params(layer=spec.layer, pool=spec.pool).fit()
        else:
            extractor.set_params(layer=PRE_LOGITS, pool="avg", views=spec.key).fit()
        store = extract(dataset, out, extractor, skip_bad=skip_bad, cache=cache)
        for name in SWEEP_FILES:
            shutil.copyfile(sample.path / name, out / name)
        add_files(out, SWEEP_FILES)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return store


def sweep_features(
    store: FeatureStore, *, cv: int = 3, max_samples: int | None = 5000, progress: bool = True, metric: str = "auto",
    select: bool = False, cache: bool = True,
) -> SweepResult:
    """Score every layer x pooling in `store` by CV probe accuracy (`metric`: 'auto' is balanced accuracy on
    imbalanced classes; multi-label codes: mAP); write sweep.json (it records the metric) and sweep.png beside it.

    `select` (single-label codes): then choose a combination by greedy forward selection from the best view
    (probe.sweep.select_views, on the same rows and folds); sweep.json records it under 'selection', and
    `read_sweep` returns it when it has more than one view. With `cache`, the result of the same sweep on the same
    codes and labels is reused (probe.sweep_cache); the selection is not remembered."""
    from transferkit.plots import plot_sweep

    if len(store.keys) < 2:
        raise DataError(f"'{store.path}' holds one kind of codes; extract with layer='all', pool='all' to sweep")
    codes = {tuple(k.split("|")): store.load(k) for k in store.keys}
    run = cached_sweep if cache else sweep
    result = run(codes, store.labels, cv=cv, max_samples=max_samples, progress=progress, metric=metric)
    record = result.to_dict()
    if select and not store.multilabel:
        top = result.candidates()
        chosen = select_views({(r["layer"], r["pool"]): codes[(r["layer"], r["pool"])] for r in top}, store.labels,
                              first=(result.best["layer"], result.best["pool"]), max_views=SELECT_MAX_VIEWS,
                              min_gain=SELECT_MIN_GAIN, cv=cv, max_samples=max_samples, progress=progress,
                              metric=metric)
        record["selection"] = chosen.to_dict()
    write_json_atomic(store.path / SWEEP_FILE, record)
    what = {"balanced_accuracy": "CV balanced accuracy", "mAP": "CV mAP"}.get(result.metric, "CV accuracy")
    plot_sweep(result.rows, store.path / "sweep.png", title=f"{store.meta['model']}: {what} of a linear SVM",
               ylabel=f"{what} (%)")
    add_files(store.path, SWEEP_FILES)
    return result


def read_sweep(store: FeatureStore) -> str | None:
    """The chosen codes of `store`: the sweep's best key if one was run (a combination's 'layer|pool+layer|pool'
    when its selection chose several views), else the combination of views the codes were extracted as, if
    any."""
    file = store.path / SWEEP_FILE
    if not file.is_file():
        return store.combination
    found = json.loads(file.read_text())
    views = found.get("selection", {}).get("views", [])
    if len(views) > 1:
        return COMBINED.join(f"{layer}|{store.pool_name(pool)}" for layer, pool in views)
    best = found["best"]
    return f"{best['layer']}|{store.pool_name(best['pool'])}"

