"""torchrun support shared by ``ovseg predict`` and ``ovseg eval``: rank/world from the environment, process
group initialisation (gloo on CPU, nccl on CUDA) and gathering small Python objects on every rank."""
from __future__ import annotations

import os
from typing import Any, List, Optional, Tuple

import torch

__all__ = ["dist_info", "init_distributed", "shard", "gather_objects", "finish_distributed"]


def dist_info() -> Tuple[int, int, int]:
    """(rank, world size, local rank) from the torchrun environment (0, 1, 0 without it)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device: Optional[str]) -> Tuple[int, int, Optional[str]]:
    """Initialise torch.distributed under torchrun; returns (rank, world, device to use).

    On GPUs each process takes ``cuda:<local rank>`` (nccl); on CPU (gloo) the cores are split between the
    processes of the machine.
    """
    rank, world, local = dist_info()
    if world <= 1:
        return 0, 1, device
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = "cpu"
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return rank, world, device


def shard(n: int, rank: int, world: int) -> List[int]:
    """The indices of ``n`` items that process ``rank`` of ``world`` takes: ``rank, rank + world, ...`` (the
    shards are disjoint and cover every item once)."""
    return list(range(rank, n, world))


def gather_objects(obj: Any, world: int) -> List[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` without torchrun."""
    if world <= 1:
        return [obj]
    import torch.distributed as dist

    out: List[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def finish_distributed(world: int) -> None:
    """Destroy the process group (if this process started one)."""
    if world <= 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
