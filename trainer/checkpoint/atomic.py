"""Durable writes: the layer that makes a snapshot survive a crash or a power cut.

A snapshot is committed the way orbax's atomicity layer and databases do it:

1. write every file into a private staging directory and fsync each one;
2. write ``manifest.json`` (size and sha256 of every file) last, fsync it;
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
import hashlib
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Tuple, Union

#: Read and write in pieces of this size: large enough for full disk speed, small
#: enough that hashing never holds a big second copy of a file in memory.
CHUNK = 8 << 20

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class FileRecord:
    """One file of a snapshot as the manifest records it: name inside the snapshot, size, sha256."""

    name: str
    size: int
    sha256: str

    def to_json(self) -> dict:
        return {"name": self.name, "size": self.size, "sha256": self.sha256}

    @classmethod
    def from_json(cls, obj: object) -> "FileRecord":
        """Parse a manifest entry; raises ``ValueError`` describing what is wrong."""
        if not isinstance(obj, dict):
            raise ValueError(f"file entry {obj!r} is not an object")
        name, size, digest = obj.get("name"), obj.get("size"), obj.get("sha256")
        if not isinstance(name, str):
            raise ValueError(f"file entry {obj!r} has no string 'name'")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"file entry {name!r} has an invalid size {size!r}")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise ValueError(f"file entry {name!r} has an invalid sha256 {digest!r}")
        return cls(name, size, digest)


def fsync_dir(path: Union[str, os.PathLike]) -> None:
    """fsync a directory, making the creations, renames and deletions in it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: Path, data: Union[bytes, bytearray, memoryview]) -> FileRecord:
    """Create or truncate ``path``, write ``data`` hashing it on the way, fsync. No directory fsync."""
    h = hashlib.sha256()
    view = memoryview(data).cast("B")
    with _naming(path), open(path, "wb") as f:  # buffered: its write() retries short writes
        for start in range(0, len(view), CHUNK):
            piece = view[start:start + CHUNK]
            f.write(piece)
            h.update(piece)
        f.flush()
        os.fsync(f.fileno())
    return FileRecord(path.name, len(view), h.hexdigest())


def sha256_file(path: Path) -> Tuple[int, str]:
    """(size, sha256) of a regular file; never follows a symlink (raises ``OSError`` ELOOP)."""
    h = hashlib.sha256()
    size = 0
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with open(fd, "rb", buffering=0) as f:
        # No bigger than the file (+1 to see its end in one read): a fresh 8 MB buffer
        # costs ~0.7 ms of zeroing and page faults, most of a small snapshot's hashing.
        buf = bytearray(min(CHUNK, os.fstat(fd).st_size + 1))
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            size += n
    return size, h.hexdigest()


def fsync_and_hash(path: Path) -> FileRecord:
    """fsync a file another writer (the safetensors library) just wrote, and hash it.

    The fsync runs in a thread while this thread hashes the file back from the page
    cache: both release the GIL, so the pair costs about as long as the slower of the
    two (see tensors_io.write_tensors for the numbers).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    errors = []

    def sync() -> None:
        try:
            os.fsync(fd)
        except OSError as exc:  # surfaced below, never swallowed
            errors.append(exc)

    syncer = threading.Thread(target=sync, name="paddlerun-fsync")
    syncer.start()
    try:
        size, digest = sha256_file(path)
    finally:
        syncer.join()
        os.close(fd)
    if errors:
        raise OSError(errors[0].errno, f"{errors[0].strerror}: fsync of {path}") from errors[0]
    return FileRecord(path.name, size, digest)


def publish_file(path: Path, data: bytes) -> None:
    """Atomically replace a small file that need not survive a crash: readers see the old
    content or the new, never part of it. No fsync (see :func:`replace_file` for that)."""
    _swap_in(path, data, durable=False)


def replace_file(path: Path, data: bytes) -> None:
    """Atomically replace a small file: write a sibling temp file, fsync, rename, fsync the dir."""
    _swap_in(path, data, durable=True)
    fsync_dir(path.parent)


def _swap_in(path: Path, data: bytes, durable: bool) -> None:
    """Write ``data`` to a sibling temp file (fsynced if ``durable``) and rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        if durable:
            write_bytes(tmp, data)
        else:
            with _naming(tmp):
                tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """write(2) errors name no file: say which one it was."""
    try:
        yield
    except OSError as exc:
        raise OSError(exc.errno, f"{exc.strerror}: writing {path}") from exc
