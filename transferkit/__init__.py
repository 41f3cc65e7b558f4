"""transferkit: transfer learning from pretrained CNNs (CNN codes, linear-SVM probes, layer sweeps).

The public names below load on first use, so `transferkit --help` does not import torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "create_backbone": "backbones",
    "layer_table": "backbones",
    "model_layers": "backbones",
    "ImageDataset": "data",
    "load_image": "data",
    "open_dataset": "data",
    "DataError": "errors",
    "ModelError": "errors",
    "TransferkitError": "errors",
    "WeightsError": "errors",
    "FeatureExtractor": "features",
    "extract": "features",
    "LinearProbe": "probe",
    "evaluate": "probe",
    "sweep": "probe",
    "Recipe": "recipes",
    "FeatureStore": "store",
    "FinetuneConfig": "finetune",
    "freeze_until": "finetune",
    "list_stages": "finetune",
    "load_finetuned": "finetune",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"transferkit.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'transferkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
