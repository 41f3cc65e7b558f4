"""Several processes under torchrun: process group, per-rank data shards, reductions.

`transferkit finetune` runs unchanged under ``torchrun --nproc-per-node N``: each rank trains
DistributedDataParallel on its shard of every epoch (DistributedSampler), gradients are averaged,
and only rank 0 writes files. `--batch-size` is per process, so the global batch is N times it and
an epoch has floor(ceil(n_train / N) / batch_size) optimizer steps (one step when that is 0).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's place: rank 0 of 1 when not launched by torchrun."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    owner: bool = False  # this World opened the process group, so closing it is its job (close_world)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world(device: torch.device) -> World:
    """Join torchrun's process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    owner = not dist.is_initialized()  # a group the caller opened is the caller's to close
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")), owner)
    if owner:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))  # N processes share the cores
    log.info("rank %d of %d (%s)", world.rank, world.size, dist.get_backend())
    return world


def close_world(world: World) -> None:
    """Close the process group `init_world` opened (one opened by the caller stays open)."""
    if world.owner and dist.is_initialized():
        dist.destroy_process_group()


def sum_all(world: World, *values: float) -> list[float]:
    """Element-wise sum of `values` over all ranks (identity for one process)."""
    if not world.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def all_true(world: World, flag: bool) -> bool:
    """True on every rank iff `flag` is true on every rank: one rank's NaN stops them all."""
    if not world.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def steps_per_epoch(n_train: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps in one epoch, as documented above (the loader drops an incomplete last batch)."""
    per_rank = -(-n_train // world_size)
    return max(1, per_rank // batch_size) if per_rank > batch_size else 1


class ShardSampler(torch.utils.data.Sampler):
    """Every `size`-th index from `rank`, in order, no padding: evaluation sees each image once overall."""

    def __init__(self, n: int, world: World):
        self.indices = range(world.rank, n, world.size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
