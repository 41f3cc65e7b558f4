"""Dense prediction: any classifier transferkit knows (a timm ImageNet model, a fine-tuning run, a probe)
converted to a fully convolutional net, saved and reloaded, and run on whole images of any size.

A converted directory (`transferkit convert -o OUT`) holds convert.json (the source, its architecture,
classes, normalisation and the conversion's parity error) and fully_conv.safetensors (the converted weights);
it rebuilds without the source's files.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from transferkit.codes.pooling import RENAMED
from transferkit.errors import DataError, ModelError
from transferkit.models.backbones import PRE_LOGITS
from transferkit.models.layers import Layer, feature_module, resolve_layers
from transferkit.runtime.atomic import write_bytes_atomic, write_json_atomic
from transferkit.runtime.outputs import building, claim
from transferkit.surgery.fc_to_conv import FullyConvNet, fc_to_conv, probe_head, probe_to_conv, timm_head_ops

# 3: a probe's layer by name ('layer'); formats 1-2 stored its index into timm's feature_info ('stage_index'),
# read by `_probe_layer`. 2: pools named as in timm (format 1's 'avgmax' is 'catavgmax')
FORMAT = "transferkit.convert/3"
FORMAT_2 = "transferkit.convert/2"
FORMAT_1 = "transferkit.convert/1"
CONVERT_JSON = "convert.json"
CONVERTED_KIND, DENSE_KIND = "converted", "dense maps"  # output kinds (transferkit.runtime.outputs)
WEIGHTS = "fully_conv.safetensors"


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

    @property
    def multilabel(self) -> bool:
        return self.thresholds is not None

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor | None:
        """Probabilities from logits over dim 0 (softmax; multi-label: a sigmoid each), None for SVM scores."""
        if self.scores != "logits":
            return None
        return scores.sigmoid() if self.multilabel else scores.softmax(0)

    def preprocess(self, image) -> torch.Tensor:
        """(1, 3, H, W) normalised tensor of a PIL image at its own size: no resize, no crop."""
        x = torch.from_numpy(np.asarray(image.convert("RGB"), np.float32) / 255).permute(2, 0, 1)
        mean, std = torch.tensor(self.mean).view(3, 1, 1), torch.tensor(self.std).view(3, 1, 1)
        return ((x - mean) / std).unsqueeze(0)


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
        from transferkit.probe.saved import is_probe_dir

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
    from transferkit.probe.saved import load_probe_dir

    probe, extractor = load_probe_dir(path, batch_size=1, exact=True)
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
    return DenseClassifier(net, classes, mean, std, spec, "svm",
                           [float(t) for t in probe.thresholds_] if multilabel else None)


def save_converted(clf: DenseClassifier, out: str | Path) -> Path:
    """Write OUT/convert.json and OUT/fully_conv.safetensors (atomically)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in clf.net.state_dict().items()}
    with building(out, CONVERTED_KIND, inputs=[clf.spec.get("source")]) as tmp:
        save_file(state, str(tmp / WEIGHTS))
        write_json_atomic(tmp / CONVERT_JSON, {
            "format": FORMAT, "spec": clf.spec, "classes": clf.classes, "mean": list(clf.mean), "std": list(clf.std),
            "scores": clf.scores, "mean_is_logits": clf.net.mean_is_logits, "parity_error": clf.net.parity_error,
            "head": str(clf.net.head),
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
                           meta["scores"], None if thresholds is None else [float(t) for t in thresholds])


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
def dense_predict(clf: DenseClassifier, image_path: str | Path, out: str | Path | None = None, *,
                  top: int = 5) -> dict:
    """Score map of one image at its own size, with each cell's receptive field; files to `out` if given.

    Writes STEM.npz (scores (K, h, w), top class per cell, cell centres and boxes in input pixels) and
    STEM-heatmap.png (the image under the map of the class that wins on average). A multi-label classifier
    also gives 'labels': every label whose image score (the map's mean; for a run, its sigmoid) reaches the
    label's threshold, as `transferkit predict` lists them; its heat map shows the highest of those.
    """
    from transferkit.data.decode import load_image
    from transferkit.surgery.receptive_field import receptive_field

    image = load_image(image_path)
    x = clf.preprocess(image)
    min_h, min_w = clf.net.input_size if not clf.net.mean_is_logits else (1, 1)
    if x.shape[-2] < min_h or x.shape[-1] < min_w:
        raise DataError(f"image '{image_path}' is {x.shape[-1]}x{x.shape[-2]}; this network's head needs at least "
                        f"{min_w}x{min_h} (the size it was converted at)")
    try:
        scores, field = receptive_field(clf.net, x)
    except RuntimeError as e:
        raise DataError(f"image '{image_path}' ({x.shape[-1]}x{x.shape[-2]}) is too small for this network: "
                        f"{str(e).splitlines()[0]}") from e
    scores = scores[0].float()  # (K, h, w)
    if scores.shape[0] != len(clf.classes):
        raise ModelError(f"the network gives {scores.shape[0]} scores for {len(clf.classes)} classes")
    probs = clf.probabilities(scores)
    cell = scores.argmax(0)  # (h, w)
    overall = scores.mean((1, 2))  # the original logits where mean_is_logits holds
    order = overall.argsort(descending=True)[:top].tolist()
    result = {
        "source": str(image_path), "image_size": [image.height, image.width], "map_size": list(cell.shape),
        "top": [{"label": clf.classes[k], "score": float(overall[k])} for k in order],
        "field": field.to_dict(), "mean_is_logits": clf.net.mean_is_logits,
    }
    if clf.multilabel:
        image_scores = clf.probabilities(overall) if probs is not None else overall
        found = [k for k in image_scores.argsort(descending=True).tolist() if image_scores[k] >= clf.thresholds[k]]
        result["labels"] = [{"label": clf.classes[k], "score": float(image_scores[k])} for k in found]
        order = found + [k for k in order if k not in found]
    if out is not None:
        result["files"] = _write_maps(clf, image, image_path, out, scores, probs, cell, field, order[0])
    return result


def _write_maps(clf: DenseClassifier, image, image_path: str | Path, out: str | Path, scores: torch.Tensor,
                probs: torch.Tensor | None, cell: torch.Tensor, field, winner: int) -> list[str]:
    """STEM.npz (every map) and STEM-heatmap.png (the map of class `winner` over the image) into `out`."""
    out = claim(out, DENSE_KIND, inputs=[image_path])  # never into the images' folder
    stem = Path(image_path).stem
    arrays = {"scores": scores.numpy(), "top_class": cell.numpy(), "centres": field.centres().numpy(),
              "boxes": field.boxes().numpy(), "boxes_clipped": field.boxes(clip=True).numpy(),
              "classes": np.array(clf.classes)}
    if probs is not None:
        arrays["probabilities"] = probs.numpy()
    if clf.multilabel:
        arrays["thresholds"] = np.asarray(clf.thresholds)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    write_bytes_atomic(out / f"{stem}.npz", buffer.getvalue())
    from transferkit.plots import plot_heatmap

    heat = (probs if probs is not None else scores)[winner].numpy()
    plot_heatmap(np.asarray(image), heat, field, out / f"{stem}-heatmap.png",
                 title=f"{clf.classes[winner]} ({'probability' if probs is not None else 'SVM score'} per cell)")
    return [str(out / f"{stem}.npz"), str(out / f"{stem}-heatmap.png")]
