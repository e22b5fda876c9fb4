"""The trainer's batch samplers: training batches that do not depend on the number of processes,
and evaluation batches over one process's shard of a split."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from .config import ConfigError

__all__ = ["GlobalBatchSampler", "ShardSampler"]


class GlobalBatchSampler(Sampler[list[int]]):
    """Batches of one epoch, identical for any number of processes.

    The epoch's permutation depends only on ``(seed, epoch)``.  It is cut into global batches of
    ``global_batch`` indices (the incomplete last one is dropped), and process ``rank`` of
    ``world_size`` takes the ``rank``-th equal slice of each.  DDP averages gradients over
    processes, so the update equals that of one process on the whole global batch.
    ``start_batch`` skips the batches already consumed before a resume.
    """

    def __init__(
        self,
        num_examples: int,
        global_batch: int,
        *,
        seed: int,
        epoch: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
        num_batches: int | None = None,
    ) -> None:
        if global_batch % world_size:
            raise ConfigError(
                f"data.batch_size={global_batch} is not divisible by the {world_size} processes"
            )
        self.num_examples = num_examples
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        self.rank, self.world_size = rank, world_size
        full = num_examples // global_batch
        self.num_batches = full if num_batches is None else min(num_batches, full)
        self.start_batch = start_batch

    def __len__(self) -> int:
        return max(self.num_batches - self.start_batch, 0)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_examples, generator=generator)
        else:
            order = torch.arange(self.num_examples)
        for b in range(self.start_batch, self.num_batches):
            lo = b * self.global_batch + self.rank * self.local_batch
            yield order[lo : lo + self.local_batch].tolist()


class ShardSampler(Sampler[list[int]]):
    """Evaluation batches over this process's contiguous shard of a split (nothing dropped)."""

    def __init__(self, num_examples: int, batch_size: int, rank: int, world_size: int) -> None:
        per = math.ceil(num_examples / world_size)
        self.lo, self.hi = min(rank * per, num_examples), min((rank + 1) * per, num_examples)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil((self.hi - self.lo) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for lo in range(self.lo, self.hi, self.batch_size):
            yield list(range(lo, min(lo + self.batch_size, self.hi)))
