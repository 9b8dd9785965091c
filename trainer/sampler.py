"""A distributed batch sampler that can start in the middle of an epoch.

Paddle's ``DistributedBatchSampler`` shuffles with ``RandomState(epoch)`` only and
cannot resume mid-epoch (docs/paddle-behaviour.md#data-order). Here the *global* order of an epoch
depends only on ``(seed, epoch)``; global batch ``b`` is a fixed slice of that
order, and rank ``r`` takes its ``r``-th equal share of every global batch. So
the samples a step sees do not depend on when the process started, and a resumed
worker only needs ``(epoch, batch)`` to continue exactly where training stopped.

Paddle-free: used as ``batch_sampler`` of a ``paddle.io.DataLoader``.
"""
from __future__ import annotations

from typing import Iterator, List

import numpy as np


class ResumableBatchSampler:
    """Yields this rank's index lists for one epoch, starting at ``start_batch``.

    The last, partial global batch (``drop_last=False``) is padded to a multiple of
    ``world_size`` with samples from the start of the epoch's order, as Paddle does,
    so every rank runs the same number of steps; each sample is seen at least once.
    """

    def __init__(self, dataset_size: int, global_batch_size: int, world_size: int, rank: int,
                 seed: int, shuffle: bool = True, drop_last: bool = False):
        if global_batch_size % world_size:
            raise ValueError(f"train.global_batch_size={global_batch_size} is not divisible by "
                             f"the {world_size} workers; pick a multiple of {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        if dataset_size < global_batch_size and drop_last:
            raise ValueError(f"the dataset has {dataset_size} samples, fewer than one global "
                             f"batch of {global_batch_size}, and drop_last is set")
        self.dataset_size = dataset_size
        self.global_batch_size = global_batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.dataset_size, self.global_batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside [0, {self.batches_per_epoch}]")
        self.epoch, self.start_batch = epoch, start_batch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The global order of sample indices in ``epoch`` (the same on every rank)."""
        if not self.shuffle:
            return np.arange(self.dataset_size)
        return np.random.default_rng([self.seed, epoch]).permutation(self.dataset_size)

    def global_batch(self, order: np.ndarray, batch: int) -> np.ndarray:
        begin = batch * self.global_batch_size
        chunk = order[begin:begin + self.global_batch_size]
        short = -len(chunk) % self.world_size
        if short:  # pad the last batch so that it splits evenly among the ranks
            chunk = np.concatenate([chunk, np.resize(order, short)])
        return chunk

    def __iter__(self) -> Iterator[List[int]]:
        order = self.epoch_order(self.epoch)
        for batch in range(self.start_batch, self.batches_per_epoch):
            chunk = self.global_batch(order, batch)
            share = len(chunk) // self.world_size
            yield chunk[self.rank * share:(self.rank + 1) * share].tolist()

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch


def shard_indices(dataset_size: int, world_size: int, rank: int) -> List[int]:
    """Rank ``rank``'s disjoint, unpadded share for evaluation (counts are summed across ranks)."""
    return list(range(rank, dataset_size, world_size))
