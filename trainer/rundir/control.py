"""The supervisor's one request to running workers: "snapshot at the next step boundary and stop".

A file, not a signal: a signal would kill a user's script that installs no handler,
and a file works the same for paddlerun's worker and for script mode. Every rank
looks for its node's file at its agreement points (every ``train.log_every_steps``;
script mode: every 10 steps) and all ranks agree (one asked: all stop), see
``trainer/agreement.py`` -- so one node's preemption notice stops a multi-node job
cleanly. Workers that get SIGTERM themselves (a scheduler signalling every process)
raise the same request.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from paddlerun.trainer.rundir.atomic_file import write_atomic

STOP_FILE = Path("control") / "stop.json"


def request_stop(run_dir: Path, reason: str) -> None:
    """Supervisor only."""
    path = Path(run_dir) / STOP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not durable: it speaks to workers running now; after a machine crash nobody is.
    write_atomic(path, json.dumps({"reason": reason, "time": time.time(), "pid": os.getpid()}),
                 durable=False)


def stop_requested(run_dir: Path) -> bool:
    return (Path(run_dir) / STOP_FILE).exists()


def clear(run_dir: Path) -> None:
    """Supervisor only, before an attempt starts."""
    try:
        (Path(run_dir) / STOP_FILE).unlink()
    except FileNotFoundError:
        pass
