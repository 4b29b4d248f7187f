"""Batches that depend only on (seed, step): resuming at step s replays exactly what s would see."""

from __future__ import annotations

import torch

from ..errors import CtfgenError


def batch_indices(n: int, batch_size: int, seed: int, step: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Indices of this rank's share of the global batch number `step`.

    Each epoch is a fresh permutation seeded by (seed, epoch); the last incomplete
    global batch of an epoch is dropped so every batch has the same size.
    """
    global_batch = batch_size * world_size
    if n < global_batch:
        raise CtfgenError(f"dataset of {n} items is smaller than the global batch of {global_batch}")
    per_epoch = n // global_batch
    epoch, pos = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    start = pos * global_batch + rank * batch_size
    return perm[start:start + batch_size]


class StepBatches:
    """A DataLoader batch sampler over global steps [start, stop) built on `batch_indices`."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int, rank: int = 0, world_size: int = 1):
        self.args = (n, batch_size, seed)
        self.start, self.stop, self.rank, self.world_size = start, stop, rank, world_size

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield batch_indices(*self.args, step, self.rank, self.world_size).tolist()
