"""sha256 of snapshot files, piece by piece on several cores.

A file of up to :data:`PIECE` bytes has one digest: its plain sha256 (what ``sha256sum``
prints). A bigger one has one sha256 per ``PIECE`` bytes, in order. sha256 is serial,
and on one core (0.9-1.4 GB/s here) it is no faster than the disk: hashed whole, a 3 GB
snapshot took 2.8 x a raw write of its bytes. In pieces it hashes on every core
(hashlib releases the GIL), while the file is written and again when a reader checks it.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Sequence, Tuple

#: Bytes per hashed piece: big enough that the digests stay few (48 for 3 GB), small
#: enough that a file of a few hundred MB spreads over the cores.
PIECE = 64 << 20
#: Threads that hash the pieces of one file.
THREADS = min(4, os.cpu_count() or 1)
#: How much nicer than the writing thread its hashing threads run. With fewer idle cores
#: than threads (3 on 2 cores), the write goes first, so the disk is kept busy, and the
#: hashing takes what the write leaves. 3 GB written and fsynced, 5 alternating rounds:
#: 2.71-4.63 s at the same nice, 2.12-2.56 s with this.
HASH_NICE = 5
#: Read and write in pieces of this size: large enough for full disk speed, small
#: enough that hashing never holds a big second copy of a file in memory.
CHUNK = 8 << 20

Digests = Tuple[str, ...]


def piece_count(size: int, piece: int = PIECE) -> int:
    """How many digests a file of ``size`` bytes has (an empty file has one)."""
    return max(1, -(-size // piece))


def cut(views: Sequence[memoryview], piece: int) -> List[List[memoryview]]:
    """The bytes of ``views`` laid end to end, cut into pieces of ``piece`` bytes."""
    pieces, current, room = [], [], piece
    for view in views:
        while len(view):
            part = view[:room]
            current.append(part)
            view, room = view[len(part):], room - len(part)
            if room == 0:
                pieces.append(current)
                current, room = [], piece
    if current or not pieces:
        pieces.append(current)
    return pieces


def _sha256_of(parts: Sequence[memoryview]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()


class ViewHasher:
    """The digests of ``views`` laid end to end (the bytes a file written from them
    holds), hashed in threads from construction on, so that a caller writes the same
    bytes meanwhile; :meth:`digests` waits for them.

    A single piece is hashed by :meth:`digests` itself unless it is large (then one
    thread overlaps it with the write); small files start no thread at all. The threads
    run :data:`HASH_NICE` nicer than the calling thread (Linux keeps nice per thread): the
    persist thread, itself 10 nicer than training.
    """

    def __init__(self, views: Sequence[memoryview], piece: int = PIECE,
                 threads: int = THREADS, min_parallel: int = 4 << 20) -> None:
        self._pieces = cut([memoryview(v).cast("B") for v in views], piece)
        total = sum(len(p) for parts in self._pieces for p in parts)
        self._pool = self._futures = None
        if total >= min_parallel:
            self._pool = ThreadPoolExecutor(min(threads, len(self._pieces)),
                                            thread_name_prefix="paddlerun-hash",
                                            initializer=_nicer_than_the_writer)
            self._futures = [self._pool.submit(_sha256_of, parts) for parts in self._pieces]

    def digests(self) -> Digests:
        if self._futures is None:
            return tuple(_sha256_of(parts) for parts in self._pieces)
        try:
            return tuple(f.result() for f in self._futures)
        finally:
            self.close()

    def close(self) -> None:
        """Stop hashing (an abandoned write); idempotent."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _nicer_than_the_writer() -> None:
    try:
        os.nice(HASH_NICE)  # this thread only (Linux)
    except OSError:
        pass


def hash_bytes(data, piece: int = PIECE) -> Digests:
    """The digests of ``data`` as a file holding it would have them."""
    return ViewHasher([memoryview(data)], piece).digests()


def hash_file(path: os.PathLike, piece: int = PIECE, threads: int = THREADS) -> Tuple[int, Digests]:
    """(size, digests) of a regular file, its pieces read and hashed side by side.

    Never follows a symlink (raises ``OSError`` ELOOP).
    """
    fd = os.open(Path(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        starts = range(0, piece_count(size, piece) * piece, piece)
        if len(starts) == 1:
            results = [_hash_range(fd, 0, piece, size)]
        else:
            with ThreadPoolExecutor(min(threads, len(starts)), thread_name_prefix="paddlerun-hash") as pool:
                results = list(pool.map(lambda start: _hash_range(fd, start, piece, size), starts))
    finally:
        os.close(fd)
    # A file that changed size while it was read reports what was read.
    return sum(n for n, _ in results), tuple(d for _, d in results)


def _hash_range(fd: int, start: int, length: int, size_hint: int) -> Tuple[int, str]:
    """(bytes read, sha256) of ``length`` bytes of ``fd`` from ``start`` (fewer at its end)."""
    h = hashlib.sha256()
    # No bigger than needed (+1 to see a file's end in one read): a fresh 8 MB buffer
    # costs ~0.7 ms of zeroing and page faults, most of a small snapshot's hashing.
    buf = bytearray(max(1, min(CHUNK, length, size_hint - start + 1)))
    view, done = memoryview(buf), 0
    while done < length:
        n = os.preadv(fd, [view[:min(len(buf), length - done)]], start + done)
        if not n:
            break
        h.update(view[:n])
        done += n
    return done, h.hexdigest()
