"""Signals inside a worker.

A scheduler that preempts a job (Slurm, Kubernetes) may send SIGTERM to every
process, workers included. The first SIGTERM asks for a snapshot at the next
agreement point, like the supervisor's stop request; a second one ends the
process at once, as SIGTERM normally would -- unless it comes within
:data:`REPEAT_WINDOW_S` of the first: Slurm signals every process of a step, and
Paddle's launcher, signalled too, passes a SIGTERM of its own on to every worker a
moment later (measured: milliseconds). That is the same notice, not an operator
insisting.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager

#: A SIGTERM this soon after the first is the first one relayed (see the module docstring).
REPEAT_WINDOW_S = 2.0

_stop = threading.Event()
_ignoring = threading.Event()
_first_at = [0.0]  # time.monotonic() of the first SIGTERM


def install_stop_handler() -> None:
    """Main thread, after ``import paddle`` (paddle installs a SIGTERM handler of its own)."""
    signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum, frame) -> None:
    if _ignoring.is_set():
        return
    if _stop.is_set():
        if time.monotonic() - _first_at[0] < REPEAT_WINDOW_S:
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    _first_at[0] = time.monotonic()
    _stop.set()


def stop_signalled() -> bool:
    return _stop.is_set()


@contextmanager
def ignoring_sigterm():
    """While an emergency snapshot is written, the launcher's SIGTERM must not cut it short."""
    _ignoring.set()
    try:
        yield
    finally:
        _ignoring.clear()
