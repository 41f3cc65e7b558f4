"""Dense prediction: any classifier transferkit knows (a timm ImageNet model, a fine-tuning run, a probe)
converted to a fully convolutional net, saved and reloaded, and run on whole images of any size.

A converted directory (`transferkit convert -o OUT`) holds convert.json (the source, its architecture,
classes, normalisation and the conversion's parity error) and fully_conv.safetensors (the converted weights);
it rebuilds without the source's files.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from transferkit.codes.params import RENAMED
from transferkit.errors import DataError, ModelError, ParameterError
from transferkit.models.layers import Layer, feature_module, resolve_layers
from transferkit.models.params import PRE_LOGITS
from transferkit.runtime.atomic import write_json_atomic
from transferkit.runtime.outputs import building
from transferkit.runtime.params import validate
from transferkit.surgery.fc_to_conv import FullyConvNet, fc_to_conv, probe_head, probe_to_conv, timm_head_ops
from transferkit.surgery.params import DEFAULT_HEATMAPS, DENSE

log = logging.getLogger(__name__)

# 3: a probe's layer by name ('layer'); formats 1-2 stored its index into timm's feature_info ('stage_index'),
# read by `_probe_layer`. 2: pools named as in timm (format 1's 'avgmax' is 'catavgmax')
FORMAT = "transferkit.convert/3"
FORMAT_2 = "transferkit.convert/2"
FORMAT_1 = "transferkit.convert/1"
CONVERT_JSON = "convert.json"
CONVERTED_KIND, DENSE_KIND = "converted", "dense maps"  # output kinds (transferkit.runtime.outputs)
WEIGHTS = "fully_conv.safetensors"

if TYPE_CHECKING:
    from transferkit.surgery.multiscale import DenseMaps


@dataclass
class DenseClassifier:
    """A fully convolutional classifier and what is needed to feed it and name its outputs."""

    net: FullyConvNet
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    spec: dict  # architecture: rebuilds the net without the source's weights (see `_skeleton`)
    scores: str  # "logits" (softmax gives probabilities; multi-label: sigmoids) or "svm" (a probe's decision values)
    thresholds: list[float] | None = None  # multi-label: per label, on sigmoids (runs) or SVM scores (probes)
    temperature: float | None = None  # scores are divided by it before the softmax/sigmoid; None: not calibrated
    _min_size: tuple[int, int] | None = field(default=None, repr=False, compare=False)

    @property
    def multilabel(self) -> bool:
        return self.thresholds is not None

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """Probabilities from scores over dim 0: the one place dense scores become probabilities.

        Logits: softmax (multi-label: a sigmoid each). A probe's SVM margins: softmax too (multi-label: the
        sigmoid of score minus the label's threshold, so 0.5 is the threshold); uncalibrated unless a
        `temperature` is known. `probability_kind` says which, for every file and line that shows them.
        """
        t = self.temperature or 1.0
        if self.scores == "logits":
            return (scores / t).sigmoid() if self.multilabel else (scores / t).softmax(0)
        if self.multilabel:
            shift = torch.tensor(self.thresholds, dtype=scores.dtype).view(-1, *[1] * (scores.dim() - 1))
            return ((scores - shift) / t).sigmoid()
        return (scores / t).softmax(0)

    @property
    def probability_kind(self) -> str:
        """What `probabilities` are, in words: printed and plotted beside them."""
        t = "" if self.temperature is None else f" / temperature {self.temperature:.3g} (calibrated)"
        if self.scores == "logits":
            return f"sigmoid of each label's logit{t}" if self.multilabel else f"softmax of the logits{t}"
        if self.multilabel:
            return f"sigmoid of SVM score minus the label's threshold{t or ' (uncalibrated; 0.5 = threshold)'}"
        return f"softmax of the SVM margins{t or ', temperature 1 (uncalibrated)'}"

    def found(self, probabilities: torch.Tensor) -> list[int]:
        """Multi-label: the labels whose image probability reaches their threshold, most probable first."""
        cut = self.thresholds if self.scores == "logits" else [0.5] * len(self.classes)
        return [k for k in probabilities.argsort(descending=True).tolist() if probabilities[k] >= cut[k]]

    def class_indices(self, names: Sequence[str]) -> list[int]:
        """Indices of the classes `names`; an unknown name is a ParameterError on `classes`."""
        import difflib

        for name in names:
            if name not in self.classes:
                near = difflib.get_close_matches(name, self.classes, n=1)
                hint = f"did you mean {near[0]!r}? " if near else ""
                listed = ", ".join(self.classes[:5]) + (", ..." if len(self.classes) > 5 else "")
                raise ParameterError(f"The 'classes' parameter of dense_predict must name classes of this model. "
                                     f"Got {name!r} instead ({hint}{len(self.classes)} classes: {listed}).",
                                     param="classes")
        return [self.classes.index(name) for name in names]

    def min_input_size(self) -> tuple[int, int]:
        """The smallest input a resize may give: a sliding-window head's training size (each cell classifies one
        such window), else one stride of the network (one full cell), measured once at the training size."""
        if not self.net.mean_is_logits:
            return self.net.input_size
        if self._min_size is None:
            from transferkit.surgery.receptive_field import receptive_field

            _, f = receptive_field(self.net, torch.zeros(1, 3, *self.net.input_size))
            self._min_size = (math.ceil(f.y.jump), math.ceil(f.x.jump))
        return self._min_size

    def preprocess(self, image) -> torch.Tensor:
        """(1, 3, H, W) normalised tensor of a PIL image at its own size: no resize, no crop."""
        x = torch.from_numpy(np.asarray(image.convert("RGB"), np.float32) / 255).permute(2, 0, 1)
        mean, std = torch.tensor(self.mean).view(3, 1, 1), torch.tensor(self.std).view(3, 1, 1)
        return ((x - mean) / std).unsqueeze(0)

    def maps(self, image, *, scale: float | Sequence[float] | None = None,
             short_side: int | Sequence[int] | None = None) -> DenseMaps:
        """Per-cell probabilities of a PIL image at its own size, or resized by each `scale` / to each
        `short_side` and averaged (transferkit.surgery.multiscale)."""
        from transferkit.surgery.multiscale import dense_maps, plan

        source = getattr(image, "filename", "") or "<PIL image>"  # what errors call it
        steps = plan(self, (image.height, image.width), scale=scale, short_side=short_side, source=source)
        return dense_maps(self, image, steps, source)


def _imagenet_classes(n: int) -> list[str]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    if n != info.num_classes():
        return [str(i) for i in range(n)]
    return [info.index_to_description(i).split(",")[0] for i in range(n)]


def _norm(cfg: dict) -> tuple[tuple, tuple]:
    return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])


def load_classifier(source: str | Path, *, image_size: int | None = None, window: bool = False,
                    weights: str = "auto") -> DenseClassifier:
    """`source`: a converted directory, a fine-tuning run, a probe directory, or a timm model name (its own
    ImageNet head, weights resolved by `weights`). `image_size`: the training size, when the source does not
    record it (timm models: their pretrained input size)."""
    path = Path(source)
    if (path / CONVERT_JSON).is_file():
        return load_converted(path)
    if path.is_dir():
        from transferkit.probe.ensemble import refuse_ensemble
        from transferkit.probe.saved import is_probe_dir

        refuse_ensemble(path, "a dense classifier (predict --dense, convert, export)")
        return _from_probe(path, window) if is_probe_dir(path) else _from_run(path, window)
    return _from_timm(str(source), image_size, window, weights)


def _from_timm(name: str, image_size: int | None, window: bool, weights: str) -> DenseClassifier:
    import timm.data

    from transferkit.models.backbones import create_backbone

    model = create_backbone(name, weights)
    size = image_size or timm.data.resolve_model_data_config(model)["input_size"][-1]
    net = fc_to_conv(model, size, window=window)
    mean, std = _norm(model.pretrained_cfg)
    spec = {"kind": "timm", "model": name, "num_classes": model.num_classes, "input_size": size, "window": window,
            "weights_sha256": model.weights_info.sha256}
    return DenseClassifier(net, _imagenet_classes(model.num_classes), mean, std, spec, "logits")


def _from_run(path: Path, window: bool) -> DenseClassifier:
    from transferkit.finetune.rundir import load_finetuned, run_thresholds

    model, meta = load_finetuned(path)
    size = meta["transform"]["input_size"][-1]
    net = fc_to_conv(model, size, window=window)
    spec = {"kind": "run", "model": meta["config"]["model"], "num_classes": len(meta["classes"]),
            "head": meta["config"]["head"], "input_size": size, "window": window, "source": str(path)}
    mean, std = _norm(meta["transform"])
    thresholds = run_thresholds(meta).tolist() if meta.get("multilabel") else None
    return DenseClassifier(net, list(meta["classes"]), mean, std, spec, "logits", thresholds)


def _from_probe(path: Path, window: bool) -> DenseClassifier:
    from transferkit.probe.multilabel import MultiLabelProbe
    from transferkit.probe.saved import FLIP, load_probe_dir

    probe, extractor = load_probe_dir(path, batch_size=1, exact=True)
    if probe.extra_.get(FLIP):  # its weights serve one image as well; only the mirror's half of the mean is lost
        log.warning("probe '%s' was trained with flip: the network made from it scores each location once, "
                    "without the mean over the image and its mirror that predict and evaluate take", path)
    if probe.scaling in ("center_l2", "standard_l2"):  # a centre/scale before the L2 step: no conv op for it yet
        raise ModelError(f"probe '{path}' was trained with scaling '{probe.scaling}'; only probes with scaling "
                         "'standard', 'l2' or 'none' can be converted (any head)")
    arrays = probe.arrays()  # coef, intercept and the StandardScaler's statistics, as saved
    l2, multilabel = probe.scaling == "l2", isinstance(probe, MultiLabelProbe)
    ops = probe_head(arrays["coef"], arrays["intercept"], extractor.pools_[0], arrays.get("scale_mean"),
                     arrays.get("scale_scale"), l2=l2, pair=not multilabel)
    if len(extractor.pairs_) != 1:
        raise ModelError(f"probe '{path}' uses codes of several layers or pools; only one can be converted")
    layer, pool = extractor.pairs_[0]
    backbone = extractor.backbone_.cpu()
    pre_logits = layer.name == PRE_LOGITS and pool == "avg"
    if pre_logits:  # the model's own pooling path (forward_head)
        classifier = backbone.get_classifier()
        ops = [op for op in timm_head_ops(backbone) if op is not classifier] + ops[-1:]
    size = extractor.data_config_["input_size"][-1] if extractor.image_size is None else extractor.image_size
    net = probe_to_conv(backbone, layer, ops, size, window=window)
    names = probe.extra_["classes"]
    classes = [names[int(c)] for c in probe.classes_]  # score column k is label probe.classes_[k]
    spec = {"kind": "probe", "model": probe.extra_["model"], "layer": layer.name, "pool": pool, "l2": l2,
            "n_features": int(arrays["coef"].shape[1]), "n_outputs": len(classes), "input_size": size, "window": window,
            "pre_logits": pre_logits, "multilabel": multilabel, "source": str(path)}
    mean, std = _norm(extractor.data_config_)
    temperature = None if multilabel else probe.temperature_  # the probe's calibration (None: saved before it)
    return DenseClassifier(net, classes, mean, std, spec, "svm",
                           [float(t) for t in probe.thresholds_] if multilabel else None, temperature=temperature)


def save_converted(clf: DenseClassifier, out: str | Path) -> Path:
    """Write OUT/convert.json and OUT/fully_conv.safetensors (atomically)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in clf.net.state_dict().items()}
    with building(out, CONVERTED_KIND, inputs=[clf.spec.get("source")]) as tmp:
        save_file(state, str(tmp / WEIGHTS))
        write_json_atomic(tmp / CONVERT_JSON, {
            "format": FORMAT, "spec": clf.spec, "classes": clf.classes, "mean": list(clf.mean), "std": list(clf.std),
            "scores": clf.scores, "mean_is_logits": clf.net.mean_is_logits, "parity_error": clf.net.parity_error,
            "head": str(clf.net.head), "temperature": clf.temperature,
            # JSON has no infinity: a label never (always) seen in training has threshold "inf" ("-inf")
            "thresholds": None if clf.thresholds is None else [t if np.isfinite(t) else str(t) for t in clf.thresholds],
        })
    return Path(out)


def load_converted(path: str | Path) -> DenseClassifier:
    """Rebuild a converted classifier from OUT alone: the architecture from convert.json, weights from OUT."""
    from transferkit.models.weights import load_state_dict_file

    path = Path(path)
    try:
        meta = json.loads((path / CONVERT_JSON).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"'{path}' is not a converted model directory: {e}") from e
    if meta.get("format") not in (FORMAT, FORMAT_2, FORMAT_1):
        raise DataError(f"'{path / CONVERT_JSON}' has format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta["format"] == FORMAT_1 and "pool" in meta["spec"]:
        meta["spec"]["pool"] = RENAMED.get(meta["spec"]["pool"], meta["spec"]["pool"])
    net = _skeleton(meta["spec"])
    net.load_state_dict(load_state_dict_file(path / WEIGHTS))
    thresholds = meta.get("thresholds")  # absent before multi-label existed
    return DenseClassifier(net.eval(), meta["classes"], tuple(meta["mean"]), tuple(meta["std"]), meta["spec"],
                           meta["scores"], None if thresholds is None else [float(t) for t in thresholds],
                           meta.get("temperature"))  # absent before probabilities were calibrated


def _skeleton(spec: dict) -> FullyConvNet:
    """The converted architecture with untrained weights (conversion is structural: parity holds for any)."""
    import timm

    from transferkit.models.stages import replace_head

    model = timm.create_model(spec["model"], pretrained=False)
    size, window = spec["input_size"], spec["window"]
    if spec["kind"] == "timm":
        model.reset_classifier(spec["num_classes"])
        return fc_to_conv(model, size, window=window)
    if spec["kind"] == "run":
        replace_head(model, spec["num_classes"], head=spec["head"], image_size=spec["input_size"])
        return fc_to_conv(model, size, window=window)
    n_out = spec["n_outputs"]
    ops = probe_head(np.zeros((n_out, spec["n_features"])), np.zeros(n_out), spec["pool"], l2=spec["l2"],
                     pair=not spec.get("multilabel", False))
    if spec["pre_logits"]:
        classifier = model.get_classifier()
        ops = [op for op in timm_head_ops(model) if op is not classifier] + ops[-1:]
    return probe_to_conv(model, _probe_layer(model, spec), ops, size, window=window)


def _probe_layer(model: nn.Module, spec: dict) -> Layer:
    """The layer a probe was converted on: by name (format 3), or, in formats 1-2, by its index into timm's
    feature_info ('stage_index'; None: pre_logits), which is the layer named after that feature_info module."""
    if "layer" in spec:
        return resolve_layers(model, spec["layer"])[0]
    index = spec["stage_index"]
    return resolve_layers(model, PRE_LOGITS if index is None else feature_module(model, index))[0]


@torch.no_grad()
def dense_predict(clf: DenseClassifier, image_path: str | Path, out: str | Path | None = None, *, top: int = 5,
                  scale: float | Sequence[float] | None = None, short_side: int | Sequence[int] | None = None,
                  classes: Sequence[str] | None = None) -> dict:
    """Probability map of one image, at its own size or at each `scale` / `short_side` averaged; files to `out`.

    Every value shown is a probability (`clf.probability_kind` says which, and the result's 'probability'):
    per cell, and for the image (per scale the probabilities of the map's mean score, which for a pooled head is
    the network's own prediction on the whole image at that size, averaged over scales). `top` lists the most
    probable classes; a multi-label classifier also gives 'labels', every label whose image probability reaches
    its threshold. Files (transferkit.surgery.dense_files): STEM.npz, STEM-heatmap.png (a panel per class in
    `classes`, else the top ones) and STEM-classes.png (each cell coloured by its most probable class).
    """
    from transferkit.data.decode import load_image
    from transferkit.surgery.multiscale import dense_maps, plan

    validate(DENSE, {"top": top}, "dense_predict")
    chosen = clf.class_indices(list(classes or ()))  # before any work: a misspelt class is a one-line error
    image = load_image(image_path)
    steps = plan(clf, (image.height, image.width), scale=scale, short_side=short_side, source=image_path)
    maps = dense_maps(clf, image, steps, image_path)
    order = maps.image_probabilities.argsort(descending=True).tolist()

    def entry(k: int) -> dict:
        row = {"label": clf.classes[k], "probability": float(maps.image_probabilities[k])}
        if maps.mean_scores is not None:  # one scale: the map's mean raw score (the original logits or margins)
            row["mean_score"] = float(maps.mean_scores[k])
        return row

    result = {
        "source": str(image_path), "image_size": [image.height, image.width], "map_size": list(maps.field.shape),
        "probability": clf.probability_kind, "top": [entry(k) for k in order[:top]],
        "field": maps.field.to_dict(), "mean_is_logits": clf.net.mean_is_logits,
        "train_size": list(clf.net.input_size),
        "scales": [{"input_size": list(s.size), "map_size": list(m), **({s.param: s.value} if s.param else {})}
                   for s, m in zip(maps.steps, maps.map_sizes)],
    }
    if clf.multilabel:
        found = clf.found(maps.image_probabilities)
        result["labels"] = [entry(k) for k in found]
        order = found + [k for k in order if k not in found]
    if out is not None:
        from transferkit.surgery.dense_files import write_maps

        n = 1 if len(clf.classes) == 2 and not clf.multilabel else DEFAULT_HEATMAPS  # binary: p and 1 - p
        result["files"] = write_maps(clf, image, image_path, out, maps, chosen or order[:n])
    return result
