"""transferkit: transfer learning from pretrained CNNs (CNN codes, linear-SVM probes, layer sweeps).

The public names below load on first use, so `transferkit --help` does not import torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {  # public name -> the module (under transferkit) that defines it
    "create_backbone": "models.backbones",
    "layer_table": "models.layers",
    "model_layers": "models.layers",
    "ImageDataset": "data.datasets",
    "load_image": "data.datasets",
    "open_dataset": "data.datasets",
    "DataError": "errors",
    "ModelError": "errors",
    "TransferkitError": "errors",
    "WeightsError": "errors",
    "FeatureExtractor": "codes.extractor",
    "extract": "codes.extract",
    "FeatureStore": "codes.store",
    "LinearProbe": "probe.linear",
    "MultiLabelProbe": "probe.multilabel",
    "evaluate": "probe.metrics",
    "sweep": "probe.sweep",
    "FinetuneConfig": "finetune.config",
    "freeze_until": "finetune.loop",
    "list_stages": "finetune.loop",
    "load_finetuned": "finetune.rundir",
    "resume_run": "finetune.resume",
    "Recipe": "recipes.recipe",
    "audit": "auditing.run",
    "neighbors": "auditing.retrieval",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"transferkit.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'transferkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
