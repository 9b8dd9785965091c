"""Durable writes: the layer that makes a snapshot survive a crash or a power cut.

A snapshot is committed the way orbax's atomicity layer and databases do it:

1. write every file into a private staging directory and fsync each one;
2. write ``manifest.json`` (size and sha256 of every file, :mod:`.digests`) last, fsync it;
3. fsync the staging directory, so its entries are on disk;
4. ``rename(2)`` it to ``step-XXXXXXXX`` -- atomic within one filesystem, so a reader
   sees the whole snapshot or nothing;
5. fsync the parent directory, so the rename itself survives a power cut.

The manifest is the second line of defence: a ``step-*`` directory without a valid one
does not exist for any reader (a filesystem that reorders metadata, a hand-made copy).

This module holds the primitives; :mod:`.staging` and :mod:`.store` put them in order.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Union

from ..rundir.atomic_file import atomic_write, fsync_dir  # noqa: F401  (fsync_dir: store.py imports it here)
from .digests import CHUNK, PIECE, Digests, ViewHasher, cut, hash_file, piece_count

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class FileRecord:
    """One file of a snapshot as the manifest records it: name inside the snapshot, size,
    and its digests (:mod:`.digests`): its sha256, or for a file of more than
    ``piece_bytes`` bytes the sha256 of each piece of that many bytes, in order."""

    name: str
    size: int
    sha256: Digests
    piece_bytes: int = PIECE

    def to_json(self) -> dict:
        if len(self.sha256) == 1:
            return {"name": self.name, "size": self.size, "sha256": self.sha256[0]}
        return {"name": self.name, "size": self.size, "piece_bytes": self.piece_bytes,
                "sha256_pieces": list(self.sha256)}

    @classmethod
    def from_json(cls, obj: object) -> "FileRecord":
        """Parse a manifest entry; raises ``ValueError`` describing what is wrong."""
        if not isinstance(obj, dict):
            raise ValueError(f"file entry {obj!r} is not an object")
        name, size = obj.get("name"), obj.get("size")
        if not isinstance(name, str):
            raise ValueError(f"file entry {obj!r} has no string 'name'")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"file entry {name!r} has an invalid size {size!r}")
        if "sha256_pieces" not in obj:
            digest = obj.get("sha256")  # of the whole file, however big (all of format_version 1)
            if not isinstance(digest, str) or not _SHA256.match(digest):
                raise ValueError(f"file entry {name!r} has an invalid sha256 {digest!r}")
            return cls(name, size, (digest,))
        if "sha256" in obj:
            raise ValueError(f"file entry {name!r} has both a sha256 and sha256_pieces")
        pieces, piece = obj["sha256_pieces"], obj.get("piece_bytes")
        if not isinstance(piece, int) or isinstance(piece, bool) or piece <= 0:
            raise ValueError(f"file entry {name!r} has an invalid piece_bytes {piece!r}")
        if not isinstance(pieces, list) or not all(isinstance(d, str) and _SHA256.match(d) for d in pieces):
            raise ValueError(f"file entry {name!r} has an invalid sha256_pieces list")
        if len(pieces) != piece_count(size, piece):
            raise ValueError(f"file entry {name!r} has {len(pieces)} sha256_pieces for {size} bytes "
                             f"in pieces of {piece}; it needs {piece_count(size, piece)}")
        return cls(name, size, tuple(pieces), piece)

    def mismatch(self, size: int, sha256: Digests, source: str = "the manifest") -> Optional[str]:
        """How a file of ``size`` bytes and these digests differs from this record (which
        ``source`` holds), or None."""
        if size != self.size:
            return f"{size} bytes where {source} says {self.size}"
        if len(sha256) != len(self.sha256):  # hashed in other pieces than this record's
            return f"{len(sha256)} sha256 pieces where {source} has {len(self.sha256)}"
        for i, (found, want) in enumerate(zip(sha256, self.sha256)):
            if found != want:
                where = "" if len(self.sha256) == 1 else \
                    f" of bytes {i * self.piece_bytes}-{min((i + 1) * self.piece_bytes, size) - 1}"
                return f"sha256{where} {found[:16]}... does not match {source}'s {want[:16]}..."
        return None

    @property
    def hashed_in(self) -> int:
        """The piece size this record's digests were taken in: one digest is always of the
        whole file (a format_version 1 record may be of any size)."""
        return self.piece_bytes if len(self.sha256) > 1 else max(self.size, 1)

    def mismatch_of_file(self, path: Path, source: str = "the manifest") -> Optional[str]:
        """:meth:`mismatch` for the file at ``path``, hashed the way this record was."""
        return self.mismatch(*hash_file(path, self.hashed_in), source=source)


def write_bytes(path: Path, data: Union[bytes, bytearray, memoryview]) -> FileRecord:
    """Create or truncate ``path``, write ``data`` and fsync, hashing it meanwhile. No directory fsync."""
    return write_views(path, [memoryview(data)])


def write_views(path: Path, views: Sequence[memoryview]) -> FileRecord:
    """Create or truncate ``path`` holding the bytes of ``views`` laid end to end, fsync it,
    and return its record. No directory fsync.

    The pieces are hashed from memory in threads while this thread writes the same
    bytes, rather than read back and hashed after the write (figures in
    :func:`.tensors_io.write_tensors`). So nothing may change the views' memory until
    this returns (the checkpointer's capture buffers are not reused before then).
    """
    views = [memoryview(v).cast("B") for v in views]
    total, size = sum(map(len, views)), 0
    with _naming(path), open(path, "wb", buffering=0) as f:
        hasher = ViewHasher(views)  # only once the file is open: a failed open hashes nothing
        try:
            for parts in cut(views, CHUNK):
                # writev(2): one call for a chunk's many small arrays (LeNet's 50 took 50 writes).
                start = size
                for first in range(0, len(parts), _IOV_MAX):
                    size += _writev_all(f.fileno(), parts[first:first + _IOV_MAX])
                if total > CHUNK:  # a smaller file is all written by the fsync below anyway
                    start_writeback(f.fileno(), start, size - start)
            os.fsync(f.fileno())
            digests = hasher.digests()
        finally:
            hasher.close()
    return FileRecord(path.name, size, digests)


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the kernel start writing ``length`` bytes at ``offset`` to the disk now.

    Left alone it waits until 10 % of memory is dirty, so the disk idles while a file is
    written and the fsync then waits for all of it. Measured (a 1 GB and a 2 GB file,
    each fsynced): 2.41-2.62 s without, 1.61-1.69 s with this after every 8 MB, 1.88-2.24 s
    for one 3 GB file. ``sync_file_range(2)`` only starts the writes (the fsync still
    makes them durable) and keeps the pages cached for a restart that reads them back;
    where libc lacks it, nothing is done.
    """
    if _sync_file_range is not None and length > 0:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # a hint: its errors do not matter


def _libc_sync_file_range():
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range  # ctypes calls release the GIL
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>


def _writev_all(fd: int, parts: List[memoryview]) -> int:
    """writev(2) until all of ``parts`` is written (it may write less); returns their length."""
    done = 0
    while parts:
        n = os.writev(fd, parts)
        if not n:  # cannot happen for a regular file; never loop on it
            raise OSError(errno.EIO, f"writev(2) wrote nothing of {sum(map(len, parts))} bytes")
        done += n
        while parts and n >= len(parts[0]):  # drop what was written
            n -= len(parts[0])
            parts = parts[1:]
        if n:
            parts = [parts[0][n:], *parts[1:]]
    return done


#: At most this many buffers in one writev(2) (Linux's IOV_MAX is 1024).
_IOV_MAX = 512


def replace_file(path: Path, data: bytes) -> None:
    """Atomically and durably replace a small file (:func:`..atomic_file.atomic_write`)."""
    with _naming(path), atomic_write(path, durable=True) as f:
        f.write(data)


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """write(2) errors name no file: say which one it was."""
    try:
        yield
    except OSError as exc:
        raise OSError(exc.errno, f"{exc.strerror}: writing {path}") from exc
