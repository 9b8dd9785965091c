"""Sleep until a watched process exits, or a timeout: how the supervisor waits between checks.

Polling every 0.1 s for dead workers cost the supervisor ~0.8 % of a core (measured) and
woke it 10 times a second on machines whose cores are all training, where every wake-up
delays a worker and, through the next collective, all of them. A pidfd (Linux >= 5.3)
becomes readable the moment its process exits, so the supervisor can sleep in
``poll()`` for its slower periodic checks (heartbeats, the console) and still wake at
once for a death. Without pidfds (other kernels and systems) it falls back to waking
every ``fallback_s``.

A signal wakes it too (:meth:`wake_on_signals`): Python retries ``poll()`` after a
handler runs (PEP 475), so without a wake-up descriptor a preemption signal would wait
out the rest of the sleep.
"""
from __future__ import annotations

import errno
import os
import select
import signal
from typing import Dict, Optional, Tuple

from paddlerun.trainer.rundir.process_identity import ProcessIdentity


class ExitWatch:
    def __init__(self, fallback_s: float):
        self.fallback_s = fallback_s
        self._fds: Dict[ProcessIdentity, Optional[int]] = {}  # None: exited already, or no pidfd for it
        self.supported = hasattr(os, "pidfd_open")
        self._wakeup: Optional[Tuple[int, int]] = None  # (read end, write end) of a pipe
        self._previous_wakeup = -1

    def watch(self, identity: ProcessIdentity) -> None:
        """Wake :meth:`sleep` when this process exits. A process that has exited already
        (or whose pid now names another) is not watched: the caller's own checks see it
        (the watch only makes them sooner)."""
        key = identity
        if key in self._fds:
            return
        fd = None
        if self.supported:
            try:
                fd = os.pidfd_open(identity.pid)
                if not identity.alive():  # opened on a reused pid, or it is a zombie already
                    os.close(fd)
                    fd = None
            except OSError as exc:
                if exc.errno in (errno.ENOSYS, errno.EPERM):  # no pidfds here: poll instead
                    self.supported = False
                # else (gone already, out of descriptors, ...): that one is left to the checks
            except (OverflowError, ValueError):  # not a pid at all
                pass
        self._fds[key] = fd

    def wake_on_signals(self) -> None:
        """End :meth:`sleep` as soon as any signal with a Python handler arrives (main
        thread only, like ``signal.signal``); :meth:`close` undoes it."""
        if self._wakeup is None:
            self._wakeup = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._previous_wakeup = signal.set_wakeup_fd(self._wakeup[1], warn_on_full_buffer=False)

    def sleep(self, timeout_s: float) -> bool:
        """Up to ``timeout_s``, or until a signal (see :meth:`wake_on_signals`); True if a
        watched process exited meanwhile (it is then no longer watched, so the next call
        sleeps again)."""
        watched = [fd for fd in self._fds.values() if fd is not None] if self.supported else []
        if not watched:  # nothing can wake us for a death: wake up to look
            timeout_s = min(timeout_s, self.fallback_s)
        poller = select.poll()  # not select(): no limit on descriptor numbers
        for fd in watched + ([self._wakeup[0]] if self._wakeup else []):
            poller.register(fd, select.POLLIN)
        ready = {fd for fd, _ in poller.poll(timeout_s * 1000)}
        if self._wakeup and self._wakeup[0] in ready:
            _drain(self._wakeup[0])
        exited = False
        for key, fd in list(self._fds.items()):
            if fd is not None and fd in ready:
                os.close(fd)
                self._fds[key] = None
                exited = True
        return exited

    def forget(self) -> None:
        """Stop watching every process (a new attempt watches its own); signals still wake."""
        for fd in self._fds.values():
            if fd is not None:
                os.close(fd)
        self._fds.clear()

    def close(self) -> None:
        self.forget()
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            for fd in self._wakeup:
                os.close(fd)
            self._wakeup = None


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass
