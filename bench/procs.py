"""Stopping a benchmark's child: a launcher or supervisor whose workers live in their own sessions."""
import os
import signal
import subprocess


def stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the child's process group, then SIGKILL it after ``grace_s``; reap it.

    SIGTERM first because ``paddle.distributed.launch`` starts every worker with setsid:
    a SIGKILLed launcher (or paddlerun supervisor) cannot stop its workers, which then
    train on as orphans. On SIGTERM both stop them before they exit.
    """
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
