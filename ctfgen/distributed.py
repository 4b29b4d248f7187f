"""Process-group set-up for `torchrun`: the same code runs as 1 process or N.

DDP switches on only when the launcher says so (WORLD_SIZE > 1 in the environment, as torchrun
sets it); otherwise nothing distributed is touched. Gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .runtime import pick_device


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # True when setup_distributed created the process group (and must destroy it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """Number of processes the launcher started (torchrun sets WORLD_SIZE; 1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def single_process(device_name: str = "auto") -> DistInfo:
    return DistInfo(0, 1, 0, pick_device(device_name), owns_group=False)


def setup_distributed(device_name: str = "auto") -> DistInfo:
    """Read RANK/WORLD_SIZE/LOCAL_RANK, start the process group if needed and pick this rank's device."""
    world_size = env_world_size()
    if world_size <= 1:
        return single_process(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one GPU per process
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        if device.type == "cuda":
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, owns_group=owns)


def teardown_distributed(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum_(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """In-place sum over ranks when distributed; a no-op for one process."""
    if info.enabled:
        dist.all_reduce(t)
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
