"""`audit`: what is wrong with a data set, found with the codes `extract` makes: leakage into TEST, duplicates,
likely label errors and outliers, written as one output folder (report.html, CSVs, summary.json)."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferkit.auditing import copies
from transferkit.auditing import duplicates as dup
from transferkit.auditing.cleaning import check_fixable, write_cleaned
from transferkit.auditing.label_issues import find_issues, out_of_fold_probabilities
from transferkit.auditing.outliers import class_balance, find_outliers
from transferkit.auditing.params import AUDIT, CV, NEAR_CANDIDATES, NEAR_THRESHOLD, NEIGHBORS, OUTLIER_MADS
from transferkit.auditing.report import Items, write_csvs, write_html, write_summary
from transferkit.codes.extract import extract
from transferkit.codes.extractor import FeatureExtractor
from transferkit.codes.store import FeatureStore
from transferkit.data.datasets import ImageDataset, open_dataset
from transferkit.errors import DataError, ParameterError
from transferkit.jobs import extract_features, like_options, load_data, read_sweep
from transferkit.models.params import DEFAULT_MODEL
from transferkit.runtime.outputs import building, check_output
from transferkit.runtime.params import validate

log = logging.getLogger(__name__)

KIND = "audit"  # output kind (transferkit.runtime.outputs)
FORMAT = "transferkit.audit/1"  # summary.json's format


@dataclass
class AuditResult:
    """What `audit` found; the same as the files in `out`. Indices number DATA's images, then TEST's."""

    out: Path
    summary: dict
    duplicates: list[dict]
    label_issues: list[dict]
    outliers: list[dict]
    sources: list[str]


# Over 60 lines only by its 18 parameters, one a line: the body is the job's steps, one call each.
def audit(
    data: str | Path | ImageDataset,
    out: str | Path,
    *,
    test: str | Path | ImageDataset | None = None,
    model: str = DEFAULT_MODEL,
    weights: str = "auto",
    layer: str = "auto",
    pool: str = "avg",
    image_size: int | None = None,
    batch_size: int = 64,
    precision: str = "auto",
    near_threshold: float = NEAR_THRESHOLD,
    near_candidates: int = NEAR_CANDIDATES,
    neighbors: int = NEIGHBORS,
    outlier_mads: float = OUTLIER_MADS,
    cv: int = CV,
    max_rows: int = 100,
    fix: str | None = None,
    cache: bool = True,
    progress: bool = True,
) -> AuditResult:
    """Audit `data` (and `test`) on their codes; write summary.json, duplicates.csv, label_issues.csv, outliers.csv
    and report.html to `out`, all at once or not at all.

    Codes come from `extract_features` (the code cache is reused); `layer='auto'` uses the sweep's choice. Label
    errors and outliers are looked for in `data`; duplicates in both, and across them (leakage). `fix` ('drop',
    'relabel') also writes cleaned.csv, `data` as a manifest without what was found (auditing.cleaning).
    """
    _check_params(near_threshold=near_threshold, near_candidates=near_candidates, neighbors=neighbors,
                  outlier_mads=outlier_mads, cv=cv, max_rows=max_rows, layer=layer, pool=pool, fix=fix)
    dataset = data if isinstance(data, ImageDataset) else load_data(data)
    check_fixable(dataset, fix)
    test_set = test if test is None or isinstance(test, ImageDataset) else open_dataset(test, min_classes=1)
    if test_set is not None:
        check_test_classes(dataset, test_set)
    inputs = [dataset.root, None if test_set is None else test_set.root]
    check_output(out, KIND, inputs=inputs)  # before the backbone loads
    start = time.perf_counter()
    options = {"model": model, "weights": weights, "image_size": image_size, "batch_size": batch_size,
               "precision": precision, "cache": cache, "progress": progress}
    with building(out, KIND, inputs=inputs) as tmp:
        store, test_store = _codes(dataset, test_set, tmp, layer=layer, pool=pool, **options)
        key = read_sweep(store) or store.keys[0]
        codes = store.load(key)
        test_codes = test_store.load(key) if test_store is not None else np.zeros((0, codes.shape[1]), np.float32)
        coded = time.perf_counter()
        codes_meta = {"key": key, "model": store.meta["model"], "image_size": store.meta["image_size"],
                      "weights_sha256": store.meta["weights"]["sha256"]}
        for scratch in (store.path, None if test_store is None else test_store.path):
            if scratch is not None:
                shutil.rmtree(scratch)  # the code cache keeps them; the audit's files are the output
        result = _find(dataset, test_set, codes, test_codes, near_threshold=near_threshold,
                       near_candidates=near_candidates, neighbors=neighbors, outlier_mads=outlier_mads, cv=cv)
        result.summary.update(codes=codes_meta, seconds=round(time.perf_counter() - start, 3))
        result.summary["seconds_per_step"] = {"codes": round(coded - start, 3), **result.summary["seconds_per_step"]}
        if fix is not None:  # cleaned.csv: DATA as a manifest, without what the audit found
            result.summary["fix"] = write_cleaned(tmp, dataset, result.duplicates, result.label_issues, fix)
        items = _items(dataset, test_set)
        write_csvs(tmp, items, result.duplicates, result.label_issues, result.outliers)
        write_summary(tmp, result.summary)
        write_html(tmp, items, result.summary, result.duplicates, result.label_issues, result.outliers,
                   max_rows=max_rows)
    result.out = Path(out)
    return result


def _check_params(*, layer: str, pool: str, **limited) -> None:
    """The limits of AUDIT, and one kind of codes: the audit compares images on one set of codes."""
    validate(AUDIT, limited, "audit")
    for name, value in (("layer", layer), ("pool", pool)):
        if value == "all" or "," in value:  # 'auto' sweeps and keeps one
            raise ParameterError(f"The '{name}' parameter of audit must name one kind of codes (or layer 'auto'). "
                                 f"Got {value!r} instead.", param=name)


def check_test_classes(dataset: ImageDataset, test: ImageDataset) -> None:
    """Refuse a TEST set with classes DATA lacks (nothing in DATA could be compared with them), or of another kind."""
    if dataset.multilabel != test.multilabel:
        raise DataError(f"'{test.root}' is {'multi-label' if test.multilabel else 'one class per image'} but "
                        f"'{dataset.root}' is {'multi-label' if dataset.multilabel else 'one class per image'}")
    present = test.classes if test.multilabel else [test.classes[k] for k in np.unique(test.targets)]
    if unknown := [c for c in present if c not in dataset.classes]:
        raise DataError(f"'{test.root}' has class(es) {', '.join(map(repr, unknown))} that '{dataset.root}' lacks "
                        f"(its classes: {', '.join(dataset.classes)})")


def _codes(dataset: ImageDataset, test: ImageDataset | None, tmp: Path, *, layer: str, pool: str, cache: bool,
           **options) -> tuple[FeatureStore, FeatureStore | None]:
    """DATA's codes as `extract` makes them, and TEST's by the very same extractor (one network, one BatchNorm
    fold, the same engine: codes that compare), in scratch folders in `tmp`."""
    progress = {"batch_size": options["batch_size"], "progress": options["progress"]}
    if layer == "auto":  # the sweep picks the codes on DATA; TEST is encoded like its winner
        store = extract_features(dataset, tmp / ".codes", layer=layer, pool=pool, cache=cache, combine=False,
                                 **options)  # one view: the audit's checks were measured on single views
        extractor = FeatureExtractor(**like_options(store), **progress)
    else:
        extractor = FeatureExtractor(layer=layer, pool=pool, **options)
        store = extract(dataset, tmp / ".codes", extractor, cache=cache)
    return store, None if test is None else extract(test, tmp / ".test-codes", extractor, cache=cache)


def _find(dataset: ImageDataset, test: ImageDataset | None, codes: np.ndarray, test_codes: np.ndarray, *,
          near_threshold: float, near_candidates: int, neighbors: int, outlier_mads: float, cv: int) -> AuditResult:
    """Every check on the codes in memory; the summary of what they found."""
    n_data = len(codes)
    clock = [time.perf_counter()]
    seconds = {}

    def took(step: str) -> None:  # each step's wall time, in summary.json: what a large audit spends where
        clock.append(time.perf_counter())
        seconds[step] = round(clock[-1] - clock[-2], 3)

    pairs = find_duplicates(dataset, test, codes, test_codes, near_threshold=near_threshold,
                            near_candidates=near_candidates)
    took("duplicates")
    labels = dataset.targets
    probs = out_of_fold_probabilities(codes, labels, cv=cv)
    issues, noise = find_issues(labels, probs, dataset.classes)
    took("label_issues")
    outliers = find_outliers(codes, labels, dataset.classes, neighbors=neighbors, mads=outlier_mads)
    took("outliers")
    count = {f"{k}_{s}": sum(p["kind"] == k and p["scope"] == s for p in pairs)
             for k in (dup.EXACT, dup.NEAR) for s in (dup.LEAKAGE, dup.WITHIN)}
    summary = {
        "format": FORMAT, "data": str(dataset.root), "test": None if test is None else str(test.root),
        "n_data": n_data, "n_test": len(test_codes), "multilabel": dataset.multilabel,
        "parameters": {"near_threshold": near_threshold, "near_candidates": near_candidates, "neighbors": neighbors,
                       "outlier_mads": outlier_mads, "cv": cv},
        "duplicates": {"leakage": count["exact_leakage"] + count["near_leakage"],
                       "within": count["exact_within"] + count["near_within"], **count},
        "label_issues": {"flagged": len(issues), "method": "cleanlab confident learning on out-of-fold "
                         "probabilities of a multinomial logistic regression on standardised codes"
                         if not dataset.multilabel else "cleanlab multi-label confident learning on "
                         "out-of-fold probabilities of one logistic regression per label", "noise": noise},
        "outliers": {"flagged": len(outliers)},
        "class_balance": class_balance(labels, dataset.classes),
        "seconds_per_step": seconds,
    }
    return AuditResult(Path(), summary, pairs, issues, outliers, [*dataset.sources,
                                                                  *(test.sources if test is not None else [])])


def find_duplicates(dataset: ImageDataset, test: ImageDataset | None, codes: np.ndarray, test_codes: np.ndarray, *,
                    near_threshold: float = NEAR_THRESHOLD, near_candidates: int = NEAR_CANDIDATES) -> list[dict]:
    """Exact and near duplicate pairs of DATA + TEST (indices: DATA's images, then TEST's), ranked: leakage first."""
    hashes = dataset.content_hashes() + (test.content_hashes() if test is not None else [])
    exact = dup.exact_duplicates(hashes, len(codes))
    thumbs = np.concatenate([copies.thumbnails(s) for s in (dataset, test) if s is not None])
    near = dup.near_duplicates(np.concatenate([codes, test_codes]), thumbs, len(codes), threshold=near_threshold,
                               candidates=near_candidates, exact=exact)
    return dup.ranked(exact + near)


def _items(dataset: ImageDataset, test: ImageDataset | None) -> Items:
    n = len(dataset)
    return Items([*dataset.sources, *(test.sources if test is not None else [])], n,
                 lambda i: dataset.image(i) if i < n else test.image(i - n))
