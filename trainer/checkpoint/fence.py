"""The generation fence: ``.generation`` in a checkpoints directory.

An elastic job restarts its workers as a new *generation* (a number that only grows)
whenever its nodes change. Before a new generation's workers start, its supervisor
raises the fence to that number (``CheckpointStore.raise_fence``); a commit that names
an older generation is refused under the same ``.lock`` (``CheckpointStore.commit``). So
a worker of an older generation that is still alive -- its node cut off, its stop not
yet delivered -- can never publish a snapshot once a newer generation has started.

The file (written atomically and durably; absent means 0, no fence)::

    {"generation": 3, "raised_at": 1764880000.5, "by": {"host": "node-1", "pid": 4242}}

Call these under the directory's ``.lock``: the store does.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from .atomic import replace_file
from .errors import CheckpointError


def check_generation(generation: object) -> int:
    if not isinstance(generation, int) or isinstance(generation, bool) or generation < 0:
        raise ValueError(f"a generation must be an int >= 0, got {generation!r}")
    return generation


def read(path: Path) -> int:
    """The generation in force at ``path``; 0 when no fence was ever raised."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    try:
        generation = json.loads(data)["generation"]
        return check_generation(generation)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"the generation fence {path} is unreadable ({type(exc).__name__}: {exc}). Only an "
            f"elastic job's supervisor writes it, atomically: something else changed it. Write "
            f'{{"generation": N}} with the job\'s current generation N, or delete it if no '
            f"elastic job uses this directory.", path) from exc


def write(path: Path, generation: int) -> None:
    """Set the fence to ``generation`` (the caller checked it only goes up)."""
    record = {"generation": check_generation(generation), "raised_at": time.time(),
              "by": {"host": socket.gethostname(), "pid": os.getpid()}}
    replace_file(path, (json.dumps(record) + "\n").encode())
