"""Worker error files: the root cause of a failure, written by the worker that failed.

On an uncaught exception a worker writes ``RUN_DIR/errors/attempt-N/rank-K.json``
with its traceback, so the supervisor can report the first failure by rank and
cause instead of the launcher's generic exit code (docs/conventions.md#errors).

How an exception is classified is decided here, by type, once, in the worker: the
record carries the answers (``retriable``, ``peer_failure``) and the supervisor reads
them, never the message or the class name. The file format (a contract, also read by
``paddlerun status``): ``rank``, ``pid``, ``host``, ``time``, ``type``, ``message``,
``retriable``, ``peer_failure``, ``traceback``; a missing ``retriable`` reads as true and
a missing ``peer_failure`` as false.
"""
from __future__ import annotations

import json
import os
import socket
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional

from paddlerun.trainer.rundir.atomic_file import write_atomic


class NotRetriable(Exception):
    """Base of the exceptions no restart can fix (a bad config, a factory that does not
    import, a snapshot that does not fit the model): the supervisor gives up at once."""


class PeerFailure(RuntimeError):
    """A collective failed because another rank died or stopped answering: a
    consequence, not a root cause (the survivor may write an emergency snapshot)."""


#: Built-in exceptions that no restart can fix either: a missing module or file.
_NOT_RETRIABLE_BUILTINS = (ImportError, FileNotFoundError)

# Paddle's collectives (gloo) raise a plain RuntimeError when a peer died or stopped
# answering (docs/paddle-behaviour.md#peer-failures); its message is all there is to tell
# that apart, so this is the one place that reads one. Our own gradient sum
# (trainer/shm_reduce.py) raises PeerFailure instead.
_GLOO_PEER_TEXT = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
                   "TIMEOUT", "Timed out", "timed out", "Connection refused")


def is_retriable(exc: BaseException) -> bool:
    return not isinstance(exc, (NotRetriable, *_NOT_RETRIABLE_BUILTINS))


def is_peer_failure(exc: BaseException) -> bool:
    """A collective that failed because of another rank: a consequence, not a root cause."""
    if isinstance(exc, PeerFailure):
        return True
    return isinstance(exc, (RuntimeError, OSError)) and any(t in str(exc) for t in _GLOO_PEER_TEXT)


def peer_failure_in_log(text: str) -> bool:
    """A worker's log tail shows a collective that lost its peer (the process aborted
    in C++, so it wrote no error file: gloo's ``gloo::...`` exceptions, or their text)."""
    return "gloo::" in text or any(t in text for t in (*_GLOO_PEER_TEXT, "peer died", "peer gave up"))


@dataclass(frozen=True)
class ErrorRecord:
    """One worker's error file."""
    rank: int
    time: float
    type: str
    message: str
    retriable: bool = True
    peer_failure: bool = False
    pid: Optional[int] = None
    host: Optional[str] = None
    traceback: str = ""

    @classmethod
    def from_exception(cls, rank: int, exc: BaseException) -> "ErrorRecord":
        return cls(rank=rank, time=time.time(), type=type(exc).__name__, message=str(exc),
                   retriable=is_retriable(exc), peer_failure=is_peer_failure(exc),
                   pid=os.getpid(), host=socket.gethostname(),
                   traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))

    @classmethod
    def from_dict(cls, data: Mapping) -> "ErrorRecord":
        """Raises KeyError/ValueError/TypeError for a record without rank, time or type."""
        return cls(rank=int(data["rank"]), time=float(data["time"]), type=str(data["type"]),
                   message=str(data.get("message", "")),
                   retriable=bool(data.get("retriable", True)),
                   peer_failure=bool(data.get("peer_failure", False)),
                   pid=data.get("pid"), host=data.get("host"),
                   traceback=str(data.get("traceback", "")))


def error_dir(run_dir: Path, attempt: int) -> Path:
    return run_dir / "errors" / f"attempt-{attempt}"


def write_error(run_dir: Path, attempt: int, rank: int, exc: BaseException) -> Path:
    path = error_dir(run_dir, attempt) / f"rank-{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = ErrorRecord.from_exception(rank, exc)
    # Not durable: the supervisor reads it within a second; a dying worker must not wait.
    write_atomic(path, json.dumps(asdict(record), indent=2), durable=False)
    return path


def read_errors(run_dir: Path, attempt: int) -> Dict[int, ErrorRecord]:
    """rank -> error record, for one attempt (unreadable files are skipped)."""
    found = {}
    directory = error_dir(run_dir, attempt)
    for path in sorted(directory.glob("rank-*.json")) if directory.is_dir() else []:
        try:
            record = ErrorRecord.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError, OSError):
            continue
        found[record.rank] = record
    return found


def first_error(run_dir: Path, attempt: int) -> Optional[ErrorRecord]:
    """The earliest error of an attempt: the root cause, not the peers' collective errors."""
    errors = read_errors(run_dir, attempt)
    return min(errors.values(), key=lambda e: e.time) if errors else None
