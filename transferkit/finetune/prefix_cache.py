"""Frozen-prefix cache: run the frozen stages once per image, then train the rest on their output.

With --freeze-until and no augmentation the frozen part (in eval mode) maps an image to the same
activation every epoch, so it is computed once and kept in memory, or in a memory-mapped file in
the run directory when it is larger than `memory_gb`. Training then starts at the first trainable
unit. The split is checked numerically against the whole model before it is used.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from transferkit.runtime.progress import progress_bar

log = logging.getLogger(__name__)

SEQUENCES = ("blocks", "stages", "layers", "features")  # children whose own children run in order


def units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's top-level children in call order, with block sequences opened one level."""
    out = []
    for name, child in model.named_children():
        if name in SEQUENCES and isinstance(child, nn.Sequential):
            out.extend((f"{name}.{n}", c) for n, c in child.named_children())
        else:
            out.append((name, child))
    return out


def frozen_prefix(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The leading units with no trainable parameter (parameter-free units ride along)."""
    prefix = []
    for name, unit in units(model):
        if any(p.requires_grad for p in unit.parameters()):
            break
        prefix.append((name, unit))
    while prefix and not any(True for _ in prefix[-1][1].parameters()):
        prefix.pop()  # a trailing pool/activation belongs to what trains next
    return prefix


@contextlib.contextmanager
def bypassed(modules: list[nn.Module]) -> Iterator[None]:
    """Within the block, `modules` pass their input through: the model then starts after them."""
    for m in modules:
        m.forward = _identity
    try:
        yield
    finally:
        for m in modules:
            del m.forward


def _identity(x):
    return x


class PrefixCache:
    """Activations of the frozen prefix for one dataset, rows in dataset order."""

    def __init__(self, model: nn.Module, prefix: list[tuple[str, nn.Module]]):
        self.model, self.prefix = model, prefix
        self.names = [n for n, _ in prefix]
        self.run = nn.Sequential(*(m for _, m in prefix))

    @torch.no_grad()
    def check(self, x: torch.Tensor, atol: float = 1e-4) -> float:
        """Max |whole model - (prefix then rest)| on `x`, in eval mode; raises if above `atol`."""
        was_training = self.model.training
        self.model.eval()
        try:
            whole, head = self.model(x), self.run(x)
            with bypassed([m for _, m in self.prefix]):
                split = self.model(head)
        finally:
            self.model.train(was_training)
        err = (whole - split).abs().max().item()
        if not err <= atol:
            raise ValueError(f"prefix {self.names[0]}..{self.names[-1]} does not compose (max error {err:.3g})")
        return err

    @torch.no_grad()
    def compute(self, loader, n: int, path: Path | None, memory_gb: float, device: torch.device,
                progress: bool = False) -> torch.Tensor:
        """Run the prefix over `loader` (yielding (x, y, idx, bad)); a tensor, memory-mapped when large."""
        self.run.eval()
        out = None
        for x, _, idx, _ in progress_bar(loader, desc="frozen prefix", enabled=progress, leave=False):
            a = self.run(x.to(device, memory_format=torch.channels_last)).float().cpu()
            if out is None:
                out = self._allocate((n, *a.shape[1:]), path, memory_gb)
            out[idx] = a.contiguous()
        return out

    @staticmethod
    def _allocate(shape: tuple[int, ...], path: Path | None, memory_gb: float) -> torch.Tensor:
        size = int(np.prod(shape)) * 4
        if path is None or size <= memory_gb * 2**30:
            log.info("frozen-prefix cache: %s floats in memory (%.1f MB)", shape, size / 2**20)
            return torch.empty(shape)
        log.info("frozen-prefix cache: %s floats memory-mapped at '%s' (%.1f MB)", shape, path, size / 2**20)
        return torch.from_numpy(np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape))


class CachedDataset(torch.utils.data.Dataset):
    """(activation, target, index) rows of a PrefixCache, shaped like the image datasets' items."""

    def __init__(self, activations: torch.Tensor, targets: np.ndarray):
        self.activations, self.targets = activations, np.asarray(targets)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.activations[i], self.targets[i] if self.targets.ndim == 2 else int(self.targets[i]), i


def collate_cached(batch):
    """Same 4-tuple as data.collate (x, y, idx, bad) so one training loop serves both."""
    x = torch.stack([b[0] for b in batch])
    y = torch.as_tensor(np.asarray([b[1] for b in batch], dtype=np.int64))  # (B,) or (B, classes): multi-label
    idx = torch.tensor([b[2] for b in batch])
    return x, y, idx, []
