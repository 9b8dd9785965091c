"""The capture copy: tensors into host buffers allocated once and reused by every snapshot.

The training thread is blocked while a snapshot's state is copied to host memory, so
this copy is the whole stall of an async save. ``Tensor.numpy()`` allocates a fresh
array each time, and the first write to fresh memory takes a page fault per 4 KB page
(the kernel maps and zeroes it). Measured on this project's 2-core machine, 630 MB of
float32: ``numpy()`` 1.7 GB/s; ``np.copyto`` from a zero-copy DLPack view into a buffer
whose pages are mapped already 5.8 GB/s; the same split over two threads (``copyto``
releases the GIL) 10.4 GB/s; four threads no faster.

The price is memory: the writer keeps one host copy of what it captures between
snapshots, as torch DCP's async save and orbax do with their staging buffers. Tensors in
GPU memory are copied the same way into reused *pinned* host tensors
(:class:`DeviceStaging`: one device-to-host copy each, queued on the tensor's stream, one
wait for all), where Paddle can pin memory; elsewhere, and for a dtype numpy cannot
import (bfloat16), with ``numpy()`` into fresh memory.

The views are kept too: Paddle's ``__dlpack__`` is Python, ~8 us a tensor (0.4 ms for
LeNet's 50 with Adam, most of its capture), while checking that a tensor still has the
view's memory, shape, strides and dtype costs ~1.7 us. A kept view holds its tensor's
memory alive, so no other tensor can have that address meanwhile. Optimizers update
in place and the check always passes; where a tensor does get new memory, views stop
being kept (they would pin the old memory until the next snapshot).
"""
from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import paddle

from paddlerun.trainer.paddle_features import features

#: Below this many bytes in all, one thread copies everything (threads cost more than they save).
PARALLEL_MIN_BYTES = 16 << 20
#: Large tensors are cut into pieces of about this size, so the threads share the work evenly.
PIECE_BYTES = 8 << 20

_Job = Tuple[np.ndarray, np.ndarray]


def copy_threads() -> int:
    """Threads for the copy: the CPUs this process may use, at most 4 (memory bandwidth bounds it)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def host_view(tensor: paddle.Tensor, writable: bool = False) -> Optional[np.ndarray]:
    """A zero-copy numpy view of a tensor in host memory; None where there is none.

    Through DLPack where Paddle has it; where it has not, or where its views are read-only
    and ``writable`` is asked for (Paddle < 3.3, :mod:`.paddle_features`), a view made from
    the tensor's data pointer (:func:`address_view`)."""
    if not tensor.place.is_cpu_place():
        return None
    found = features()
    if found.dlpack and (found.dlpack_writable or not writable):
        return dlpack_view(tensor)
    return address_view(tensor) if found.address_views else None


def dlpack_view(tensor: paddle.Tensor) -> Optional[np.ndarray]:
    """``np.from_dlpack`` of a tensor known to be in host memory (for GPU memory, DLPack may
    hand numpy a copy); None for a dtype numpy lacks (bfloat16)."""
    try:
        return np.from_dlpack(tensor.detach())
    except (BufferError, RuntimeError, TypeError, ValueError):
        return None


class _Memory:
    """What :func:`address_view` hands numpy: the tensor (numpy keeps this object as the
    view's base, so the tensor and its memory live as long as the view) and numpy's
    description of its memory."""
    __slots__ = ("tensor", "__array_interface__")

    def __init__(self, tensor: paddle.Tensor, interface: dict):
        self.tensor = tensor
        self.__array_interface__ = interface


def address_view(tensor: paddle.Tensor) -> Optional[np.ndarray]:
    """A writable numpy view of a tensor in host memory (CPU or CUDA-pinned), made from its
    data pointer, shape and strides; it keeps the tensor alive. None for a dtype numpy lacks
    (bfloat16) or a tensor that is not one dense block."""
    if tensor.dtype == paddle.bfloat16 or not tensor.is_contiguous():
        return None
    dtype = numpy_dtype(tensor.dtype)
    shape = tuple(tensor.shape)
    if int(np.prod(shape)) == 0:
        return np.empty(shape, dtype)
    interface = {"version": 3, "typestr": dtype.str, "shape": shape,
                 "data": (tensor.data_ptr(), False),  # False: not read-only
                 "strides": tuple(s * dtype.itemsize for s in tensor.strides)}
    return np.asarray(_Memory(tensor, interface))


@functools.lru_cache(maxsize=None)
def numpy_dtype(dtype) -> np.dtype:
    """The numpy dtype that ``Tensor.numpy()`` gives for a Paddle ``dtype`` (bfloat16
    becomes uint16)."""
    return np.dtype(paddle.empty([0], dtype=dtype).numpy().dtype)


class HostBuffers:
    """Copies groups of named tensors into reusable host arrays.

    The arrays returned by :meth:`copy` are overwritten by the next call: the caller
    must be done with them first (the checkpointer waits for the persist in flight
    before it captures again). Used by one thread at a time.
    """

    def __init__(self, threads: Optional[int] = None, staging: Optional["DeviceStaging"] = None):
        self.threads = threads or copy_threads()
        #: GPU tensors go through reused pinned buffers where Paddle has them.
        self.staging = staging if staging is not None else (
            DeviceStaging() if features().pinned_copy else None)
        self._buffers: Dict[Tuple[str, str], np.ndarray] = {}
        #: (group, name) -> (what the view was taken of: address, shape, strides, dtype; the view)
        self._views: Dict[Tuple[str, str], Tuple[tuple, np.ndarray]] = {}
        self.keep_views = True
        self._pool: Optional[ThreadPoolExecutor] = None

    def copy(self, groups: Mapping[str, Mapping[str, paddle.Tensor]]) -> Dict[str, Dict[str, np.ndarray]]:
        """``{group: {name: tensor}}`` -> the same shape of numpy arrays, copied now."""
        out: Dict[str, Dict[str, np.ndarray]] = {}
        jobs: List[_Job] = []
        used = set()
        staged = set()  # keys copied through self.staging
        for group, tensors in groups.items():
            arrays = out[group] = {}
            for name, tensor in tensors.items():
                key = (group, name)
                src = self._view(key, tensor)
                if src is None:
                    pinned = None
                    if self.staging is not None and not tensor.place.is_cpu_place():
                        pinned = self.staging.copy(key, tensor)
                    if pinned is None:
                        arrays[name] = tensor.numpy()
                    else:
                        arrays[name] = pinned
                        staged.add(key)
                    continue
                dst = self._buffers.get(key)
                if dst is None or dst.shape != src.shape or dst.dtype != src.dtype:
                    dst = self._buffers[key] = np.empty(src.shape, src.dtype)
                arrays[name] = dst
                jobs.append((dst, src))
                used.add(key)
        for key in set(self._buffers) - used:  # tensors no longer captured: free their buffers
            del self._buffers[key]
            self._views.pop(key, None)
        if self.staging is not None:
            self.staging.keep_only(staged)
            if staged:
                self.staging.wait()  # the device-to-host copies are done: the arrays hold the values
        self._run(jobs)
        return out

    def _view(self, key: Tuple[str, str], tensor: paddle.Tensor) -> Optional[np.ndarray]:
        """:func:`host_view` of ``tensor``: the one kept from the last capture while the
        tensor still is what it was taken of."""
        if not self.keep_views:
            return host_view(tensor)
        of = (tensor.data_ptr(), tensor.shape, tensor.strides, tensor.dtype)
        kept = self._views.get(key)
        if kept is not None:
            if kept[0] == of:
                return kept[1]
            self.keep_views = False  # this tensor moved: keeping views would pin old memory
            self._views.clear()
            return host_view(tensor)
        view = host_view(tensor)
        if view is not None:
            self._views[key] = (of, view)
        return view

    def _run(self, jobs: List[_Job]) -> None:
        total = sum(dst.nbytes for dst, _ in jobs)
        if self.threads == 1 or total < PARALLEL_MIN_BYTES:
            for dst, src in jobs:
                np.copyto(dst, src)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="paddlerun-capture")
        # Work items of about PIECE_BYTES each: large tensors cut up, small ones grouped.
        batches: List[List[_Job]] = [[]]
        size = 0
        for dst, src in jobs:
            if dst.nbytes <= PIECE_BYTES or not src.flags.c_contiguous:
                pieces = [(dst, src)]
            else:
                flat_dst, flat_src = dst.reshape(-1), src.reshape(-1)  # views: both contiguous
                step = max(1, PIECE_BYTES // dst.itemsize)
                pieces = [(flat_dst[i:i + step], flat_src[i:i + step]) for i in range(0, flat_dst.size, step)]
            for piece in pieces:
                if size >= PIECE_BYTES:
                    batches.append([])
                    size = 0
                batches[-1].append(piece)
                size += piece[0].nbytes
        for future in [self._pool.submit(_copy_all, batch) for batch in batches]:
            future.result()  # re-raises a copy's error here

    def close(self) -> None:
        if self.staging is not None:
            self.staging.keep_only(set())
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._buffers.clear()
        self._views.clear()


def _copy_all(jobs: List[_Job]) -> None:
    for dst, src in jobs:
        np.copyto(dst, src)


def _pin(tensor: paddle.Tensor) -> paddle.Tensor:
    """A copy of ``tensor`` in pinned (page-locked) host memory."""
    return tensor.pin_memory()


def _wait_for_device() -> None:
    paddle.device.synchronize()


class DeviceStaging:
    """Copies tensors in device (GPU) memory into host buffers allocated once and reused.

    The first capture of a tensor allocates its pinned copy (``Tensor.pin_memory()``);
    later ones copy into it with ``Tensor.copy_(src, blocking=False)``, which keeps the
    destination's place and memory (Paddle's ``tensor_method_copy_`` copies into ``self``'s
    place when ``self`` holds memory) and is queued on the source's stream after the step
    that made it. :meth:`wait` then waits once for all of them. The numpy arrays returned are
    views of the pinned buffers (pinned memory is host memory), overwritten by the next
    capture like :class:`HostBuffers`' own. ``allocate`` and ``synchronize`` are Paddle's
    unless a test gives its own (the same logic, run on CPU tensors).
    """

    def __init__(self, allocate=_pin, synchronize=_wait_for_device):
        self._allocate = allocate
        self._synchronize = synchronize
        #: (group, name) -> (the pinned tensor, its numpy view)
        self._buffers: Dict[Tuple[str, str], Tuple[paddle.Tensor, np.ndarray]] = {}

    def copy(self, key: Tuple[str, str], tensor: paddle.Tensor) -> Optional[np.ndarray]:
        """Queue the copy of ``tensor`` into its buffer; the buffer's view, valid after
        :meth:`wait`. None where it cannot be viewed (bfloat16): copy that one otherwise."""
        held = self._buffers.get(key)
        if held is not None and held[0].shape == tensor.shape and held[0].dtype == tensor.dtype:
            held[0].copy_(tensor, False)
            return held[1]
        buffer = self._allocate(tensor)
        view = address_view(buffer)
        if view is None:
            self._buffers.pop(key, None)
            return None
        self._buffers[key] = (buffer, view)
        return view

    def wait(self) -> None:
        self._synchronize()

    def keep_only(self, keys) -> None:
        """Free the buffers of tensors no longer captured."""
        for key in set(self._buffers) - set(keys):
            del self._buffers[key]
