"""Signals inside a worker.

A scheduler that preempts a job (Slurm, Kubernetes) may send SIGTERM to every
process, workers included. The first SIGTERM asks for a snapshot at the next
agreement point, like the supervisor's stop request; a second one ends the
process at once, as SIGTERM normally would.
"""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager

_stop = threading.Event()
_ignoring = threading.Event()


def install_stop_handler() -> None:
    """Main thread, after ``import paddle`` (paddle installs a SIGTERM handler of its own)."""
    signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum, frame) -> None:
    if _ignoring.is_set():
        return
    if _stop.is_set():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
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
