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

from typing import Dict, List, Optional, Tuple

import numpy as np
import paddle
import paddle.distributed as dist

from paddlerun.trainer.host_copy import dlpack_view, numpy_dtype

BUCKET_BYTES = 32 << 20
#: Slots after the first bucket's gradients for a few numbers of the caller's that need
#: summing over the ranks too (the loop's metrics and flags at a log step): one
#: all-reduce instead of two. Zeros when unused.
EXTRA_SLOTS = 8


class GradientSync:
    """Average every parameter's gradient over all ranks, in a few flat all-reduces.

    Sizes and shapes are worked out once; each step is gather into one flat tensor per
    bucket, all-reduce, scale in place, and a copy back into each gradient.

    On CPU the gather and the copy back are numpy copies through zero-copy DLPack views
    of the gradients and of a flat tensor kept from step to step: a LeNet step measured
    ~450 us of Paddle op dispatch (reshape, concat, split, set_value per parameter)
    against ~100 us this way. The all-reduce and the scale are the same Paddle ops
    either way, so the result is the same to the bit. Gradients in GPU memory take the
    Paddle-op path.
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
        # Gradients live where their parameters do. Only host memory may be written
        # through a numpy view (for GPU memory, DLPack could hand numpy a copy).
        self.on_host = all(p.place.is_cpu_place() for bucket in self.buckets for p in bucket)
        # bucket -> (numpy view of flat, flat tensor, one view of flat per parameter)
        self._flat: Dict[int, Tuple[np.ndarray, paddle.Tensor, List[np.ndarray]]] = {}

    @paddle.no_grad()
    def __call__(self, extra: Optional[List[float]] = None) -> Optional[List[float]]:
        """Average the gradients; with ``extra`` (at most EXTRA_SLOTS numbers, the same
        call on every rank), also return their sums over the ranks -- carried by the
        first bucket's all-reduce when it can (float32/64 gradients in host memory), else
        by one of their own in float64. The ranks must agree on when they pass ``extra``."""
        if extra is not None and len(extra) > EXTRA_SLOTS:
            raise ValueError(f"at most {EXTRA_SLOTS} extra numbers, got {len(extra)}")
        summed = None
        for i, (bucket, sizes) in enumerate(zip(self.buckets, self.sizes)):
            views = _host_views([p.grad for p in bucket]) if self.on_host else None
            first = extra if i == 0 else None
            if views is None:
                carried = self._sync_with_paddle_ops(i, bucket, sizes, first)
            else:
                carried = self._sync_through_views(i, views, sizes, first)
            if i == 0:
                summed = carried
        if extra is not None and summed is None:  # gradients of a dtype too coarse to carry them
            summed = all_reduce_sums(extra)
        return summed

    def _sync_through_views(self, i: int, views: List[Optional[np.ndarray]], sizes: List[int],
                            extra: Optional[List[float]]) -> Optional[List[float]]:
        dtype = next(v.dtype for v in views if v is not None)
        if i not in self._flat or self._flat[i][0].dtype != dtype:
            # The first bucket has room for the caller's extra numbers; every rank
            # allocates the same, so the all-reduces always match.
            slots = EXTRA_SLOTS if i == 0 else 0
            flat = paddle.zeros([sum(sizes) + slots], dtype=dtype.name)
            flat_view = np.from_dlpack(flat)
            self._flat[i] = (flat_view, flat, np.split(flat_view, np.cumsum(sizes)))
        _, flat, pieces = self._flat[i]
        tail = pieces[-1]  # the extra slots (empty but for the first bucket)
        carry = _carries(extra, dtype)
        if tail.size:
            tail[:] = _slots(extra if carry else None)
        for view, piece in zip(views, pieces):
            if view is None:  # a parameter with no gradient this step counts as zeros
                piece.fill(0)
            else:
                np.copyto(piece, view.reshape(-1))
        dist.all_reduce(flat)  # in place: the pieces see the sum
        summed = tail[:len(extra)].tolist() if carry else None
        flat.scale_(self.scale)
        for view, piece in zip(views, pieces):
            if view is not None:
                np.copyto(view, piece.reshape(view.shape))
        return summed

    def _sync_with_paddle_ops(self, i: int, bucket, sizes: List[int],
                              extra: Optional[List[float]]) -> Optional[List[float]]:
        grads = [p.grad if p.grad is not None else paddle.zeros_like(p) for p in bucket]
        pieces = [g.reshape([-1]) for g in grads]
        carry = _carries(extra, numpy_dtype(grads[0].dtype))
        if i == 0:  # the same room for extra numbers as the views path: sizes must match
            pieces.append(paddle.to_tensor(_slots(extra), dtype=grads[0].dtype, place=grads[0].place)
                          if carry else paddle.zeros([EXTRA_SLOTS], dtype=grads[0].dtype))
        flat = paddle.concat(pieces)
        dist.all_reduce(flat)
        summed = flat[-EXTRA_SLOTS:].numpy()[:len(extra)].tolist() if carry else None
        flat.scale_(self.scale)
        for p, piece in zip(bucket, paddle.split(flat, sizes + ([EXTRA_SLOTS] if i == 0 else []))):
            if p.grad is not None:
                p.grad.set_value(piece.reshape(p.grad.shape))
        return summed


def _carries(extra: Optional[List[float]], dtype: np.dtype) -> bool:
    """Whether gradients of ``dtype`` carry ``extra`` (counts exact to 2**24 in float32)."""
    return extra is not None and dtype in (np.float32, np.float64)


def _slots(extra: Optional[List[float]]) -> np.ndarray:
    slots = np.zeros(EXTRA_SLOTS)
    if extra is not None:
        slots[:len(extra)] = extra
    return slots


def _host_views(grads) -> Optional[List[Optional[np.ndarray]]]:
    """Writable zero-copy numpy views of host-memory gradients of one dtype; None otherwise.

    Made every step: backward allocates each gradient afresh (measured), so a view
    kept from the last step would point at memory the optimizer no longer reads.
    """
    views: List[Optional[np.ndarray]] = []
    for g in grads:
        if g is None:
            views.append(None)
            continue
        view = dlpack_view(g)  # on the host: GradientSync checked the parameters' place once
        if view is None or not view.flags.c_contiguous or not view.flags.writeable:
            return None
        views.append(view)
    dtypes = {v.dtype for v in views if v is not None}
    return views if len(dtypes) == 1 else None


def all_reduce_sums(values: List[float]) -> List[float]:
    """``values`` summed over the ranks, in float64."""
    sums = paddle.to_tensor(values, dtype="float64")
    dist.all_reduce(sums)
    return sums.numpy().tolist()


@paddle.no_grad()
def broadcast_parameters(layer: paddle.nn.Layer) -> None:
    """Make every rank start from rank 0's parameters and buffers (DataParallel does this too)."""
    for tensor in layer.state_dict().values():
        dist.broadcast(tensor, src=0)
