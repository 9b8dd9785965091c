"""Processes an earlier supervisor of the same run directory left running: find them, stop them.

A supervisor that is SIGKILLed (or OOM-killed) cannot tear its tree down. Its workers notice
within a heartbeat interval and exit (trainer/rundir/heartbeat.py), but a rerun started at once, or a
worker that is SIGSTOPped or stuck, would still meet them: two trees training the same job,
the second refused the checkpoint directory (``WriterBusyError``). So before its first attempt
a supervisor looks for live processes whose environment names its run directory (every
process of a launch tree inherits ``PADDLERUN_RUN_DIR``) and whose supervisor
(``PADDLERUN_SUPERVISOR``: pid and start ticks) is gone, and stops them. The second
condition matters: the nodes of a multi-node job (Slurm, Kubernetes) may share one run
directory, and another node's live tree is no leftover.

Supervisor only.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import List

import psutil

from paddlerun.launcher.process_tree import signal_processes
from paddlerun.trainer.rundir import env as worker_env
from paddlerun.trainer.rundir.process_identity import ProcessIdentity, process_table

_POLL_S = 0.05


def find_leftovers(run_dir: Path) -> List[ProcessIdentity]:
    """Live processes of this host whose environment has ``PADDLERUN_RUN_DIR=run_dir`` and
    names a supervisor that is no longer alive (never this process). Processes of other
    users are not readable, hence never found."""
    me, wanted = os.getpid(), str(run_dir)
    found = []
    for identity in sorted(process_table(), key=lambda i: i.pid):
        if identity.pid == me or not identity.alive():
            continue
        try:
            environ = psutil.Process(identity.pid).environ()
        except (psutil.Error, OSError):
            continue
        if environ.get(worker_env.RUN_DIR) != wanted or not _orphaned(environ):
            continue
        if identity.alive():
            found.append(identity)
    return found


def _orphaned(environ) -> bool:
    """The supervisor named in ``environ`` is gone (a process naming none is not ours to stop)."""
    try:
        supervisor = ProcessIdentity.parse(environ[worker_env.SUPERVISOR])
    except (KeyError, ValueError):
        return False
    return not supervisor.alive()


def stop_leftovers(identities: List[ProcessIdentity], term_timeout_s: float,
                   kill_timeout_s: float = 5.0) -> List[ProcessIdentity]:
    """SIGTERM (+ SIGCONT for a stopped one), SIGKILL what is left after ``term_timeout_s``;
    returns the processes that needed SIGKILL. They are not our children: nothing to reap."""
    signal_processes(identities, signal.SIGTERM, signal.SIGCONT)
    survivors = _wait_gone(identities, term_timeout_s)
    if survivors:
        signal_processes(survivors, signal.SIGKILL)
        _wait_gone(survivors, kill_timeout_s)
    return survivors


def _wait_gone(identities: List[ProcessIdentity], timeout_s: float) -> List[ProcessIdentity]:
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [i for i in identities if i.alive()]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(_POLL_S)
