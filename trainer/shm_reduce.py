"""Summing arrays over the ranks of one host through shared memory, for the gradient sync.

Gloo's all-reduce goes through loopback TCP and its own threads: ~340 us for LeNet's
62,000 gradients between two idle ranks on a 2-core machine, and 1.4-1.85 ms when the
cores are busy training. When every rank runs on this host, the sum needs no sockets:
each rank copies its array into its slot of a shared segment, says so in its own
counter, and wakes the others (a futex); once every rank has said so, each sums the
slots itself, in rank order, so every rank gets the same bits.

The segment is a ``memfd`` of rank 0: it has no name that could be left behind, and it is
freed when the last process that maps it exits, however it exits. The other ranks open it
as ``/proc/<rank 0's pid>/fd/<fd>``, which only works from rank 0's pid namespace: ranks in
other containers, on other hosts, or that cannot see it keep gloo. Its memory is reserved
up front (``posix_fallocate``), so a lack of memory is an error at set-up, never a SIGBUS
in the middle of training.

Rounds alternate between two sets of slots. A rank writes round ``k + 1``'s slot only
after every rank has said it reached round ``k``, which each does only after it has
summed round ``k - 1`` -- the same set of slots -- so a slot is never written while
another rank reads it. Each rank's counter has one writer; the order of its stores
(data, then counter) is seen by the other cores as written: x86-64 only (TSO). Other
machines keep gloo.

Each slot carries a header -- the round it was written in, its byte count, its dtype --
and every rank checks all three of every peer's slot before it sums: a slot left over
from an earlier round, or ranks summing different arrays, is an error, never a wrong sum.
A rank whose sum raised (a dead peer, a ``KeyboardInterrupt``, a ``MemoryError``) may have
left a round half done: its object is broken from then on (every later call raises
:class:`SumBroken`), and it tells its peers by setting its counter to ``_GAVE_UP``.

A peer that dies while the others wait is seen within ``POLL_S`` through a pidfd of each
peer (opened once every rank has mapped the segment, so no reused pid can fool it) and
raised as a :class:`~paddlerun.trainer.rundir.errors.PeerFailure` ("peer died"), which the worker
treats like gloo's "Connection reset by peer" (an emergency snapshot). A peer that stops
answering raises one after ``TIMEOUT_S``, gloo's 30 s; one that gave up raises one
("peer gave up") at once.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import platform
import secrets
import select
import struct
import time
from typing import Optional

import numpy as np

from paddlerun.trainer.rundir.errors import PeerFailure

#: Bytes per rank and round: an array bigger than this is summed in several rounds.
CHUNK = 1 << 20
#: Every rank reads every slot: beyond this many ranks gloo's ring moves less memory.
MAX_WORLD = 8
POLL_S = 0.01
TIMEOUT_S = 30.0
# One cache line of int32 per rank: its round (a futex word), its pid, then for each
# parity of rounds its slot's header: round, bytes, dtype (``ord(dtype.char)``).
_LINE = 64
_SLOT_HEADER = 2  # index of parity 0's header in the line; parity 1's follows it
_SLOT_FIELDS = struct.Struct("=3i")  # struct: ~0.3 us to write or read one, numpy ~2-6 us
_HEADER = 64  # token (16 bytes), world size (int32)
_SYS_FUTEX = 202  # x86-64
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
_ROUND_MASK = 0x7FFFFFFF
_GAVE_UP = -1  # a rank's counter once its sum raised: outside every round
_MEMFD_NAME = "paddlerun-gradient-sum"
_libc = ctypes.CDLL(None, use_errno=True)  # releases the GIL while a rank waits


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def unsupported_reason(world: int) -> Optional[str]:
    """Why this process cannot take part in a shared-memory sum of ``world`` ranks, or None."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"not x86-64 Linux ({platform.system()} {platform.machine()})"
    if world > MAX_WORLD:
        return f"{world} ranks, more than {MAX_WORLD}"
    if not hasattr(os, "memfd_create"):
        return "no memfd_create"
    try:  # kernels before 5.3, and some container seccomp profiles, refuse it
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError) as e:
        return f"no pidfd_open ({e})"
    return None


class SumBroken(RuntimeError):
    """A :class:`SharedMemorySum` whose sum raised earlier (or that was closed): it cannot
    be used again, as its peers may be in another round."""


class SharedMemorySum:
    """In-place sum of a float array over ``world`` ranks of one host; every rank
    calls :meth:`all_reduce` with arrays of the same size and dtype, in the same order.

    Made with :meth:`create` on rank 0 and :meth:`attach` on the others, with its
    :attr:`path` and :attr:`token` passed between them; then rank 0 calls
    :meth:`release_path` and every rank :meth:`watch_peers` (``grad_sync.connect_host_sum``)."""

    def __init__(self, fd: int, path: str, rank: int, world: int, token: bytes):
        size = segment_size(world)
        self.rank, self.world = rank, world
        self.path, self.token = path, token
        self._fd: Optional[int] = None  # rank 0's memfd, until release_path()
        if os.fstat(fd).st_size != size:
            raise RuntimeError(f"{path} is not this job's segment (size)")
        self._map = mmap.mmap(fd, size)
        if self._map[:20] != token + world.to_bytes(4, "little"):
            self._map.close()
            raise RuntimeError(f"{path} is not this job's segment")
        lines = np.frombuffer(self._map, dtype=np.int32, count=world * _LINE // 4, offset=_HEADER)
        lines = lines.reshape(world, _LINE // 4)
        self._rounds = lines[:, 0]  # rank -> the last round it reached (a futex word)
        self._pids = lines[:, 1]
        # parity -> rank -> the offset of (round, bytes, dtype) of its slot of that parity
        # (a rank one round ahead has written the other parity's)
        self._headers = [[_HEADER + r * _LINE + 4 * (_SLOT_HEADER + 3 * parity)
                          for r in range(world)] for parity in (0, 1)]
        base = _HEADER + world * _LINE
        self._slots = [[np.frombuffer(self._map, dtype=np.uint8, count=CHUNK,
                                      offset=base + (parity * world + r) * CHUNK)
                        for r in range(world)] for parity in (0, 1)]
        self._round_address = [lines.ctypes.data + r * _LINE for r in range(world)]
        self._pids[rank] = os.getpid()
        self._round = 0  # the last round this rank published
        self._broken: Optional[str] = None  # why it cannot be used any more
        self._peers = {}  # pidfd -> rank, from watch_peers()
        self._exits = select.poll()

    # ------------------------------------------------------------ set-up

    @classmethod
    def create(cls, world: int) -> "SharedMemorySum":
        """Rank 0. Keeps the memfd open (others open it by :attr:`path`) until
        :meth:`release_path`."""
        token = secrets.token_bytes(16)
        fd = os.memfd_create(_MEMFD_NAME, os.MFD_CLOEXEC)
        try:
            os.posix_fallocate(fd, 0, segment_size(world))
            os.pwrite(fd, token + world.to_bytes(4, "little"), 0)
            made = cls(fd, f"/proc/{os.getpid()}/fd/{fd}", 0, world, token)
        except BaseException:
            os.close(fd)
            raise
        made._fd = fd
        return made

    @classmethod
    def attach(cls, path: str, rank: int, world: int, token: bytes) -> "SharedMemorySum":
        # Seen from another pid namespace, the path may name any file of another process:
        # open nothing but a memfd of ours (and never as a controlling terminal).
        if not os.readlink(path).startswith(f"/memfd:{_MEMFD_NAME}"):
            raise RuntimeError(f"{path} is not this job's segment")
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            return cls(fd, path, rank, world, token)
        finally:
            os.close(fd)  # the mapping keeps the segment

    def release_path(self) -> None:
        """Rank 0, once every rank has mapped the segment (or given up): close the memfd.
        The mappings keep the memory; it is freed with the last of them."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def watch_peers(self) -> None:
        """Open a pidfd of every other rank, once every rank has mapped the segment
        (each wrote its pid when it did)."""
        for r in range(self.world):
            if r == self.rank or r in self._peers.values():
                continue
            pid = int(self._pids[r])
            try:
                pidfd = os.pidfd_open(pid) if pid > 0 else None
            except ProcessLookupError:
                pidfd = None
            if pidfd is None:
                raise PeerFailure(f"peer died: rank {r} (pid {pid}) exited before the first "
                                   f"shared-memory gradient sum")
            self._peers[pidfd] = r
            self._exits.register(pidfd, select.POLLIN)

    # ------------------------------------------------------------ the sum

    def all_reduce(self, array: np.ndarray) -> None:
        """Replace ``array`` (contiguous, the same size and dtype on every rank) by its
        sum over the ranks, added in rank order. After any exception from here on the
        object is broken: every later call raises :class:`SumBroken`."""
        if self._broken is not None:
            raise SumBroken(f"rank {self.rank}'s shared-memory gradient sum cannot be used "
                            f"again: {self._broken}. Every rank must make a new one "
                            f"(SharedMemorySum.create / attach)")
        if not array.flags.c_contiguous:
            raise ValueError("SharedMemorySum.all_reduce needs a contiguous array")
        if self.world == 1:
            return
        flat = array.reshape(-1).view(np.uint8)
        step = CHUNK - CHUNK % array.dtype.itemsize
        try:
            for start in range(0, flat.size, step):
                self._sum_chunk(flat[start:start + step], array.dtype)
        except BaseException as e:
            self._give_up(f"its sum raised {e!r} after round {self._round}")
            raise

    def _sum_chunk(self, chunk: np.ndarray, dtype: np.dtype) -> None:
        round_ = (self._round + 1) & _ROUND_MASK
        parity = round_ & 1
        slots = self._slots[parity]
        slots[self.rank][:chunk.size] = chunk
        headers = self._headers[parity]
        mine = (round_, chunk.size, ord(dtype.char))
        _SLOT_FIELDS.pack_into(self._map, headers[self.rank], *mine)
        self._rounds[self.rank] = round_  # last: the others may read the slot from now on
        self._round = round_
        _futex(self._round_address[self.rank], _FUTEX_WAKE, 0x7FFFFFFF, None)
        for r in range(self.world):
            if r != self.rank:
                try:
                    self._wait_for(r)
                except PeerFailure:
                    # A peer that wrote this round's header and then gave up may have given
                    # up on this very mismatch: name the root cause, not its consequence.
                    theirs = _SLOT_FIELDS.unpack_from(self._map, headers[r])
                    if theirs[0] == round_ and theirs != mine:
                        self._mismatch(r, theirs, mine)
                    raise
                theirs = _SLOT_FIELDS.unpack_from(self._map, headers[r])
                if theirs != mine:
                    self._mismatch(r, theirs, mine)
        out = chunk.view(dtype)
        np.add(slots[0][:chunk.size].view(dtype), slots[1][:chunk.size].view(dtype), out=out)
        for r in range(2, self.world):
            np.add(out, slots[r][:chunk.size].view(dtype), out=out)

    def _mismatch(self, r: int, theirs, mine) -> None:
        """Raise what differs between rank ``r``'s slot header and this rank's."""
        (written, their_bytes, their_dtype), (_, nbytes, dtype) = theirs, mine
        if written != self._round:
            raise RuntimeError(f"rank {r}'s slot holds round {written}, not round {self._round}: "
                               f"rank {r} skipped a round of the shared-memory gradient sum")
        raise RuntimeError(f"rank {r} summed {their_bytes} bytes of {_dtype_name(their_dtype)} "
                           f"in round {self._round}, rank {self.rank} {nbytes} bytes of "
                           f"{_dtype_name(dtype)}: the ranks called all_reduce with different arrays")

    def _give_up(self, why: str) -> None:
        """Mark this object broken and tell the peers, which may wait for this rank."""
        self._broken = why
        if self._rounds is not None:
            self._rounds[self.rank] = _GAVE_UP
            _futex(self._round_address[self.rank], _FUTEX_WAKE, 0x7FFFFFFF, None)

    def _wait_for(self, r: int) -> None:
        # Rank r is at most one round ahead (it waits for this rank's round too), and at
        # most one behind (this rank got past the last round only once r had reached it).
        started = checked = time.monotonic()
        while True:
            seen = int(self._rounds[r])
            if seen == _GAVE_UP:
                raise PeerFailure(f"peer gave up: rank {r} (pid {int(self._pids[r])}) left the "
                                   f"shared-memory gradient sum on an error of its own")
            ahead = (seen - self._round) & _ROUND_MASK
            if ahead in (0, 1):
                return
            if ahead != _ROUND_MASK:  # nor one round behind (not there yet): out of step
                raise RuntimeError(f"rank {r} is in round {seen} of the shared-memory gradient "
                                   f"sum, rank {self.rank} in round {self._round}: a rank "
                                   f"skipped a round")
            _futex(self._round_address[r], _FUTEX_WAIT, seen, POLL_S)
            # Whatever ended the wait (a timeout, a wake-up, a signal): signals arriving
            # faster than POLL_S must not keep a dead peer or the deadline from being seen.
            now = time.monotonic()
            if now - checked >= POLL_S:
                checked = now
                self._check_peers()
                if now - started > TIMEOUT_S:
                    raise PeerFailure(
                        f"Timed out after {TIMEOUT_S:.0f} s waiting for rank {r} "
                        f"(pid {int(self._pids[r])}) in the shared-memory gradient sum")

    def _check_peers(self) -> None:
        # A pidfd turns readable when its process exits (a zombie included).
        for pidfd, _ in self._exits.poll(0):
            r = self._peers[pidfd]
            raise PeerFailure(f"peer died: rank {r} (pid {int(self._pids[r])}) exited during "
                               f"the shared-memory gradient sum")

    def close(self) -> None:
        self.release_path()
        for pidfd in self._peers:
            os.close(pidfd)
        self._peers = {}
        self._broken = self._broken or "it was closed"
        self._slots = self._rounds = self._pids = self._headers = None
        try:
            self._map.close()
        except BufferError:  # a caller still holds a view: the mapping goes with the process
            pass


def segment_size(world: int) -> int:
    return _HEADER + world * _LINE + 2 * world * CHUNK


def _dtype_name(code: int) -> str:
    try:
        return np.dtype(chr(code)).name
    except (TypeError, ValueError):
        return f"dtype code {code}"


def _futex(address: int, op: int, value: int, timeout_s: Optional[float]) -> None:
    """FUTEX_WAIT / FUTEX_WAKE on a shared (not private) futex word. A wait returns on a
    wake-up, a timeout, a signal, or at once if the word no longer holds ``value``."""
    timeout = None
    if timeout_s is not None:
        timeout = ctypes.byref(_Timespec(int(timeout_s), int(timeout_s % 1 * 1e9)))
    result = _libc.syscall(ctypes.c_long(_SYS_FUTEX), ctypes.c_void_p(address), ctypes.c_int(op),
                           ctypes.c_int(value), timeout, None, ctypes.c_int(0))
    if result == -1:
        err = ctypes.get_errno()
        if err not in (110, 11, 4):  # ETIMEDOUT, EAGAIN (the word changed already), EINTR
            raise OSError(err, f"futex: {os.strerror(err)}")
