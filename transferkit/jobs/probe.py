"""The probe job: fit a LinearProbe on a codes folder, score it on another, save it (`train_probe`), with flip
averaging's mirror codes (`mirror_codes`) and augmentation's shifted copies (`copy_codes`)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferkit.codes.extract import extract
from transferkit.codes.extractor import FeatureExtractor
from transferkit.codes.params import POOL_NAMES
from transferkit.codes.spec import CodeSpec
from transferkit.codes.store import KIND, FeatureStore
from transferkit.data.datasets import ImageDataset, open_dataset
from transferkit.data.transforms import MIRROR, SHIFT_COPY
from transferkit.errors import DataError, ParameterError
from transferkit.jobs.extract import check_like, like_options, read_sweep, sweep_features
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
from transferkit.probe.params import PROBE_JOB
from transferkit.probe.saved import AUGMENT, FLIP
from transferkit.runtime.atomic import write_json_atomic, write_text_atomic
from transferkit.runtime.outputs import building, check_output, new_tmp
from transferkit.runtime.params import validate

log = logging.getLogger(__name__)

PROBE_KIND = "probe"  # output kind (transferkit.runtime.outputs)


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
    augment: int = 0,
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
    logistic regression 0.26 at 100 (docs/benchmarks.md 'probe-combined').

    `augment`: as `flip`, and on the codes of `augment` shifted copies of each training image too (`copy_codes`,
    transforms.ShiftCopy); test images are scored as they are. Off by default: on Fashion-MNIST 10 copies lifted
    the SVM 0.7-1.1 points at 10 and 100 per class, not logistic regression at 100 (docs/benchmarks.md
    'probe-augment'), and each copy costs a pass over the images."""
    train = train if isinstance(train, FeatureStore) else FeatureStore(train)
    test_path = test.path if isinstance(test, FeatureStore) else test
    check_output(out, PROBE_KIND, inputs=[train.path, test_path])  # before the work
    key = _probe_key(train, layer, pool, metric)
    test = test if test is None or isinstance(test, FeatureStore) else FeatureStore(test)
    if test is not None:
        check_compatible(train, test, key)
    mirrored = _mirror_pair(train, test, key, Path(out), progress) if flip else (None, None)
    copies = _copies(train, key, Path(out), augment, progress)
    kind, X = MultiLabelProbe if train.multilabel else LinearProbe, train.load(key)  # multi-label: SVM per label
    probe = kind(C=C, Cs=Cs, scaling=scaling, cv=cv, class_weight=class_weight, metric=metric,
                 max_iter=max_iter, head=head).fit(X, train.labels)
    if flip or copies:  # C as chosen on the images alone; see LinearProbe.refit
        extra = [mirrored[0]] * flip + copies
        probe.refit(np.concatenate([X, *extra]), np.concatenate([train.labels] * (1 + len(extra))))
    evaluation = None
    metrics = {"key": key, "head": probe.head_, "C": probe.best_C_,
               "cv_mAP" if train.multilabel else "cv_accuracy": probe.cv_score_, "cv_metric": probe.metric_,
               "class_weight": class_weight, "n_train": len(train), FLIP: flip, AUGMENT: augment}
    with building(out, PROBE_KIND, inputs=[train.path, test_path]) as tmp:
        probe.save(tmp / "probe", extra={**_saved_spec(train, key), FLIP: flip, AUGMENT: augment})
        if test is not None:
            evaluation = _score_test(probe, key, train, test, tmp, metrics, mirrored[1])
        write_json_atomic(tmp / "metrics.json", metrics)
    return ProbeReport(probe, key, Path(out), evaluation)


def _saved_spec(train: FeatureStore, key: str) -> dict:
    """What a saved probe records of the codes it was trained on: load_probe_dir rebuilds the extractor from it."""
    code_spec = CodeSpec.from_meta(train.meta, key)
    return {"model": code_spec.model, "weights": train.meta["weights"], "image_size": train.meta["image_size"],
            "precision": code_spec.precision, "transform": code_spec.transform, "classes": train.meta["classes"],
            "layer": code_spec.layer, "pool": code_spec.pool, "key": key, "code_spec": code_spec.to_dict(),
            "pool_names": POOL_NAMES, "multilabel": train.multilabel}


def _copies(train: FeatureStore, key: str, out: Path, augment: int, progress: bool) -> list[np.ndarray]:
    """The `key` codes of `augment` shifted copies of `train`'s images, for an augmented probe."""
    if not augment:
        return []
    validate(PROBE_JOB, {"augment": augment}, "train_probe")
    if train.multilabel:  # a shift can push a small item out of the image, and with it a label
        raise ParameterError("The 'augment' parameter is for codes of one class per image, and "
                             f"'{train.path}' is multi-label", param="augment")
    transform = CodeSpec.from_meta(train.meta, key).transform
    if transform.get(MIRROR) or transform.get(SHIFT_COPY):
        raise ParameterError(f"The 'augment' parameter makes the shifted copies' codes itself: '{train.path}' "
                             "holds codes of mirror images or copies; give the codes of the images", param="augment")
    images = store_images(train, param="augment")
    return [copy_codes(train, key, out, images=images, shift_copy=k, progress=progress)
            for k in range(1, augment + 1)]


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
    images = [store_images(s, param="flip") for s in sets]
    codes = [mirror_codes(s, key, out, images=i, progress=progress) for s, i in zip(sets, images)]
    return codes[0], codes[1] if test is not None else None


def store_images(store: FeatureStore, param: str = "flip") -> ImageDataset:
    """The images `store`'s codes were made from, in its rows' order, reopened from the dataset and sources its
    meta.json records (for their mirror images' or shifted copies' codes: the `param` that needs them); an error
    names what is gone."""
    root = store.meta.get("dataset", {}).get("root")
    why, fix = f"The '{param}' parameter needs the images of", "; extract the codes again where the images are now"
    if root is None or store.meta["dataset"].get("kind") == "files":
        raise ParameterError(f"{why} '{store.path}', and its meta.json records no dataset to open{fix}",
                             param=param)
    try:
        dataset = open_dataset(root)
    except DataError as err:
        raise ParameterError(f"{why} '{store.path}' (its dataset '{root}'), and they cannot be opened: {err}{fix}",
                             param=param) from err
    index = {source: i for i, source in enumerate(dataset.sources)}
    if missing := [s for s in store.sources if s not in index]:
        raise ParameterError(f"{why} '{store.path}', and {len(missing)} of them are no longer in '{root}' (e.g. "
                             f"'{missing[0]}'){fix}", param=param)
    return dataset.select(np.array([index[s] for s in store.sources], dtype=np.int64))


def mirror_codes(store: FeatureStore, key: str, near: Path, *, images: ImageDataset | None = None,
                 progress: bool = True) -> np.ndarray:
    """The `key` codes of the mirror images of `store`'s images (`store_images`), made as `store`'s own in every
    other respect and read from or added to the code cache; what a flip probe is fitted and scored on beside the
    images' own codes. Encoded in a hidden folder beside `near`, removed after."""
    images = store_images(store, param="flip") if images is None else images
    return _codes_like(store, key, near, images, progress, mirror=True)


def copy_codes(store: FeatureStore, key: str, near: Path, *, shift_copy: int, images: ImageDataset | None = None,
               progress: bool = True) -> np.ndarray:
    """The `key` codes of shifted copy `shift_copy` (>= 1; transforms.ShiftCopy) of `store`'s images, made and
    cached as `mirror_codes` makes the mirror images'; what an augmented probe is refitted on."""
    images = store_images(store, param="augment") if images is None else images
    return _codes_like(store, key, near, images, progress, shift_copy=shift_copy)


def _codes_like(store: FeatureStore, key: str, near: Path, images: ImageDataset, progress: bool,
                **changes) -> np.ndarray:
    """`store`'s `key` codes made again of `images` (its own), with the FeatureExtractor parameters `changes`
    changed."""
    extractor = FeatureExtractor(**{**like_options(store, key=key), **changes}, progress=progress).fit()
    check_like(extractor, store)
    scratch = new_tmp(near.with_name(f"{near.name}.codes"), KIND)  # marked and hidden: never a user's folder
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

