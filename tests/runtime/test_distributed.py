"""Process groups: a job closes the group it opened, and never one its caller opened."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist

from transferkit.runtime.distributed import close_world, init_world


def test_a_group_the_caller_opened_stays_open(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun
        monkeypatch.setenv("RANK", "0")
        world = init_world(torch.device("cpu"))
        assert world.distributed and not world.owner
        close_world(world)
        assert dist.is_initialized()  # the caller's group: still open
    finally:
        dist.destroy_process_group()
