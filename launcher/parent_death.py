"""Start a command so that the kernel signals it when its parent dies (``PR_SET_PDEATHSIG``).

Why: a SIGKILLed supervisor cannot stop its launch process. The workers notice within a
heartbeat interval and exit, and the launcher with them, but a launcher with no worker yet
(waiting in Paddle's rendezvous for another node) would wait forever.

How: the command runs through util-linux ``setpriv --pdeathsig SIG --``, which sets the
signal and execs the command in place: same pid, same start time, same environment, so the
launch process's identity, the tree's marker and ``PADDLERUN_RUN_DIR`` (leftovers.py) are
those of the launch process itself. Not ``preexec_fn``: running Python between fork and
exec is unsafe in a process with threads, and the supervisor has some (etcd membership,
spot watch).

The kernel sends the signal when the *thread* that forked the child exits, not the
process: start the command from a thread that lives as long as the process.

Without ``setpriv``, or with one older than util-linux 2.33 (no ``--pdeathsig``), the
command runs as it is, and one warning says so.

Supervisor only.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import shutil
import signal
import subprocess
from typing import List, Optional

log = logging.getLogger("paddlerun.supervisor")


def command(argv: List[str], sig: int, path: Optional[str] = None, cwd: Optional[str] = None) -> List[str]:
    """``argv`` behind ``setpriv --pdeathsig SIG --`` where that works, else ``argv`` itself.

    Raises ``FileNotFoundError`` if ``argv[0]`` is not an executable (looked up in ``path``,
    the child's ``PATH``), as starting it directly would: behind setpriv the failure would
    be an exit code 127 of an attempt instead of an error at its start.
    """
    wrapper = setpriv()
    if wrapper is None:
        return list(argv)
    program = argv[0]
    if os.sep in program and cwd is not None:
        program = os.path.join(cwd, program)
    if shutil.which(program, path=path if path is not None else os.defpath) is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), argv[0])
    return [wrapper, "--pdeathsig", signal.Signals(sig).name, "--", *argv]


@functools.lru_cache(maxsize=None)
def setpriv() -> Optional[str]:
    """The path of a ``setpriv`` that has ``--pdeathsig``, or None (warned about once)."""
    found = shutil.which("setpriv")
    if found is None:
        log.warning("setpriv (util-linux) not found: if paddlerun is killed, a launcher that "
                    "waits for another node keeps waiting until the next run stops it")
        return None
    try:
        usage = subprocess.run([found, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        usage = ""
    if "--pdeathsig" not in usage:
        log.warning("%s has no --pdeathsig (util-linux < 2.33): if paddlerun is killed, a launcher "
                    "that waits for another node keeps waiting until the next run stops it", found)
        return None
    return found
