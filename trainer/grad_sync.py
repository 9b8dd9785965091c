"""Data-parallel gradient averaging from Python, so a dead peer is an exception, not an abort.

``paddle.DataParallel`` all-reduces gradients inside backward, on a C++ thread. When a
peer dies there, gloo throws ``gloo::TimeoutException`` through C++ and the survivor
aborts (SIGABRT) with no chance to save anything (measured; see the README). Doing the
all-reduce here, after ``backward()``, turns the same failure into a ``RuntimeError``
on the training thread: the survivor still holds the last completed step and can write
an emergency snapshot.

The cost is the overlap of communication with backward that DataParallel has. On CPU
with gloo that overlap is small; on GPUs it can matter, so ``train.grad_sync:
dataparallel`` keeps Paddle's own path (``auto`` picks it on GPU).
"""
from __future__ import annotations

from typing import List

import numpy as np
import paddle
import paddle.distributed as dist

BUCKET_BYTES = 32 << 20


class GradientSync:
    """Average every parameter's gradient over all ranks, in a few flat all-reduces.

    Sizes and shapes are worked out once; each step is concat, all-reduce, scale in
    place, one split, and a copy back into each gradient.
    """

    def __init__(self, parameters, world_size: int, bucket_bytes: int = BUCKET_BYTES):
        self.scale = 1.0 / world_size
        self.buckets: List[list] = []
        size = 0
        for p in parameters:
            if p.stop_gradient:
                continue
            nbytes = int(np.prod(p.shape)) * p.element_size()
            if not self.buckets or size + nbytes > bucket_bytes:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += nbytes
        self.sizes = [[int(np.prod(p.shape)) for p in bucket] for bucket in self.buckets]

    @paddle.no_grad()
    def __call__(self) -> None:
        for bucket, sizes in zip(self.buckets, self.sizes):
            grads = [p.grad if p.grad is not None else paddle.zeros_like(p) for p in bucket]
            flat = paddle.concat([g.reshape([-1]) for g in grads])
            dist.all_reduce(flat)
            flat.scale_(self.scale)
            for p, piece in zip(bucket, paddle.split(flat, sizes)):
                if p.grad is not None:
                    p.grad.set_value(piece.reshape(p.grad.shape))


@paddle.no_grad()
def broadcast_parameters(layer: paddle.nn.Layer) -> None:
    """Make every rank start from rank 0's parameters and buffers (DataParallel does this too)."""
    for tensor in layer.state_dict().values():
        dist.broadcast(tensor, src=0)
