"""Preemption signals that arrive while paddlerun starts up are kept, not fatal.

A scheduler may send its SIGTERM at any moment, also in the first second of a job, while
the config loads and before the supervisor watches for signals: Python's default action
would end paddlerun with no snapshot question asked and no exit 75, which Slurm counts as
a failure (seen in a chaos run: a rerun SIGTERMed while it started exited -15). The CLI
holds them from its first line; the supervisor takes them over with :func:`take`.
"""
from __future__ import annotations

import signal
from typing import List

#: The default ``supervisor.preempt_signals`` and SIGINT.
HELD = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

_pending: List[int] = []


def hold() -> None:
    for sig in HELD:
        signal.signal(sig, lambda signum, frame: _pending.append(signum))


def take() -> List[int]:
    """The signals held so far (the supervisor installs its own handlers first)."""
    taken = list(_pending)
    _pending.clear()
    return taken
