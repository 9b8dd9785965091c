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

import paddle
import paddle.distributed as dist

BUCKET_BYTES = 32 << 20


class GradientSync:
    """Average every parameter's gradient over all ranks, in a few flat all-reduces."""

    def __init__(self, parameters, world_size: int, bucket_bytes: int = BUCKET_BYTES):
        self.world_size = world_size
        self.params = [p for p in parameters if not p.stop_gradient]
        self.buckets: List[list] = []
        size = 0
        for p in self.params:
            nbytes = p.numel().item() * p.element_size()
            if not self.buckets or size + nbytes > bucket_bytes:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += nbytes

    @paddle.no_grad()
    def __call__(self) -> None:
        scale = 1.0 / self.world_size
        for bucket in self.buckets:
            grads = [p.grad if p.grad is not None else paddle.zeros_like(p) for p in bucket]
            flat = paddle.concat([g.reshape([-1]) for g in grads])
            dist.all_reduce(flat)
            flat = flat * scale
            offset = 0
            for p, g in zip(bucket, grads):
                if p.grad is not None:
                    p.grad.set_value(flat[offset:offset + g.size].reshape(g.shape))
                offset += g.size


@paddle.no_grad()
def broadcast_parameters(layer: paddle.nn.Layer) -> None:
    """Make every rank start from rank 0's parameters and buffers (DataParallel does this too)."""
    for tensor in layer.state_dict().values():
        dist.broadcast(tensor, src=0)
