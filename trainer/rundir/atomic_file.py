"""Replace a file atomically: readers see the old content or the new, never a mix.

The one way paddlerun rewrites a file in place (heartbeats, control and error files,
summary.json, exports, plots, caches): write a hidden temporary file beside it, then
``rename(2)`` it over the old one, which is atomic within a filesystem. Whether the
new content must survive a power cut is the caller's choice, and an argument:

``durable=True``
    fsync the temporary file before the rename and the directory after it: once the
    call returns, the new file is on disk (summary.json, exported snapshots).
``durable=False``
    no fsync: a crash of the machine may lose the change, a crash of the process never
    tears the file. For files rewritten every second that only say "alive" or "stop"
    (heartbeats, control) an fsync would cost a disk flush each time for nothing.

An error or exception while writing removes the temporary file and leaves the old
file as it was. A process killed while writing leaves its temporary file behind,
named ``.NAME.PID-THREAD.tmp`` (hidden, ends in ``.tmp``), never a partial ``NAME``.

Stdlib only, no paddle, no numpy: the supervisor and the workers both use it.
"""
from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import IO, Iterator, Union

__all__ = ["atomic_write", "fsync_dir", "temp_path", "write_atomic"]

PathLike = Union[str, "os.PathLike[str]"]


def temp_path(path: Path) -> Path:
    """The temporary sibling a writer in this thread uses for ``path``."""
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")


def fsync_dir(path: PathLike) -> None:
    """fsync a directory, making the creations, renames and deletions in it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: PathLike, *, durable: bool, mode: str = "wb") -> Iterator[IO]:
    """Write ``path`` through the file object this yields; it replaces ``path`` when the
    block ends without an exception. ``mode``: ``"wb"`` or ``"w"`` (text)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, mode) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if e.filename is None:  # a write or fsync: say which file (a full disk names no path)
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        fsync_dir(path.parent)


def write_atomic(path: PathLike, data: Union[bytes, str], *, durable: bool) -> None:
    """Replace ``path`` with ``data`` (text is written as UTF-8)."""
    if isinstance(data, str):
        data = data.encode()
    with atomic_write(path, durable=durable) as f:
        f.write(data)
