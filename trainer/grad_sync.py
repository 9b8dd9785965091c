"""Data-parallel gradient averaging from Python, so a dead peer is an exception, not an abort.

``paddle.DataParallel`` all-reduces gradients inside backward, on a C++ thread. When a
peer dies there, gloo throws ``gloo::TimeoutException`` through C++ and the survivor
aborts (SIGABRT) with no chance to save anything (measured;
docs/paddle-behaviour.md#peer-failures). Doing the
all-reduce here, after ``backward()``, turns the same failure into a ``RuntimeError``
on the training thread: the survivor still holds the last completed step and can write
an emergency snapshot.

The cost is the overlap of communication with backward that DataParallel has. On CPU
with gloo that overlap is small; on GPUs it can matter, so ``train.grad_sync:
dataparallel`` keeps Paddle's own path (``auto`` picks it on GPU).
"""
from __future__ import annotations

import ctypes
from typing import Dict, List, Optional, Tuple

import numpy as np
import paddle
import paddle.distributed as dist

from paddlerun.trainer import shm_reduce
from paddlerun.trainer.host_copy import numpy_dtype

BUCKET_BYTES = 32 << 20
#: Slots after the first bucket's gradients for a few numbers of the caller's that need
#: summing over the ranks too (the loop's metrics and flags at a log step): one
#: all-reduce instead of two. Zeros when unused.
EXTRA_SLOTS = 8


class GradientSync:
    """Average every parameter's gradient over all ranks, in a few flat all-reduces.

    Sizes and shapes are worked out once; each step is gather into one flat tensor per
    bucket, all-reduce, scale in place, and a copy back into each gradient.

    On CPU the gather and the copy back are one ``memmove`` per gradient, between its
    data pointer and its piece of a flat tensor kept from step to step. Measured for
    LeNet's 10 gradients (one process, idle machine): Paddle ops (reshape, concat,
    split, set_value per parameter) ~450 us a step; numpy copies through DLPack views
    ~100 us, 57 of them making the views (Paddle's ``__dlpack__`` is Python); this ~30 us.
    The scale is the same Paddle op on every path; the sum is gloo's or, when every
    rank is on this host, :mod:`.shm_reduce`'s, in rank order: for 2 ranks the same bits
    either way (``a + b``), for more possibly not, but the same on every rank and in every
    run. Gradients in GPU memory, of mixed dtypes or of a dtype numpy lacks (bfloat16)
    take the Paddle-op path.
    """

    def __init__(self, parameters, world_size: int, bucket_bytes: int = BUCKET_BYTES,
                 host_sum: Optional[shm_reduce.SharedMemorySum] = None):
        self.scale = 1.0 / world_size
        self.host_sum = host_sum
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
        # Gradients live where their parameters do. Only host memory may be copied by
        # address (for GPU memory, a pointer is a device address).
        self.on_host = all(p.place.is_cpu_place() for bucket in self.buckets for p in bucket)
        # bucket -> its dtype if it can be copied by address, else None
        self._host_dtype = [_host_dtype(bucket) if self.on_host else None for bucket in self.buckets]
        # bucket -> (flat tensor, its numpy view, one view of it per parameter, their addresses)
        self._flat: Dict[int, Tuple[paddle.Tensor, np.ndarray, List[np.ndarray], List[int]]] = {}

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
            grads = [p.grad for p in bucket]
            first = extra if i == 0 else None
            if self._host_dtype[i] is not None and _copyable(grads, bucket[0].dtype):
                carried = self._sync_in_host_memory(i, grads, sizes, first)
            else:
                carried = self._sync_with_paddle_ops(i, bucket, sizes, first)
            if i == 0:
                summed = carried
        if extra is not None and summed is None:  # gradients of a dtype too coarse to carry them
            summed = all_reduce_sums(extra)
        return summed

    def _sync_in_host_memory(self, i: int, grads: list, sizes: List[int],
                             extra: Optional[List[float]]) -> Optional[List[float]]:
        dtype = self._host_dtype[i]
        if i not in self._flat:
            # The first bucket has room for the caller's extra numbers; every rank
            # allocates the same, so the all-reduces always match.
            slots = EXTRA_SLOTS if i == 0 else 0
            flat = paddle.zeros([sum(sizes) + slots], dtype=dtype.name)
            whole = np.from_dlpack(flat)
            pieces = np.split(whole, np.cumsum(sizes))
            self._flat[i] = (flat, whole, pieces, [piece.ctypes.data for piece in pieces])
        flat, whole, pieces, addresses = self._flat[i]
        tail = pieces[-1]  # the extra slots (empty but for the first bucket)
        carry = _carries(extra, dtype)
        if tail.size:
            tail[:] = _slots(extra if carry else None)
        for g, piece, address in zip(grads, pieces, addresses):
            if g is None:  # a parameter with no gradient this step counts as zeros
                piece.fill(0)
            else:
                ctypes.memmove(address, g.data_ptr(), piece.nbytes)
        if self.host_sum is not None:
            self.host_sum.all_reduce(whole)
        else:
            dist.all_reduce(flat)  # in place: the pieces see the sum
        summed = tail[:len(extra)].tolist() if carry else None
        flat.scale_(self.scale)
        for g, piece, address in zip(grads, pieces, addresses):
            if g is not None:
                ctypes.memmove(g.data_ptr(), address, piece.nbytes)
        return summed

    def _sync_with_paddle_ops(self, i: int, bucket, sizes: List[int],
                              extra: Optional[List[float]]) -> Optional[List[float]]:
        grads = [p.grad if p.grad is not None else paddle.zeros_like(p) for p in bucket]
        pieces = [g.reshape([-1]) for g in grads]
        carry = _carries(extra, numpy_dtype(grads[0].dtype))
        if i == 0:  # the same room for extra numbers as the host path: sizes must match
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


def _host_dtype(bucket) -> Optional[np.dtype]:
    """The numpy dtype of a bucket whose gradients can be copied by address: one dtype
    that numpy has (not bfloat16). None otherwise."""
    dtypes = {p.dtype for p in bucket}
    if len(dtypes) != 1:
        return None
    dtype = numpy_dtype(bucket[0].dtype)
    return dtype if dtype.kind == "f" else None


def _copyable(grads, dtype) -> bool:
    """Whether this step's gradients are dense and of their parameters' ``dtype``: each
    is made afresh by backward (measured), so this is checked every step. A missing
    gradient (None) counts as zeros."""
    for g in grads:
        if g is None:
            continue
        # ``is`` first: Paddle's dtypes are singletons, and its ``==`` costs 0.8 us.
        if not (g.dtype is dtype or g.dtype == dtype) or not g.is_contiguous():
            return False
    return True


def connect_host_sum(rank: int, world_size: int) -> Tuple[Optional[shm_reduce.SharedMemorySum], str]:
    """A :class:`~paddlerun.trainer.shm_reduce.SharedMemorySum` for the whole world if
    every rank can map rank 0's segment (they all run on this host, in one pid
    namespace), else None on every rank: the gradient sync then uses gloo. Also says why
    not, as far as this rank knows. A collective: every rank calls it."""
    mine, why = None, shm_reduce.unsupported_reason(world_size)
    name = np.zeros(256, dtype=np.uint8)
    try:
        if rank == 0 and why is None:
            try:
                mine = shm_reduce.SharedMemorySum.create(world_size)
                encoded = f"{mine.path}|{mine.token.hex()}".encode()
                name[:len(encoded)] = np.frombuffer(encoded, dtype=np.uint8)
            except OSError as e:
                why = f"rank 0 could not make the segment: {e}"
        shared = paddle.to_tensor(name)
        dist.broadcast(shared, src=0)
        text = bytes(shared.numpy()).rstrip(b"\0").decode()
        if rank != 0 and why is None:
            if not text:
                why = "rank 0 could not make the segment"
            else:
                path, token = text.split("|")
                try:
                    mine = shm_reduce.SharedMemorySum.attach(path, rank, world_size, bytes.fromhex(token))
                except (OSError, RuntimeError) as e:  # another host, container or pid namespace
                    why = f"rank {rank} could not map it: {e}"
        everyone = paddle.to_tensor([0 if mine is None else 1], dtype="int32")
        dist.all_reduce(everyone, op=dist.ReduceOp.MIN)  # also: every rank has mapped it or given up
    finally:  # nothing may still open it now
        if mine is not None:
            mine.release_path()
    if int(everyone.numpy()[0]) == 1:
        mine.watch_peers()
        return mine, "shared memory"
    if mine is not None:
        mine.close()
    return None, f"gloo ({why or 'another rank could not map the shared-memory segment'})"


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
