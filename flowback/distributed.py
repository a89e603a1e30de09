"""torchrun's environment, read in one place: which rank this process is, and its device and process group."""

from __future__ import annotations

import datetime
import os

import torch

# Collectives wait at most this long for a slow rank (a checkpoint being written, a shard being verified) before
# the job fails with a clear timeout instead of hanging; NCCL's default is 10 minutes.
TIMEOUT = datetime.timedelta(minutes=30)


def env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) for a plain run."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def setup(device: torch.device) -> tuple[torch.device, int, int]:
    """(device, rank, world): under torchrun, this rank's own GPU (cuda:LOCAL_RANK) and the default process group
    (NCCL bound to that GPU, or gloo on CPUs), created once; a plain run gets `device`, 0, 1."""
    rank, world, local_rank = env()
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not torch.distributed.is_initialized():
            if device.type == "cuda":
                torch.distributed.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
            else:
                torch.distributed.init_process_group("gloo", timeout=TIMEOUT)
    return device, rank, world


def broadcast_int(value: int, device: torch.device) -> int:
    """Rank 0's `value` on every rank (a plain run returns it unchanged)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    torch.distributed.broadcast(t, src=0)
    return int(t.item())


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
