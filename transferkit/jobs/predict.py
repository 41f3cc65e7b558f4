"""Using what was trained: predictions for image files (`predict_images`) and scores on a labelled dataset
(`evaluate_model`), from a saved probe, an ensemble of probes or a fine-tuning run."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from transferkit.data.datasets import ImageDataset
from transferkit.data.decode import collate
from transferkit.data.folders import no_images, scan_images
from transferkit.data.transforms import build_transform, hflip
from transferkit.errors import DataError, ParameterError
from transferkit.jobs.extract import load_data
from transferkit.jobs.probe import multilabel_targets
from transferkit.probe.ensemble import ENSEMBLE_FILE, ensemble_proba, is_ensemble_dir, load_ensemble_dir
from transferkit.probe.metrics import (
    Evaluation,
    MultiLabelEvaluation,
    evaluate_predictions,
    score_multilabel,
    score_predictions,
)
from transferkit.probe.multilabel import MultiLabelProbe
from transferkit.probe.saved import class_names, is_probe_dir, load_probe_dir, probe_scores
from transferkit.runtime.atomic import write_json_atomic, write_text_atomic
from transferkit.runtime.device import autocast, default_device
from transferkit.runtime.outputs import building, check_output
from transferkit.runtime.progress import progress_bar

log = logging.getLogger(__name__)

EVALUATION_KIND = "evaluation"  # output kind (transferkit.runtime.outputs)
RUN_CONFIG = "config.json"  # what marks a fine-tuning run directory (transferkit.finetune.loop)


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
    outputs = {"run": _run_outputs, "ensemble": _ensemble_outputs, "probe": _probe_outputs}[model_kind(model_dir)]
    names, values, kind, found = outputs(model_dir, files, batch_size, raw)
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
    names = class_names(probe)
    found = scores >= probe.thresholds_ if isinstance(probe, MultiLabelProbe) else None
    if not raw and not probe.calibrated:
        log.warning("%s was saved before probes were calibrated: printing SVM scores, not probabilities "
                    "(train the probe again for probabilities)", probe_dir)
    if raw or not probe.calibrated:
        return names, np.stack([-scores, scores], 1) if scores.ndim == 1 else scores, "svm_score", found
    return names, probe.proba_from_scores(scores), "probability", found


def _ensemble_outputs(ensemble_dir: str | Path, files: list[str], batch_size: int,
                      raw: bool) -> tuple[list[str], np.ndarray, str, None]:
    """An ensemble's classes and probabilities (the mean of its members')."""
    if raw:
        raise ParameterError(f"The 'raw' parameter asks for scores before probabilities, and '{ensemble_dir}' is an "
                             "ensemble: its scores are the mean of its members' probabilities", param="raw")
    members, classes = load_ensemble_dir(ensemble_dir, batch_size=batch_size)
    return classes, ensemble_proba(members, classes, files), "probability", None


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

    dataset = data if isinstance(data, ImageDataset) else load_data(data, per_class=per_class)
    if out is not None:
        check_output(out, EVALUATION_KIND, inputs=[model_dir, dataset.root])  # before the work
    if dataset.multilabel:
        evaluation = _evaluate_multilabel(model_dir, dataset, batch_size, progress, tta)
    else:
        evaluation = _evaluate(model_dir, dataset, batch_size, progress, tta)
    if out is not None:
        with building(out, EVALUATION_KIND, inputs=[model_dir, dataset.root]) as tmp:
            if isinstance(evaluation, Evaluation):
                title = f"{Path(model_dir).name} on {dataset.root}: {100 * evaluation.accuracy:.2f}%"
                plot_confusion(evaluation.confusion, evaluation.labels, tmp / "confusion.png", title=title)
            write_text_atomic(tmp / "report.txt", evaluation.report)
            write_json_atomic(tmp / "metrics.json", {**evaluation.to_dict(), "model_dir": str(model_dir),
                                                     "data": str(dataset.root), "n": len(dataset)})
    return evaluation


def _evaluate(model_dir: str | Path, dataset: ImageDataset, batch_size: int, progress: bool,
              tta: bool) -> Evaluation:
    """evaluate_model on data of one class per image, by the kind of model."""
    kind = model_kind(model_dir)
    if tta and kind != "run":
        raise DataError(f"test-time augmentation (tta) is for fine-tuning runs, not for the {kind} '{model_dir}': "
                        "a probe averages each image with its mirror image when it was trained with flip "
                        "(`transferkit probe --flip`)")
    if kind == "run":
        model, meta = _load_run(model_dir)
        classes = meta["classes"]
        y = _targets_by_name(dataset, classes, model_dir)
        probs = _run_probabilities(model, dataset.with_transform(build_transform(meta["transform"])), meta,
                                   batch_size, progress, tta)
        return score_predictions(y, probs.argmax(1), np.arange(len(classes)), classes)
    if kind == "ensemble":
        members, classes = load_ensemble_dir(model_dir, batch_size=batch_size, progress=progress)
        y = _targets_by_name(dataset, classes, model_dir)
        return score_predictions(y, ensemble_proba(members, classes, dataset).argmax(1), np.arange(len(classes)),
                                 classes)
    probe, extractor = load_probe_dir(model_dir, batch_size=batch_size, progress=progress)
    classes = probe.extra_["classes"]
    y = _targets_by_name(dataset, classes, model_dir)
    pred = probe.predict_from_scores(probe_scores(probe, extractor, dataset))  # flip probes: image and mirror
    return evaluate_predictions(probe, pred, y, names=classes)


def _evaluate_multilabel(model_dir: str | Path, dataset: ImageDataset, batch_size: int, progress: bool,
                         tta: bool) -> MultiLabelEvaluation:
    """mAP and F1 of a multi-label probe or run on multi-label `dataset` (classes matched by name)."""
    kind = model_kind(model_dir)
    if kind == "ensemble":  # its members are probes of one class per image (ensemble_probes checks)
        raise DataError(f"'{dataset.root}' is multi-label, and ensemble '{model_dir}' was made of probes of one "
                        "class per image")
    if kind == "run":
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
    """'probe' for a directory written by `transferkit probe`, 'ensemble' for one by `transferkit ensemble`, 'run'
    for one by `transferkit finetune`."""
    path = Path(model_dir)
    if is_probe_dir(path):
        return "probe"
    if is_ensemble_dir(path):
        return "ensemble"
    if (path / RUN_CONFIG).is_file():
        return "run"
    raise DataError(
        f"'{model_dir}' is not a model directory: expected a probe (a 'probe' folder, from `transferkit probe`), "
        f"an ensemble ('{ENSEMBLE_FILE}', from `transferkit ensemble`) or a fine-tuning run ('{RUN_CONFIG}' and "
        "model-best.safetensors, from `transferkit finetune`)"
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
