"""The jobs the CLI runs, composed from features, store, probe and plots; each is a plain function."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferkit.codes.extract import extract
from transferkit.codes.extractor import FeatureExtractor
from transferkit.codes.params import COMBINED, POOL_NAMES
from transferkit.codes.spec import CodeSpec
from transferkit.codes.store import KIND, FeatureStore
from transferkit.data.datasets import ImageDataset, open_dataset
from transferkit.data.decode import collate
from transferkit.data.folders import no_images, scan_images
from transferkit.data.transforms import MIRROR, build_transform, hflip
from transferkit.errors import DataError, ParameterError
from transferkit.models.params import DEFAULT_MODEL, PRE_LOGITS
from transferkit.models.weights import weights_argument
from transferkit.probe.heads import flip_average
from transferkit.probe.linear import DEFAULT_CS, LinearProbe
from transferkit.probe.metrics import (
    Evaluation,
    MultiLabelEvaluation,
    evaluate_predictions,
    expected_calibration_error,
    score_multilabel,
)
from transferkit.probe.multilabel import MultiLabelProbe
from transferkit.probe.saved import FLIP, is_probe_dir, load_probe_dir, probe_scores
from transferkit.probe.sweep import SweepResult, select_views, sweep
from transferkit.probe.sweep_cache import cached_sweep
from transferkit.runtime.atomic import write_json_atomic, write_text_atomic
from transferkit.runtime.device import autocast, default_device
from transferkit.runtime.outputs import add_files, building, check_output, new_tmp
from transferkit.runtime.progress import progress_bar

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
SWEEP_FILES = (SWEEP_FILE, "sweep.png")  # what a sweep adds to a codes directory
PROBE_KIND, EVALUATION_KIND = "probe", "evaluation"  # output kinds (transferkit.runtime.outputs)
RUN_CONFIG = "config.json"  # what marks a fine-tuning run directory (transferkit.finetune.loop)
SWEEP_SAMPLES = 2000  # --layer auto on more images sweeps a stratified sample, then extracts only the winner
# --layer auto's combination of views (greedy forward selection after the sweep, bench/multilayer.py): among the
# sweep's best SELECT_CANDIDATES views, at most SELECT_MAX_VIEWS, each adding more than SELECT_MIN_GAIN CV accuracy
SELECT_CANDIDATES, SELECT_MAX_VIEWS, SELECT_MIN_GAIN = 6, 3, 0.002


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
    whose views are then extracted; off by default: it won at 10 and 1,000 images per class, not at 100, and on
    all 60,000 it is unmeasured (docs/benchmarks.md 'multilayer'). `views`
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
    exact_decode, mirror) that make the codes of `ref` again: its `key` codes if given, else its chosen codes
    (`read_sweep`: the sweep's winner, or the combination of views it holds), else all its codes, read from their
    CodeSpecs.

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
            "exact_decode": spec.exact_decode, "mirror": bool(spec.transform.get(MIRROR))}


def check_like(extractor: FeatureExtractor, ref: FeatureStore) -> None:
    """Stop before any image is encoded when the extractor rebuilt from `ref`'s specs makes other codes than
    `ref` holds (with `mirror`: than `ref` would hold of the mirror images): its weights resolve to another file
    now (weights 'auto'), or the model's config changed."""
    for key, mine in extractor.code_specs().items():
        theirs = CodeSpec.from_meta(ref.meta, key)  # a view of a combination: stored as any other
        if extractor.mirror:  # asked for: the mirror images' codes, made like `ref`'s in every other respect
            theirs = replace(theirs, transform={**theirs.transform, MIRROR: True})
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
        top = sorted(result.rows, key=lambda r: (-r["cv_accuracy"], r["dim"]))[:SELECT_CANDIDATES]
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


@dataclass
class ProbeReport:
    """What `train_probe` produced."""

    probe: LinearProbe
    key: str
    out: Path
    evaluation: Evaluation | MultiLabelEvaluation | None


def train_probe(
    train: str | Path | FeatureStore,
    out: str | Path,
    *,
    test: str | Path | FeatureStore | None = None,
    layer: str | None = None,
    pool: str | None = None,
    C: float | str = "auto",
    Cs: Sequence[float] = DEFAULT_CS,
    scaling: str = "standard",
    cv: int = 5,
    class_weight: str | None = None,
    metric: str = "auto",
    max_iter: int = 5000,
    head: str = "svm",
    flip: bool = False,
    progress: bool = True,
) -> ProbeReport:
    """Fit a LinearProbe on training codes, evaluate on test codes, save probe, metrics and plots to `out`.

    metrics.json records the metric that chose C (`cv_metric`) and, with a test set, accuracy, balanced accuracy,
    macro-F1 and the per-class scores (`test`: Evaluation.to_dict); multi-label codes: mAP, micro/macro-F1 and
    per-label scores (MultiLabelProbe).

    `flip`: C (and the head) are chosen by CV on the training codes, then the head is refitted on them and on the
    codes of their mirror images (`mirror_codes`: made from the images the codes name, through the code cache);
    test images, and the saved probe's (predict, evaluate: `probe_scores`), score the mean of their own and their
    mirror's scores. Off by default: on Fashion-MNIST it gained 0.4-0.6 points at 10 images per class but cost
    logistic regression 0.26 at 100 (docs/benchmarks.md 'probe-combined')."""
    train = train if isinstance(train, FeatureStore) else FeatureStore(train)
    test_path = test.path if isinstance(test, FeatureStore) else test
    check_output(out, PROBE_KIND, inputs=[train.path, test_path])  # before the work
    key = _probe_key(train, layer, pool, metric)
    test = test if test is None or isinstance(test, FeatureStore) else FeatureStore(test)
    if test is not None:
        check_compatible(train, test, key)
    mirrored = _mirror_pair(train, test, key, Path(out), progress) if flip else (None, None)
    kind = MultiLabelProbe if train.multilabel else LinearProbe  # one SVM per label, thresholds of their own
    probe = kind(C=C, Cs=Cs, scaling=scaling, cv=cv, class_weight=class_weight, metric=metric,
                 max_iter=max_iter, head=head).fit(train.load(key), train.labels)
    if flip:  # C as chosen on the images alone; see LinearProbe.refit
        probe.refit(np.concatenate([train.load(key), mirrored[0]]), np.concatenate([train.labels] * 2))
    code_spec = CodeSpec.from_meta(train.meta, key)  # load_probe_dir rebuilds the extractor from it
    spec = {"model": code_spec.model, "weights": train.meta["weights"], "image_size": train.meta["image_size"],
            "precision": code_spec.precision, "transform": code_spec.transform, "classes": train.meta["classes"],
            "layer": code_spec.layer, "pool": code_spec.pool, "key": key, "code_spec": code_spec.to_dict(),
            "pool_names": POOL_NAMES, "multilabel": train.multilabel, FLIP: flip}
    evaluation = None
    metrics = {"key": key, "head": probe.head_, "C": probe.best_C_,
               "cv_mAP" if train.multilabel else "cv_accuracy": probe.cv_score_, "cv_metric": probe.metric_,
               "class_weight": class_weight, "n_train": len(train), FLIP: flip}
    with building(out, PROBE_KIND, inputs=[train.path, test_path]) as tmp:
        probe.save(tmp / "probe", extra=spec)
        if test is not None:
            evaluation = _score_test(probe, key, train, test, tmp, metrics, mirrored[1])
        write_json_atomic(tmp / "metrics.json", metrics)
    return ProbeReport(probe, key, Path(out), evaluation)


def _mirror_pair(train: FeatureStore, test: FeatureStore | None, key: str, out: Path,
                 progress: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The `key` codes of the mirror images of `train`'s and `test`'s images, for a flip probe; each set's images
    are checked before either is encoded."""
    if train.multilabel:
        raise ParameterError("The 'flip' parameter is for codes of one class per image: a multi-label probe's "
                             f"thresholds are chosen on single scores, and '{train.path}' is multi-label",
                             param="flip")
    if CodeSpec.from_meta(train.meta, key).transform.get(MIRROR):
        raise ParameterError(f"The 'flip' parameter makes the mirror images' codes itself: '{train.path}' already "
                             "holds codes of mirror images (extract --mirror); give the codes of the images",
                             param="flip")
    sets = [s for s in (train, test) if s is not None]
    images = [store_images(s) for s in sets]
    codes = [mirror_codes(s, key, out, images=i, progress=progress) for s, i in zip(sets, images)]
    return codes[0], codes[1] if test is not None else None


def store_images(store: FeatureStore) -> ImageDataset:
    """The images `store`'s codes were made from, in its rows' order, reopened from the dataset and sources its
    meta.json records (for their mirror images' codes: `flip`); an error names what is gone."""
    root = store.meta.get("dataset", {}).get("root")
    why, fix = "The 'flip' parameter needs the images of", "; extract the codes again where the images are now"
    if root is None or store.meta["dataset"].get("kind") == "files":
        raise ParameterError(f"{why} '{store.path}', and its meta.json records no dataset to open{fix}",
                             param="flip")
    try:
        dataset = open_dataset(root)
    except DataError as err:
        raise ParameterError(f"{why} '{store.path}' (its dataset '{root}'), and they cannot be opened: {err}{fix}",
                             param="flip") from err
    index = {source: i for i, source in enumerate(dataset.sources)}
    if missing := [s for s in store.sources if s not in index]:
        raise ParameterError(f"{why} '{store.path}', and {len(missing)} of them are no longer in '{root}' (e.g. "
                             f"'{missing[0]}'){fix}", param="flip")
    return dataset.select(np.array([index[s] for s in store.sources], dtype=np.int64))


def mirror_codes(store: FeatureStore, key: str, near: Path, *, images: ImageDataset | None = None,
                 progress: bool = True) -> np.ndarray:
    """The `key` codes of the mirror images of `store`'s images (`store_images`), made as `store`'s own in every
    other respect and read from or added to the code cache; what a flip probe is fitted and scored on beside the
    images' own codes. Encoded in a hidden folder beside `near`, removed after."""
    images = store_images(store) if images is None else images
    extractor = FeatureExtractor(**{**like_options(store, key=key), "mirror": True}, progress=progress).fit()
    check_like(extractor, store)
    scratch = new_tmp(near.with_name(f"{near.name}.mirror"), KIND)  # marked and hidden: never a user's folder
    try:
        return extract(images, scratch / "codes", extractor, cache=True).load(key)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _probe_key(train: FeatureStore, layer: str | None, pool: str | None, metric: str) -> str:
    """The codes a probe trains on: layer 'best' is the sweep's winner (sweeping first if none was run); no layer
    and no pool on codes of several views is the sweep's winner when one was run, else an error that lists them."""
    several = layer is None and pool is None and len(train.keys) > 1
    best = read_sweep(train) if layer == "best" or several else None  # sweep.json, read once
    if layer == "best" and best is None:  # no sweep yet: run it, then read its winner as any later run will
        sweep_features(train, metric=metric)
        best = read_sweep(train)
    if best is not None:
        log.info("codes: %s (the layer sweep's best)", best)
        return best
    if several:
        shown = ", ".join(train.keys[:6]) + (f", ... ({len(train.keys)} in all)" if len(train.keys) > 6 else "")
        raise ParameterError(f"The 'layer' parameter must name the codes to train on: '{train.path}' holds several "
                             f"({shown}). Set layer='best' to let the layer sweep choose, or a layer (and pool).",
                             param="layer")
    return train.key(layer, pool)


def _score_test(probe: LinearProbe, key: str, train: FeatureStore, test: FeatureStore, tmp: Path,
                metrics: dict, mirrored: np.ndarray | None = None) -> Evaluation | MultiLabelEvaluation:
    """A fitted probe scored on test codes (and with the codes of their `mirrored` images, on the mean of both
    scores): report.txt (and confusion.png) into `tmp`, the scores into `metrics`."""
    from transferkit.plots import plot_confusion

    if isinstance(probe, MultiLabelProbe):
        evaluation = score_multilabel(multilabel_targets(test, train.classes), probe.decision_function(
            test.load(key)), probe.thresholds_, train.classes)
        metrics.update(n_test=len(test), **{k: v for k, v in evaluation.to_dict().items() if k != "report"})
    else:
        scores = probe.decision_function(test.load(key))
        if mirrored is not None:
            scores = flip_average(scores, probe.decision_function(mirrored))
        evaluation = evaluate_predictions(probe, probe.predict_from_scores(scores), test.labels, names=train.classes)
        plot_confusion(evaluation.confusion, evaluation.labels, tmp / "confusion.png", title=f"{key} on {test.path}")
        metrics.update(n_test=len(test), test_accuracy=evaluation.accuracy,
                       test_balanced_accuracy=evaluation.balanced_accuracy, test_macro_f1=evaluation.macro_f1,
                       test=evaluation.to_dict())
        if probe.calibrated and set(np.unique(test.labels)) <= set(probe.classes_):  # how far to trust predict's
            metrics["test_ece"] = expected_calibration_error(test.labels, probe.proba_from_scores(scores),
                                                             probe.classes_)
            log.info("test expected calibration error of the probabilities: %.4f", metrics["test_ece"])
    write_text_atomic(tmp / "report.txt", evaluation.report)
    return evaluation


def multilabel_targets(data: FeatureStore | ImageDataset, classes: Sequence[str]) -> np.ndarray:
    """The multi-label targets of codes or images as 0/1 columns over `classes` (a probe's or run's, in their
    order); an image labelled with a class outside them is an error naming it: nothing was trained to find it."""
    where = data.path if isinstance(data, FeatureStore) else data.root
    if not data.multilabel:
        raise DataError(f"'{where}' has one class per image; the model was trained on multi-label data")
    Y = data.labels if isinstance(data, FeatureStore) else data.targets
    index = {name: j for j, name in enumerate(classes)}
    if unknown := [c for c in data.classes if c not in index]:
        row = int(np.flatnonzero(Y[:, data.classes.index(unknown[0])])[0])
        raise DataError(f"'{data.sources[row]}' is labelled '{unknown[0]}', a class the model was not trained on "
                        f"(it knows {', '.join(classes)})")
    out = np.zeros((len(Y), len(classes)), dtype=np.int64)
    out[:, [index[c] for c in data.classes]] = Y
    return out


def check_compatible(train: FeatureStore, test: FeatureStore, key: str) -> None:
    """Refuse to score test codes made differently from the training codes: their CodeSpecs must agree, and
    their classes."""
    mine = CodeSpec.from_meta(train.meta, key)
    fix = f"extract the test set with like='{train.path}'"
    if not test.has(key):
        closest = min((CodeSpec.from_meta(test.meta, k) for k in [*test.keys, *filter(None, [test.combination])]),
                      key=lambda s: len(mine.differences(s)))
        raise DataError(f"'{test.path}' has no codes for '{key}' (it has {', '.join(test.keys)}; the closest differ "
                        f"in {mine.describe_differences(closest, ('train', 'test'))}); {fix}")
    theirs = CodeSpec.from_meta(test.meta, key)
    if differ := mine.scoring_differences(theirs):  # float rounding (bf16 vs fp32, folding) scores as it always did
        raise DataError(f"'{test.path}' and '{train.path}' hold different codes for '{key}': "
                        f"{mine.describe_differences(theirs, ('train', 'test'), only=differ)}; {fix}")
    if train.multilabel:  # a test manifest lists the classes it has; each must be one the probe learnt
        multilabel_targets(test, train.classes)
    elif train.classes != test.classes:
        raise DataError(f"'{test.path}' has classes {test.classes!r} but '{train.path}' {train.classes!r}; {fix}")


def image_files(paths: list[str | Path]) -> list[str]:
    """Image files named directly or found in the named folders (as training finds them: scan_images)."""
    paths = [Path(p) for p in paths]
    missing = next((p for p in paths if not p.is_dir() and not p.is_file()), None)
    if missing is not None:
        raise DataError(f"'{missing}' does not exist")
    in_folders = iter(scan_images([p for p in paths if p.is_dir()]))
    files: list[str] = []
    for p in paths:
        found = next(in_folders) if p.is_dir() else [str(p)]
        if not found:
            raise no_images(p, what="folder")
        files += found
    return files


def predict_images(model_dir: str | Path, paths: list[str | Path], *, batch_size: int = 64, topk: int = 1,
                   raw: bool = False) -> list[dict]:
    """Label and probability of each image, from a probe (calibrated: LinearProbe.predict_proba) or a fine-tuning
    run (softmax), with the `topk` most probable classes in 'top' ([{'label', 'score'}, ...]); multi-label models
    also list every label at or above its threshold ('labels'), each with its own probability (Platt, sigmoid).

    `raw`: the scores before they become probabilities (a probe's SVM scores, a run's logits). 'score_kind' says
    which a row holds: 'probability', 'svm_score' or 'logit'. A probe saved before probes were calibrated has
    only SVM scores: they are returned, with a warning, rather than nothing.
    """
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ParameterError(f"The 'topk' parameter must be an int >= 1. Got {topk!r} instead.", param="topk")
    files = image_files(paths)
    if model_kind(model_dir) == "run":
        names, values, kind, found = _run_outputs(model_dir, files, batch_size, raw)
    else:
        names, values, kind, found = _probe_outputs(model_dir, files, batch_size, raw)
    return [_prediction(f, v, names, kind, topk, None if found is None else found[i])
            for i, (f, v) in enumerate(zip(files, values))]


def _run_outputs(run_dir: str | Path, files: list[str], batch_size: int,
                 raw: bool) -> tuple[list[str], np.ndarray, str, np.ndarray | None]:
    """A run's class names, probabilities (or logits), their kind, and (multi-label) which labels are found."""
    from scipy.special import expit, softmax

    model, meta = _load_run(run_dir)
    items = ImageDataset(files, np.zeros(len(files)), meta["classes"], root="images", kind="files",
                         transform=build_transform(meta["transform"]))  # the run's recorded eval transform
    logits = _run_probabilities(model, items, meta, batch_size, progress=False, raw=True)
    probs = expit(logits) if meta.get("multilabel") else softmax(logits, axis=1)
    found = None
    if meta.get("multilabel"):
        from transferkit.finetune.rundir import run_thresholds

        found = probs >= np.asarray(run_thresholds(meta))
    return meta["classes"], logits if raw else probs, "logit" if raw else "probability", found


def _probe_outputs(probe_dir: str | Path, files: list[str], batch_size: int,
                   raw: bool) -> tuple[list[str], np.ndarray, str, np.ndarray | None]:
    """A probe's class names (in its columns' order), probabilities (or SVM scores), their kind, and
    (multi-label) which labels reach their thresholds."""
    probe, extractor = load_probe_dir(probe_dir, batch_size=batch_size)
    scores = probe_scores(probe, extractor, files)  # a flip probe: the mean over each image and its mirror
    names = [probe.extra_["classes"][int(c)] for c in probe.classes_]
    found = scores >= probe.thresholds_ if isinstance(probe, MultiLabelProbe) else None
    if not raw and not probe.calibrated:
        log.warning("%s was saved before probes were calibrated: printing SVM scores, not probabilities "
                    "(train the probe again for probabilities)", probe_dir)
    if raw or not probe.calibrated:
        return names, np.stack([-scores, scores], 1) if scores.ndim == 1 else scores, "svm_score", found
    return names, probe.proba_from_scores(scores), "probability", found


def _prediction(source: str, values: np.ndarray, names: Sequence[str], kind: str, topk: int,
                found: np.ndarray | None) -> dict:
    """One image's row: its best class and score and the `topk` best, or (multi-label: `found`) every label
    found, highest first, and the `topk` best."""
    order = np.argsort(-values, kind="stable")  # ties: the first class, as argmax and predict
    top = [{"label": names[j], "score": float(values[j])} for j in order[:topk]]
    if found is None:
        return {"source": source, "label": top[0]["label"], "score": top[0]["score"], "score_kind": kind, "top": top}
    labels = [{"label": names[j], "score": float(values[j])} for j in order if found[j]]
    return {"source": source, "labels": labels, "score_kind": kind, "top": top}


def evaluate_model(
    model_dir: str | Path,
    data: str | Path | ImageDataset,
    *,
    out: str | Path | None = None,
    per_class: int | None = None,
    batch_size: int = 64,
    progress: bool = True,
    tta: bool = False,
) -> Evaluation | MultiLabelEvaluation:
    """Accuracy, balanced accuracy, macro-F1, confusion and per-class scores of a probe or a fine-tuning run on
    labelled `data` (multi-label data: mAP, F1 and per-label scores).

    Classes are matched by name, so `data` may lack some of the model's classes or order them differently.
    With `out`, report.txt, metrics.json and confusion.png are written there. `tta` (runs only): average the
    softmax of each image and its mirror image, as the run was trained with horizontal flips.
    """
    from transferkit.plots import plot_confusion
    from transferkit.probe.metrics import score_predictions

    dataset = data if isinstance(data, ImageDataset) else load_data(data, per_class=per_class)
    if out is not None:
        check_output(out, EVALUATION_KIND, inputs=[model_dir, dataset.root])  # before the work
    if dataset.multilabel:
        evaluation = _evaluate_multilabel(model_dir, dataset, batch_size, progress, tta)
    elif model_kind(model_dir) == "run":
        model, meta = _load_run(model_dir)
        classes = meta["classes"]
        y = _targets_by_name(dataset, classes, model_dir)
        probs = _run_probabilities(model, dataset.with_transform(build_transform(meta["transform"])), meta,
                                   batch_size, progress, tta)
        evaluation = score_predictions(y, probs.argmax(1), np.arange(len(classes)), classes)
    else:
        if tta:
            raise DataError("test-time augmentation (tta) is for fine-tuning runs; a probe averages each image "
                            "with its mirror image when it was trained with flip (`transferkit probe --flip`)")
        probe, extractor = load_probe_dir(model_dir, batch_size=batch_size, progress=progress)
        classes = probe.extra_["classes"]
        y = _targets_by_name(dataset, classes, model_dir)
        pred = probe.predict_from_scores(probe_scores(probe, extractor, dataset))  # flip probes: image and mirror
        evaluation = evaluate_predictions(probe, pred, y, names=classes)
    if out is not None:
        with building(out, EVALUATION_KIND, inputs=[model_dir, dataset.root]) as tmp:
            if isinstance(evaluation, Evaluation):
                title = f"{Path(model_dir).name} on {dataset.root}: {100 * evaluation.accuracy:.2f}%"
                plot_confusion(evaluation.confusion, evaluation.labels, tmp / "confusion.png", title=title)
            write_text_atomic(tmp / "report.txt", evaluation.report)
            write_json_atomic(tmp / "metrics.json", {**evaluation.to_dict(), "model_dir": str(model_dir),
                                                     "data": str(dataset.root), "n": len(dataset)})
    return evaluation


def _evaluate_multilabel(model_dir: str | Path, dataset: ImageDataset, batch_size: int, progress: bool,
                         tta: bool) -> MultiLabelEvaluation:
    """mAP and F1 of a multi-label probe or run on multi-label `dataset` (classes matched by name)."""
    if model_kind(model_dir) == "run":
        from transferkit.finetune.rundir import run_thresholds

        model, meta = _load_run(model_dir)
        if not meta.get("multilabel"):
            raise DataError(f"'{dataset.root}' is multi-label, and '{model_dir}' was trained on one class per image")
        scores = _run_probabilities(model, dataset.with_transform(build_transform(meta["transform"])), meta,
                                    batch_size, progress, tta)
        classes, thresholds = meta["classes"], run_thresholds(meta)
    else:
        probe, extractor = load_probe_dir(model_dir, batch_size=batch_size, progress=progress)
        if not isinstance(probe, MultiLabelProbe):
            raise DataError(f"'{dataset.root}' is multi-label, and '{model_dir}' was trained on one class per image")
        scores, classes, thresholds = probe.decision_function(extractor.transform(dataset)), \
            probe.extra_["classes"], probe.thresholds_
    return score_multilabel(multilabel_targets(dataset, classes), scores, thresholds, classes)


def model_kind(model_dir: str | Path) -> str:
    """'probe' for a directory written by `transferkit probe`, 'run' for one written by `transferkit finetune`."""
    path = Path(model_dir)
    if is_probe_dir(path):
        return "probe"
    if (path / RUN_CONFIG).is_file():
        return "run"
    raise DataError(
        f"'{model_dir}' is not a model directory: expected a probe (a 'probe' folder, from `transferkit probe`) "
        f"or a fine-tuning run ('{RUN_CONFIG}' and model-best.safetensors, from `transferkit finetune`)"
    )


def _load_run(run_dir: str | Path) -> tuple[torch.nn.Module, dict]:
    """The best model of a fine-tuning run, on the default device, and its config.json."""
    from transferkit.finetune.rundir import load_finetuned  # the training machinery is only needed here

    model, meta = load_finetuned(run_dir)
    return model.to(default_device()), meta


def _targets_by_name(dataset: ImageDataset, classes: list[str], model_dir: str | Path) -> np.ndarray:
    """The labels of `dataset` as indices into the model's `classes`, matched by class name."""
    index = {name: k for k, name in enumerate(classes)}
    present = [dataset.classes[k] for k in np.unique(dataset.targets)]
    unknown = [name for name in present if name not in index]
    if unknown:
        raise DataError(
            f"'{dataset.root}' has class(es) {', '.join(repr(n) for n in unknown)} that model '{model_dir}' was "
            f"not trained on (its classes: {', '.join(classes)})"
        )
    mapping = np.array([index.get(name, -1) for name in dataset.classes], dtype=np.int64)
    return mapping[dataset.targets]


@torch.inference_mode()
def _run_probabilities(model: torch.nn.Module, dataset: ImageDataset, meta: dict, batch_size: int,
                       progress: bool, tta: bool = False, raw: bool = False) -> np.ndarray:
    """(N, n_classes) softmax probabilities (multi-label: sigmoids) of a fine-tuned model over `dataset`.

    `tta`: the mean of the image's and its horizontal mirror's probabilities. `raw`: the logits instead.
    """
    device = next(model.parameters()).device
    precision = meta["config"].get("precision", "fp32")
    if precision == "fp16" and device.type != "cuda":
        precision = "fp32"  # a run trained with fp16 on a GPU still scores on a CPU
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    activate = torch.sigmoid if meta.get("multilabel") else functools.partial(torch.softmax, dim=1)
    activate = (lambda logits: logits) if raw else activate
    probs = []
    for x, _, _, bad in progress_bar(loader, desc="evaluate", unit="batch", enabled=progress):
        if bad:  # every image must be scored, or the labels no longer line up
            raise DataError(bad[0][1])
        x = x.to(device, memory_format=torch.channels_last)
        with autocast(precision, device):
            p = activate(model(x).float())  # (B, n_classes)
            if tta:
                p = (p + activate(model(hflip(x)).float())) / 2
        probs.append(p.cpu().numpy())
    return np.concatenate(probs)
