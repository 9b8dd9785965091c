"""ExitWatch wakes the moment a watched process exits, and only then."""
import os
import subprocess
import sys
import time

import pytest

from paddlerun.launcher.exit_watch import ExitWatch
from paddlerun.trainer.rundir.process_identity import ProcessIdentity

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="no pidfds on this system")


def sleeper(seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])


def test_an_exit_wakes_it_at_once_and_the_next_sleep_is_a_sleep_again():
    quick, slow = sleeper(0.3), sleeper(60)
    watch = ExitWatch(fallback_s=0.1)
    try:
        watch.watch(ProcessIdentity.of(quick.pid))
        watch.watch(ProcessIdentity.of(slow.pid))
        started = time.monotonic()
        assert watch.sleep(30) is True
        assert 0.2 < time.monotonic() - started < 10, "woken by the exit, not the timeout"
        started = time.monotonic()
        assert watch.sleep(0.5) is False  # the exited one is not watched any more
        assert time.monotonic() - started >= 0.45
    finally:
        watch.close()
        for p in (quick, slow):
            p.kill()
            p.wait(timeout=10)


def test_a_process_gone_before_it_is_watched_is_left_to_the_callers_checks():
    gone = sleeper(0)
    gone.wait(timeout=30)
    pid = gone.pid  # reaped: no such process any more (unless reused, which is harmless)
    watch = ExitWatch(fallback_s=0.1)
    watch.watch(ProcessIdentity(pid, 0))
    assert watch.supported, "a gone process is no reason to stop using pidfds"
    started = time.monotonic()
    assert watch.sleep(0.3) is False
    assert time.monotonic() - started < 5
    watch.close()


def test_without_pidfds_it_wakes_every_fallback_period():
    proc = sleeper(60)
    watch = ExitWatch(fallback_s=0.05)
    watch.supported = False
    try:
        watch.watch(ProcessIdentity.of(proc.pid))
        started = time.monotonic()
        assert watch.sleep(10) is False
        assert time.monotonic() - started < 1
    finally:
        watch.close()
        proc.kill()
        proc.wait(timeout=10)


def test_a_signal_ends_the_sleep_at_once_and_close_restores_the_wakeup_fd():
    """Python retries poll() after a signal handler (PEP 475): without the wake-up pipe a
    preemption signal would wait out the whole sleep."""
    import signal
    import threading

    proc = sleeper(60)
    received = []
    previous_handler = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    watch = ExitWatch(fallback_s=0.1)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1))
    try:
        watch.wake_on_signals()
        watch.forget()  # as the supervisor does at every attempt's start
        watch.watch(ProcessIdentity.of(proc.pid))
        timer.start()
        started = time.monotonic()
        assert watch.sleep(30) is False  # woken, but no watched process exited
        assert time.monotonic() - started < 10, "the signal ended the sleep"
        assert received == [signal.SIGUSR1]
        started = time.monotonic()
        assert watch.sleep(0.3) is False  # the pipe was drained: a sleep again
        assert time.monotonic() - started >= 0.25
    finally:
        timer.cancel()
        watch.close()
        signal.signal(signal.SIGUSR1, previous_handler)
        proc.kill()
        proc.wait(timeout=10)
    assert signal.set_wakeup_fd(-1) == -1, "close() put back the previous wake-up fd (none)"
