"""Summing arrays over the ranks of one host through shared memory, for the gradient sync.

Gloo's all-reduce goes through loopback TCP and its own threads: ~340 us for LeNet's
62,000 gradients between two idle ranks on a 2-core machine, and more when the cores
are busy. When every rank runs on this host, the sum needs no sockets: each rank copies
its array into its slot of a shared segment, says so in its own counter, and wakes the
others (a futex); once every rank has said so, each sums the slots itself, in rank
order, so every rank gets the same bits.

The segment is a file in ``/dev/shm``, unlinked as soon as every rank has mapped it:
nothing is left behind, whoever dies. Space is reserved up front (``posix_fallocate``),
so a full ``/dev/shm`` is an error at set-up -- and the caller keeps gloo -- never a
SIGBUS in the middle of training.

Rounds alternate between two sets of slots. A rank writes round ``k + 1``'s slot only
after every rank has said it reached round ``k``, which each does only after it has
summed round ``k - 1`` -- the same set of slots -- so a slot is never written while
another rank reads it. Each rank's counter has one writer; the order of its stores
(data, then counter) is seen by the other cores as written: x86-64 only (TSO). Other
machines keep gloo.

A peer that dies while the others wait is noticed within ``POLL_S`` (a pidfd of each
peer, opened once every rank has mapped the segment: no pid reuse can fool it) and
raised as a ``RuntimeError`` saying "peer died", which the worker treats like gloo's
"Connection reset by peer" (an emergency snapshot). A peer that stops answering raises
after ``TIMEOUT_S``, gloo's 30 s.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import platform
import secrets
import time
from typing import Optional

import select

import numpy as np

#: Bytes per rank and round: an array bigger than this is summed in several rounds.
CHUNK = 1 << 20
POLL_S = 0.01
TIMEOUT_S = 30.0
_LINE = 64  # one cache line per rank's counter: no false sharing between writers
_HEADER = 64  # token (16 bytes), world size (int32)
_SYS_FUTEX = 202  # x86-64
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
_ROUND_MASK = 0x7FFFFFFF
_libc = ctypes.CDLL(None, use_errno=True)  # releases the GIL while a rank waits


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def supported() -> bool:
    return platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64") \
        and os.path.isdir("/dev/shm")


class SharedMemorySum:
    """In-place sum of a float array over ``world`` ranks of one host; every rank
    calls :meth:`all_reduce` with arrays of the same size and dtype, in the same order.

    Made with :meth:`create` on one rank and :meth:`attach` on the others, with the
    segment's name passed between them (``grad_sync.connect_host_sum``)."""

    def __init__(self, fd: int, path: str, rank: int, world: int, token: bytes):
        size = segment_size(world)
        self.rank, self.world = rank, world
        self.path, self.token = path, token
        try:
            if os.fstat(fd).st_size != size:
                raise RuntimeError(f"{path} is not this job's segment (size)")
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        if self._map[:20] != token + world.to_bytes(4, "little"):
            self._map.close()
            raise RuntimeError(f"{path} is not this job's segment")
        lines = np.frombuffer(self._map, dtype=np.int32, count=world * _LINE // 4, offset=_HEADER)
        lines = lines.reshape(world, _LINE // 4)
        self._rounds = lines[:, 0]  # rank -> the last round it reached (a futex word)
        self._pids = lines[:, 1]
        base = _HEADER + world * _LINE
        self._slots = [[np.frombuffer(self._map, dtype=np.uint8, count=CHUNK,
                                      offset=base + (parity * world + r) * CHUNK)
                        for r in range(world)] for parity in (0, 1)]
        self._round_address = [lines.ctypes.data + r * _LINE for r in range(world)]
        self._pids[rank] = os.getpid()
        self._round = 0
        self._peers = {}  # rank -> pidfd, from watch_peers()
        self._exits = select.poll()

    # ------------------------------------------------------------ set-up

    @classmethod
    def create(cls, rank: int, world: int) -> "SharedMemorySum":
        token = secrets.token_bytes(16)
        path = f"/dev/shm/paddlerun-sum-{os.getpid()}-{token.hex()[:12]}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, segment_size(world))
            os.pwrite(fd, token + world.to_bytes(4, "little"), 0)
            return cls(fd, path, rank, world, token)
        except BaseException:
            os.unlink(path)
            raise

    @classmethod
    def attach(cls, path: str, rank: int, world: int, token: bytes) -> "SharedMemorySum":
        return cls(os.open(path, os.O_RDWR), path, rank, world, token)

    def watch_peers(self) -> None:
        """Open a pidfd of every other rank; call once every rank has mapped the segment
        (each wrote its pid when it did)."""
        for r in range(self.world):
            if r != self.rank and r not in self._peers:
                pid = int(self._pids[r])
                if pid <= 0:
                    raise RuntimeError(f"rank {r} has not mapped the shared-memory segment")
                try:
                    self._peers[r] = os.pidfd_open(pid)
                    self._exits.register(self._peers[r], select.POLLIN)
                except ProcessLookupError:
                    raise RuntimeError(f"peer died: rank {r} (pid {pid}) exited before the "
                                       f"first shared-memory gradient sum") from None

    # ------------------------------------------------------------ the sum

    def all_reduce(self, array: np.ndarray) -> None:
        """Replace ``array`` (contiguous, the same size and dtype on every rank) by its
        sum over the ranks, added in rank order."""
        if not array.flags.c_contiguous:
            raise ValueError("SharedMemorySum.all_reduce needs a contiguous array")
        if self.world == 1:
            return
        flat = array.reshape(-1).view(np.uint8)
        itemsize = array.dtype.itemsize
        step = CHUNK - CHUNK % itemsize
        for start in range(0, flat.size, step):
            self._sum_chunk(flat[start:start + step], array.dtype)

    def _sum_chunk(self, chunk: np.ndarray, dtype: np.dtype) -> None:
        self._round = (self._round + 1) & _ROUND_MASK
        slots = self._slots[self._round & 1]
        slots[self.rank][:chunk.size] = chunk
        self._rounds[self.rank] = self._round
        _futex(self._round_address[self.rank], _FUTEX_WAKE, 0x7FFFFFFF, None)
        for r in range(self.world):
            if r != self.rank:
                self._wait_for(r)
        out = chunk.view(dtype)
        np.add(slots[0][:chunk.size].view(dtype), slots[1][:chunk.size].view(dtype), out=out)
        for r in range(2, self.world):
            np.add(out, slots[r][:chunk.size].view(dtype), out=out)

    def _wait_for(self, r: int) -> None:
        # Rank r is at most one round ahead (it waits for this rank's round too).
        deadline = None
        while True:
            seen = int(self._rounds[r])
            if (seen - self._round) & _ROUND_MASK in (0, 1):
                return
            timed_out = _futex(self._round_address[r], _FUTEX_WAIT, seen, POLL_S)
            if timed_out:
                self._check_peers()
                now = time.monotonic()
                deadline = deadline or now + TIMEOUT_S
                if now > deadline:
                    raise RuntimeError(
                        f"Timed out after {TIMEOUT_S:.0f} s waiting for rank {r} "
                        f"(pid {int(self._pids[r])}) in the shared-memory gradient sum")

    def _check_peers(self) -> None:
        # A pidfd turns readable when its process exits (a zombie included).
        for pidfd, _ in self._exits.poll(0):
            r = next(r for r, fd in self._peers.items() if fd == pidfd)
            raise RuntimeError(f"peer died: rank {r} (pid {int(self._pids[r])}) exited during "
                               f"the shared-memory gradient sum")

    def unlink(self) -> None:
        """Remove the segment's name once every rank has mapped it (rank 0)."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        for pidfd in self._peers.values():
            os.close(pidfd)
        self._peers = {}
        self._slots = self._rounds = self._pids = None
        try:
            self._map.close()
        except BufferError:  # a caller still holds a view: the mapping goes with the process
            pass


def segment_size(world: int) -> int:
    return _HEADER + world * _LINE + 2 * world * CHUNK


def _futex(address: int, op: int, value: int, timeout_s: Optional[float]) -> bool:
    """FUTEX_WAIT / FUTEX_WAKE on a shared (not private) futex word; True if a wait timed out."""
    timeout = None
    if timeout_s is not None:
        timeout = ctypes.byref(_Timespec(int(timeout_s), int(timeout_s % 1 * 1e9)))
    result = _libc.syscall(_SYS_FUTEX, ctypes.c_void_p(address), op, value, timeout, None, 0)
    if result == -1:
        err = ctypes.get_errno()
        if err == 110:  # ETIMEDOUT
            return True
        if err not in (11, 4):  # EAGAIN: the word changed already; EINTR: a signal
            raise OSError(err, f"futex: {os.strerror(err)}")
    return False
