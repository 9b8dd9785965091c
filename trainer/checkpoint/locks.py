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
  One exception: an elastic job's claimant waits (up to a timeout) for an owner of an
  older generation, whose supervisor is stopping it.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterator, Mapping, Optional, Tuple

import psutil
from filelock import FileLock, Timeout

from .atomic import replace_file
from .errors import LockTimeoutError, WriterBusyError

_POLL_S = 0.05
logger = logging.getLogger("paddlerun.checkpoint")


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
    it is released by :meth:`release`, on ``with`` exit, or when this process dies.

    ``generation`` (an elastic job's) is recorded in the owner record. A claimant of
    generation G that finds the claim held by an owner of an older generation waits for
    it, up to ``wait_for_older_s``: that owner's supervisor is stopping it. Any other
    owner (the same or a newer generation, none, or an unreadable record) fails the
    claim at once.
    """

    def __init__(self, directory: Path, lock_name: str, owner_name: str, owner: Mapping,
                 generation: Optional[int] = None, wait_for_older_s: float = 0.0) -> None:
        self.lock_path = directory / lock_name
        self.owner_path = directory / owner_name
        self._lock = FileLock(self.lock_path, timeout=0)
        self._acquire(directory, generation, wait_for_older_s)
        me = psutil.Process()
        self.owner = {**owner, "host": socket.gethostname(), "pid": me.pid,
                      "process_start_unix": me.create_time(), "claimed_unix": time.time()}
        if generation is not None:
            self.owner["generation"] = generation
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

    def _acquire(self, directory: Path, generation: Optional[int], wait_for_older_s: float) -> None:
        """Take the lock now, or, while its owner is of an older generation, within ``wait_for_older_s``."""
        deadline = time.monotonic() + wait_for_older_s
        waiting_for: Optional[dict] = None
        while True:
            try:
                self._lock.acquire()
                return
            except Timeout:
                pass
            holder = self._holder()
            older = _older_generation(holder, generation)
            # Once waiting, an unreadable record is the old owner between removing it and
            # unlocking (release()); a readable one of another generation is a new owner.
            if not older and (waiting_for is None or holder is not None):
                raise self._busy(directory, holder) from None
            if waiting_for is None:
                waiting_for = holder
                logger.warning(
                    "checkpoint directory %s is still claimed by generation %s (host %s, pid %s); "
                    "this claimant is of generation %d: waiting up to %g s for it to stop",
                    directory, holder.get("generation"), holder.get("host"), holder.get("pid"),
                    generation, wait_for_older_s)
            if time.monotonic() >= deadline:
                raise self._busy(directory, holder or waiting_for, waited=(generation, wait_for_older_s)) \
                    from None
            time.sleep(_POLL_S)

    def _holder(self) -> Optional[dict]:
        """The owner record of the process holding the claim, or None when missing or unreadable."""
        try:
            holder = json.loads(self.owner_path.read_bytes())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _busy(self, directory: Path, holder: Optional[dict],
              waited: Optional[Tuple[int, float]] = None) -> WriterBusyError:
        if holder is None:
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
        named = (f"host {holder.get('host')}, pid {holder.get('pid')}, run dir "
                 f"{holder.get('run_dir', '?')}, since {since}")
        if waited is not None:
            generation, seconds = waited
            return WriterBusyError(
                f"checkpoint directory {directory} is still claimed by a worker of generation "
                f"{holder.get('generation')} ({named}) after this worker of generation {generation} "
                f"waited {seconds:g} s for it. Its supervisor should have stopped it: stop it (kill "
                f"pid {holder.get('pid')} on host {holder.get('host')}), or raise "
                f"checkpoint.lock_timeout_s if it is only slow to save.", directory, holder)
        if "generation" in holder:
            who += f" of generation {holder['generation']}"
        return WriterBusyError(
            f"checkpoint directory {directory} is already being written by {who}: {named}. Two "
            f"jobs must not write the same checkpoint directory: stop that job, or give this one "
            f"another run dir (or checkpoint.dir).", directory, holder)

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


def _older_generation(holder: Optional[dict], generation: Optional[int]) -> bool:
    """Whether ``holder``'s record names a generation older than ``generation``."""
    theirs = holder.get("generation") if holder is not None else None
    return generation is not None and isinstance(theirs, int) and not isinstance(theirs, bool) \
        and theirs < generation
