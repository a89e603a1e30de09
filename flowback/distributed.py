"""torchrun's environment, read in one place: which rank this process is, and its device and process group."""

from __future__ import annotations

import os

import torch


def env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) for a plain run."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def setup(device: torch.device) -> tuple[torch.device, int, int]:
    """(device, rank, world): under torchrun, this rank's own GPU (cuda:LOCAL_RANK) and the default process group
    (NCCL on GPUs, gloo on CPUs), created once; a plain run gets `device`, 0, 1."""
    rank, world, local_rank = env()
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, rank, world
