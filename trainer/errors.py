"""Worker error files: the root cause of a failure, written by the worker that failed.

On an uncaught exception a worker writes ``RUN_DIR/errors/attempt-N/rank-K.json``
with its traceback, so the supervisor can report the first failure by rank and
cause instead of the launcher's generic exit code (docs/conventions.md#errors).
"""
from __future__ import annotations

import json
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Dict, Optional

#: Exception types that no restart can fix; the supervisor gives up on them at once.
#: WriterBusyError: another live job writes the checkpoints directory; a restart would only
#: meet it again (its message names that job's host and pid).
NOT_RETRIABLE = ("ConfigError", "FactoryError", "StateMismatch", "FileNotFoundError",
                 "ModuleNotFoundError", "ImportError", "WriterBusyError")


# What gloo raises in a survivor when a peer died or stopped answering
# (docs/paddle-behaviour.md#peer-failures), and what the shared-memory gradient sum
# raises then (trainer/shm_reduce.py).
PEER_FAILURE_TEXT = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
                      "TIMEOUT", "Timed out", "timed out", "Connection refused", "peer died",
                      "peer gave up")


def is_peer_failure(exc: BaseException) -> bool:
    """A collective that failed because of another rank: a consequence, not a root cause."""
    return isinstance(exc, (RuntimeError, OSError)) and any(t in str(exc) for t in PEER_FAILURE_TEXT)


def error_dir(run_dir: Path, attempt: int) -> Path:
    return run_dir / "errors" / f"attempt-{attempt}"


def write_error(run_dir: Path, attempt: int, rank: int, exc: BaseException) -> Path:
    path = error_dir(run_dir, attempt) / f"rank-{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "rank": rank, "pid": os.getpid(), "host": socket.gethostname(), "time": time.time(),
        "type": type(exc).__name__, "message": str(exc),
        "retriable": type(exc).__name__ not in NOT_RETRIABLE,
        "peer_failure": is_peer_failure(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)
    return path


def read_errors(run_dir: Path, attempt: int) -> Dict[int, dict]:
    """rank -> error record, for one attempt (unreadable files are skipped)."""
    found = {}
    directory = error_dir(run_dir, attempt)
    for path in sorted(directory.glob("rank-*.json")) if directory.is_dir() else []:
        try:
            record = json.loads(path.read_text())
            found[int(record["rank"])] = record
        except (ValueError, KeyError, OSError):
            continue
    return found


def first_error(run_dir: Path, attempt: int) -> Optional[dict]:
    """The earliest error of an attempt: the root cause, not the peers' collective errors."""
    errors = read_errors(run_dir, attempt)
    return min(errors.values(), key=lambda e: e["time"]) if errors else None
