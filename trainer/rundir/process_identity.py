"""Is this still the same process? A pid plus its start time since boot, and signals by pidfd.

A pid alone names a process only until it exits: the kernel gives the number to the next
process. So paddlerun names a process by ``(pid, start_ticks)``, where ``start_ticks`` is
field 22 of ``/proc/PID/stat``: when the process started, in clock ticks *since boot*.
That number never changes for a process and never moves with the wall clock.

Not psutil's ``create_time()``: it is ``btime + start_ticks / HZ``, and ``btime`` (from
``/proc/stat``) is the wall clock minus the time since boot, so an NTP or chrony step
moves the create time of every process already running. A 10 ms comparison of create
times then calls every live worker "pid reused" (psutil >= 7.0.1 no longer caches btime).

Signals go through a pidfd where the kernel has them (Linux >= 5.3): the pidfd is opened,
then the identity is checked, so the descriptor surely refers to the process we mean; a
signal through it can never reach a process that later got the same pid. Elsewhere, the
identity is checked just before ``kill`` (a window of microseconds instead of forever).

Used by the supervisor and by workers (heartbeats, the supervisor watch); no paddle.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Dict, Optional

__all__ = ["ProcessHandle", "ProcessIdentity", "TICKS_PER_S", "process_table", "ticks_now"]

#: Where the kernel's process table is read (tests point it at a copy with a stepped clock).
PROC = "/proc"
#: /proc/PID/stat counts in clock ticks (USER_HZ, 100 on every Linux in use).
TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

_DEAD_STATES = {"Z", "X", "x"}  # zombie, dead


def _stat_fields(pid: int) -> Optional[list]:
    """``/proc/PID/stat`` from field 3 (state) on: the command name may hold spaces and
    parentheses, so split after its last ``)``. None if there is no such process."""
    try:
        with open(f"{PROC}/{int(pid)}/stat", "rb") as f:
            data = f.read()
    except (OSError, ValueError):
        return None
    fields = data.rsplit(b")", 1)[-1].split()
    return fields if len(fields) > 19 else None


def ticks_now() -> int:
    """Now, on the clock ``start_ticks`` counts on (CLOCK_BOOTTIME, in clock ticks)."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * TICKS_PER_S)


@dataclass(frozen=True)
class ProcessIdentity:
    """One process, for as long as it lives: its pid and its start time in ticks since boot."""
    pid: int
    start_ticks: int

    @classmethod
    def of(cls, pid: int) -> Optional["ProcessIdentity"]:
        """The process that has ``pid`` now (zombies included); None if there is none."""
        fields = _stat_fields(pid)
        return None if fields is None else cls(int(pid), int(fields[19]))

    @classmethod
    def me(cls) -> "ProcessIdentity":
        identity = cls.of(os.getpid())
        if identity is None:
            raise RuntimeError(f"cannot read {PROC}/{os.getpid()}/stat: is /proc mounted?")
        return identity

    @classmethod
    def parse(cls, text: str) -> "ProcessIdentity":
        """From :meth:`__str__`'s ``"PID:START_TICKS"`` (an environment variable); ValueError if not."""
        pid, _, ticks = str(text).partition(":")
        identity = cls(int(pid), int(ticks))
        if identity.pid <= 0 or identity.start_ticks < 0:
            raise ValueError(f"not a process identity: {text!r} (want PID:START_TICKS)")
        return identity

    def __str__(self) -> str:
        return f"{self.pid}:{self.start_ticks}"

    def exists(self) -> bool:
        """This very process is still in the process table (perhaps a zombie, not reaped yet)."""
        fields = _stat_fields(self.pid)
        return fields is not None and int(fields[19]) == self.start_ticks

    def alive(self) -> bool:
        """This very process still runs (or is stopped): not gone, not a zombie, not another
        process that was given the same pid."""
        fields = _stat_fields(self.pid)
        return fields is not None and int(fields[19]) == self.start_ticks \
            and fields[0].decode() not in _DEAD_STATES

    def parent(self) -> Optional[int]:
        """The parent's pid, while this process exists; else None."""
        fields = _stat_fields(self.pid)
        return int(fields[1]) if fields is not None and int(fields[19]) == self.start_ticks else None

    def open(self) -> Optional["ProcessHandle"]:
        """A handle that signals this process and no other; None if it is gone already."""
        fd = None
        if hasattr(os, "pidfd_open"):
            try:
                fd = os.pidfd_open(self.pid)
            except ProcessLookupError:
                return None
            except OSError:  # no pidfds here (ENOSYS, EPERM in a sandbox) or out of descriptors
                fd = None
        # Checked after the pidfd was opened: if it is still our process now, the pidfd is its.
        if not self.exists():
            if fd is not None:
                os.close(fd)
            return None
        return ProcessHandle(self, fd)

    def send_signal(self, sig: int) -> bool:
        """Send ``sig`` to this process if it still exists; True if it was sent."""
        handle = self.open()
        if handle is None:
            return False
        with handle:
            return handle.send_signal(sig)


class ProcessHandle:
    """A process to signal, held by pidfd where possible (see the module docstring).
    Close it (or use ``with``): each holds a descriptor."""

    def __init__(self, identity: ProcessIdentity, pidfd: Optional[int]):
        self.identity = identity
        self._fd = pidfd

    def send_signal(self, sig: int) -> bool:
        """True if sent; False if the process is gone (or no longer ours to signal)."""
        try:
            if self._fd is not None:
                signal.pidfd_send_signal(self._fd, sig)
            elif self.identity.exists():
                os.kill(self.identity.pid, sig)
            else:
                return False
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "ProcessHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def process_table() -> Dict[ProcessIdentity, int]:
    """Every process (zombies included) with its parent's pid, from one pass over /proc."""
    table: Dict[ProcessIdentity, int] = {}
    try:
        names = os.listdir(PROC)
    except OSError:
        return table
    for name in names:
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is not None:
            table[ProcessIdentity(int(name), int(fields[19]))] = int(fields[1])
    return table
