"""The three locks of a checkpoints directory.

- ``.lock`` (:func:`exclusive`): an exclusive ``flock`` held for commit, retention and
  cleanup, always with a timeout; a timeout is a :class:`LockTimeoutError` naming the
  lock file and what to do. A plain flock, not ``filelock.FileLock``: it is taken twice
  per snapshot on the persist thread, and FileLock's Python cost 120-260 us a cycle
  against 9 us (measured), time that thread holds the GIL against training. Both are
  flock(2) on the same file, so a FileLock holder (``paddlerun`` before this, a user's
  tool) and this exclude each other.
- ``.readers/<snapshot>.lock`` (:class:`ReaderMark`): every reader holds a *shared*
  ``flock`` on its snapshot's mark; retention deletes a snapshot only after taking the
  mark *exclusively* without waiting, so it skips snapshots being read. filelock's own
  ``ReadWriteLock`` is SQLite-backed (a database file per snapshot, and one process
  cannot hold read and write modes at once); a plain shared flock is all this needs, and
  the kernel drops it when the reader dies -- no pid files, no liveness guessing.
- ``.writer.lock`` (:class:`WriterClaim`): one job per checkpoints directory. A
  ``FileLock`` taken with timeout 0 and held for the process's life (flock is released
  by the kernel when the holder dies, even on SIGKILL), next to ``.writer.json`` naming
  the owner, so the second claimant fails at once with a message naming host and pid.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator, Mapping, Optional

import psutil
from filelock import FileLock, Timeout

from .atomic import replace_file
from .errors import LockTimeoutError, WriterBusyError

_POLL_S = 0.05


@contextlib.contextmanager
def exclusive(lock_path: Path, timeout_s: float, purpose: str) -> Iterator[None]:
    """Hold the checkpoints directory's ``.lock`` while doing ``purpose``."""
    lock = _poll(lambda: ReaderMark.try_take(lock_path, exclusive=True), timeout_s)
    if lock is None:
        raise LockTimeoutError(
            f"timed out after {timeout_s:g} s waiting for the checkpoint lock {lock_path} "
            f"(to {purpose}). Another process holds it: a commit or retention of this job, "
            f"or a `paddlerun ckpt` command. If none should be running, `lsof {lock_path}` "
            f"names the holder; otherwise raise checkpoint.lock_timeout_s.", lock_path)
    with lock:
        yield


def _poll(take, timeout_s: float):
    """``take()`` until it returns a held lock, every ``_POLL_S``; None after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        held = take()
        if held is not None or time.monotonic() >= deadline:
            return held
        time.sleep(_POLL_S)


class ReaderMark:
    """A held flock on ``.readers/<snapshot>.lock``: shared for readers, exclusive for retention.
    (:func:`exclusive` holds the directory's ``.lock`` the same way.)"""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    @classmethod
    def try_take(cls, path: Path, exclusive: bool) -> Optional["ReaderMark"]:
        """Take the mark without waiting; None when a conflicting holder has it."""
        mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, mode)
            except BlockingIOError:
                os.close(fd)
                return None
            except BaseException:
                os.close(fd)
                raise
            # Retention unlinks a mark after deleting its snapshot; if that happened between
            # our open and flock we hold a lock on a dead inode. Retry on the live file.
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            held = os.fstat(fd)
            if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
                return cls(path, fd)
            os.close(fd)

    @classmethod
    def take_shared(cls, path: Path, timeout_s: float) -> "ReaderMark":
        """Wait (at most ``timeout_s``) for a shared hold; retention holds it only for a rename."""
        mark = _poll(lambda: cls.try_take(path, exclusive=False), timeout_s)
        if mark is None:
            raise LockTimeoutError(
                f"timed out after {timeout_s:g} s waiting for the reader mark {path}: retention "
                f"is deleting this snapshot. `lsof {path}` names the holder.", path)
        return mark

    def unlink(self) -> None:
        """Remove the mark file (retention, after its snapshot is gone), still holding the lock."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = -1

    def __enter__(self) -> "ReaderMark":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class WriterClaim:
    """This process's exclusive right to write a checkpoints directory. Keep it referenced:
    it is released by :meth:`release`, on ``with`` exit, or when this process dies."""

    def __init__(self, directory: Path, lock_name: str, owner_name: str, owner: Mapping) -> None:
        self.lock_path = directory / lock_name
        self.owner_path = directory / owner_name
        self._lock = FileLock(self.lock_path, timeout=0)
        try:
            self._lock.acquire()
        except Timeout:
            raise self._busy(directory) from None
        me = psutil.Process()
        self.owner = {**owner, "host": socket.gethostname(), "pid": me.pid,
                      "process_start_unix": me.create_time(), "claimed_unix": time.time()}
        #: Whether ``.writer.json`` names this process (see :meth:`record`).
        self.recorded = False
        try:
            self.record()
        except BaseException:
            self._lock.release()
            raise

    def record(self) -> bool:
        """Write ``.writer.json`` naming this process; True once written.

        A full disk (ENOSPC, EDQUOT) does not fail the claim: the lock is the claim and
        needs no space, and the job's start (``CheckpointStore.open_writer``) first frees
        what an interrupted save left, then records again. Meanwhile the stale record of a
        previous owner is removed, so a second claimant is never told a dead job's pid.
        """
        try:
            replace_file(self.owner_path, (json.dumps(self.owner, indent=1, default=str) + "\n").encode())
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            with contextlib.suppress(OSError):
                self.owner_path.unlink()
            return False
        self.recorded = True
        return True

    def _busy(self, directory: Path) -> WriterBusyError:
        try:
            holder = json.loads(self.owner_path.read_bytes())
            if not isinstance(holder, dict):
                raise ValueError("not an object")
        except (OSError, ValueError):
            return WriterBusyError(
                f"checkpoint directory {directory} is already claimed by another process (its owner "
                f"record {self.owner_path} is missing or unreadable; `lsof {self.lock_path}` names it). "
                f"Two jobs must not write the same checkpoint directory: stop the other job, or give "
                f"this one another run dir (or checkpoint.dir).", directory, {})
        since = holder.get("claimed_unix")
        since = datetime.datetime.fromtimestamp(since).isoformat(timespec="seconds") \
            if isinstance(since, (int, float)) else "?"
        who = "this very process" if holder.get("pid") == os.getpid() \
            and holder.get("host") == socket.gethostname() else "another job"
        return WriterBusyError(
            f"checkpoint directory {directory} is already being written by {who}: host "
            f"{holder.get('host')}, pid {holder.get('pid')}, run dir {holder.get('run_dir', '?')}, "
            f"since {since}. Two jobs must not write the same checkpoint directory: stop that job, "
            f"or give this one another run dir (or checkpoint.dir).", directory, holder)

    @property
    def held(self) -> bool:
        return self._lock.is_locked

    def release(self) -> None:
        if not self._lock.is_locked:
            return
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.owner_path.read_bytes()).get("pid") == self.owner["pid"]:
                self.owner_path.unlink()
        self._lock.release()

    def __enter__(self) -> "WriterClaim":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
