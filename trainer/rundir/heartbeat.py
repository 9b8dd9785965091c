"""Worker heartbeats: ``RUN_DIR/heartbeats/rank-K.json``, and the rule that calls a rank hung.

Writer (every worker rank): :class:`HeartbeatWriter`. A daemon thread rewrites the
rank's file every ``interval_s``; the training loop only calls :meth:`~HeartbeatWriter.beat`
(sets one attribute: no I/O on the step path).

The same thread watches the supervisor (``supervisor=``, from the worker's environment):
when it is gone -- SIGKILLed, OOM-killed -- the worker exits within one interval, so that
no job trains unsupervised, holds the checkpoint directory, or keeps a rerun from starting.
(``PR_SET_PDEATHSIG`` cannot do this: the workers are children of paddle's launcher, in
sessions of their own, not of the supervisor.) The exit is abrupt, like a crash: the rerun
resumes from the newest complete snapshot.

Reader (supervisor): :func:`read_heartbeats` + :func:`stale_ranks`.
Peers (a worker after a collective failed): :func:`lowest_live_rank`.

Two clocks in one file, because one is not enough:

``time``
    when the file was written. The thread stops writing when the whole process
    stops: it died, was SIGSTOPped, or is frozen holding the GIL.
``step_time``
    when the main thread last made progress (its last ``beat`` / ``set_phase``).
    The thread keeps beating while the main thread hangs in a collective, so file
    age alone would never notice that hang.

The staleness rule (:func:`stale_ranks`), one timeout for everything:

* a rank whose file is older than ``hang_timeout_s`` is stale ("no heartbeat");
* a rank whose ``step_time`` is older than ``hang_timeout_s`` is stale ("no
  progress"), in every phase -- ``init`` (import paddle, the first collective),
  ``train``, ``eval``, ``checkpoint``. Long phases are covered by the worker
  calling ``beat`` at sub-step points (every eval batch, after each checkpoint
  file) rather than by a longer timeout that would also delay finding real
  hangs. A caller that knows a phase is slower (a first rendezvous waiting for
  other nodes) passes ``phase_timeouts={"init": 300}``;
* ``done`` is never stale: the rank finished and may exit; the process exit is
  what counts from then on.

A rank that never wrote a file is not in the result: the supervisor compares the
ranks it reads with the world size it expects (a start timeout is its policy).
Times are ``time.time()`` of the writing host: compare them on the same host (or
with synchronised clocks).
"""
from __future__ import annotations

import json
import math
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

from paddlerun.trainer.rundir.process_identity import ProcessIdentity

from paddlerun.trainer.rundir.atomic_file import write_atomic

__all__ = [
    "PHASES",
    "Heartbeat",
    "HeartbeatWriter",
    "NO_HEARTBEAT",
    "clear_heartbeats",
    "heartbeat_path",
    "lowest_live_rank",
    "read_heartbeats",
    "stale_ranks",
]

PHASES = frozenset({"init", "train", "eval", "checkpoint", "done", "stopped"})
#: The last heartbeat of a worker that exits on purpose: ``done`` (training finished) or
#: ``stopped`` (an agreed stop request -- a preemption on this node or another -- after
#: its snapshot: the run is not finished, and the supervisor exits with the requeue code).
ENDED_PHASES = frozenset({"done", "stopped"})
#: How :func:`stale_ranks` starts the reason of a rank whose heartbeat stopped (the
#: process is dead or stopped), as opposed to one whose training stopped progressing.
NO_HEARTBEAT = "no heartbeat"

#: A worker's exit code when it stopped because its supervisor was gone.
SUPERVISOR_GONE_EXIT_CODE = 3

_PREFIX = "rank-"
_SUFFIX = ".json"
# Temporary files start with a dot so that no reader globbing rank-*.json sees them.
_TMP_PREFIX = ".rank-"

PathLike = Union[str, "os.PathLike[str]"]


def heartbeat_path(directory: PathLike, rank: int) -> Path:
    return Path(directory) / f"{_PREFIX}{int(rank)}{_SUFFIX}"


def _check_phase(phase: str) -> str:
    if phase not in PHASES:
        raise ValueError(f"heartbeat phase {phase!r} is not one of {sorted(PHASES)}")
    return phase


@dataclass(frozen=True)
class Heartbeat:
    """One rank's last heartbeat file, as read by the supervisor."""

    rank: int
    pid: int
    #: When ``pid`` started, in clock ticks since boot: with it, a reused pid is told
    #: apart (trainer/rundir/process_identity.py says why not a wall-clock create time).
    start_ticks: int
    step: int
    #: When the file was written (the writer thread: the process is alive and not stopped).
    time: float
    #: When the main thread last made progress (``beat`` / ``set_phase``).
    step_time: float
    attempt: int
    host: str
    phase: str

    @property
    def identity(self) -> ProcessIdentity:
        return ProcessIdentity(self.pid, self.start_ticks)

    def age(self, now: float) -> float:
        return now - self.time

    @property
    def ended(self) -> bool:
        """The worker said it exits on purpose (see :data:`ENDED_PHASES`)."""
        return self.phase in ENDED_PHASES

    def progress_age(self, now: float) -> float:
        return now - self.step_time

    @classmethod
    def from_dict(cls, data: Mapping) -> "Heartbeat":
        """Raises ValueError/TypeError/KeyError if a field is missing or of the wrong type."""
        def integer(key: str) -> int:
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{key} must be an int, not {value!r}")
            return value

        def number(key: str) -> float:
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise TypeError(f"{key} must be a finite number, not {value!r}")
            return float(value)

        host = data["host"]
        if not isinstance(host, str):
            raise TypeError(f"host must be a string, not {host!r}")
        return cls(
            rank=integer("rank"), pid=integer("pid"), start_ticks=integer("start_ticks"),
            step=integer("step"), time=number("time"), step_time=number("step_time"),
            attempt=integer("attempt"), host=host, phase=_check_phase(data["phase"]),
        )


class HeartbeatWriter:
    """Keeps ``directory/rank-K.json`` fresh from a daemon thread. Every worker rank.

    ::

        hb = HeartbeatWriter(run_dir / "heartbeats", rank, interval_s=1.0, attempt=attempt).start()
        for step in ...:
            hb.beat(step)                     # O(1), no I/O
        hb.set_phase("checkpoint"); ...; hb.beat(step, "checkpoint")
        hb.stop()                             # phase "done"

    ``beat``, ``set_phase`` and ``stop`` are called from the training (main) thread.
    Start it before ``import paddle`` so that a slow import shows as phase ``init``.
    """

    def __init__(self, directory: PathLike, rank: int, interval_s: float, attempt: int = 0,
                 supervisor: Optional[ProcessIdentity] = None):
        if not interval_s > 0:
            raise ValueError(f"heartbeat interval_s must be > 0, got {interval_s!r}")
        self.directory = Path(directory)
        self.rank = int(rank)
        self.interval_s = float(interval_s)
        self.attempt = int(attempt)
        self.path = heartbeat_path(self.directory, self.rank)
        self._pid = os.getpid()
        self._start_ticks = ProcessIdentity.me().start_ticks
        self._host = socket.gethostname()
        # (step, phase, step_time), replaced as a whole: one reference assignment,
        # atomic under the GIL, so the thread never sees a torn combination.
        self._progress = (0, "init", time.time())
        self._stop_event = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._warned = False
        self._supervisor = supervisor

    # ---------------------------------------------------------- main thread

    def start(self) -> "HeartbeatWriter":
        """Write the first heartbeat now, then keep writing from a daemon thread."""
        if self._thread is not None:
            raise RuntimeError(f"heartbeat writer for rank {self.rank} already started")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._progress = (self._progress[0], self._progress[1], time.time())
        self._write()
        self._thread = threading.Thread(
            target=self._run, name=f"paddlerun-heartbeat-rank{self.rank}", daemon=True)
        self._thread.start()
        return self

    def beat(self, step: int, phase: str = "train") -> None:
        """The main thread made progress (a step, or a point inside a long phase)."""
        if phase not in PHASES:
            _check_phase(phase)
        # int(): a numpy/paddle integer would make the JSON dump in the thread fail.
        self._progress = (int(step), phase, time.time())

    def set_phase(self, phase: str) -> None:
        """Enter ``phase`` at the current step; counts as progress."""
        _check_phase(phase)
        self._progress = (self._progress[0], phase, time.time())

    @property
    def step(self) -> int:
        return self._progress[0]

    @property
    def phase(self) -> str:
        return self._progress[1]

    def stop(self, phase: str = "done") -> None:
        """Stop the thread (bounded join) and write a last heartbeat with ``phase``."""
        _check_phase(phase)
        self._progress = (self._progress[0], phase, time.time())
        self._stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.interval_s))
        self._write()

    def __enter__(self) -> "HeartbeatWriter":
        return self.start() if self._thread is None else self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an exception keep the phase: the process is about to fail, and its
        # exit -- not a "done" heartbeat -- is what the supervisor should see.
        self.stop("done" if exc_type is None else self.phase)

    # ------------------------------------------------------------- thread

    def _run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            if self._supervisor is not None and not self._supervisor.alive():
                self._supervisor_gone()
            self._write()

    def _supervisor_gone(self) -> None:
        """Exit this process now: nobody supervises it any more (see the module docstring)."""
        try:
            sys.stderr.write(
                f"paddlerun: rank {self.rank} (pid {self._pid}): its supervisor, pid "
                f"{self._supervisor.pid}, is gone; this worker stops so that nothing trains "
                f"unsupervised. Run the same command again: it resumes from the newest snapshot.\n")
            sys.stderr.flush()
        finally:
            os._exit(SUPERVISOR_GONE_EXIT_CODE)

    def _write(self) -> None:
        step, phase, step_time = self._progress
        record = {
            "rank": self.rank, "pid": self._pid, "start_ticks": self._start_ticks,
            "step": step, "time": time.time(), "step_time": step_time,
            "attempt": self.attempt, "host": self._host, "phase": phase,
        }
        data = json.dumps(record).encode()
        try:
            self._replace(data)
        except FileNotFoundError:  # the directory was removed under us: recreate once
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._replace(data)
            except OSError as exc:
                self._warn(exc)
        except OSError as exc:
            self._warn(exc)

    def _replace(self, data: bytes) -> None:
        # Not durable: a heartbeat is liveness -- after a crash of the machine nobody
        # needs the last one, and an fsync every interval would cost a disk flush.
        write_atomic(self.path, data, durable=False)

    def _warn(self, exc: OSError) -> None:
        # Keep beating (the next write may work); say so once, not every interval.
        if not self._warned:
            self._warned = True
            print(f"paddlerun: rank {self.rank}: cannot write heartbeat {self.path}: {exc}",
                  file=sys.stderr)


# ------------------------------------------------------------------ reader


def read_heartbeats(directory: PathLike, attempt: Optional[int] = None) -> Dict[int, Heartbeat]:
    """All valid ``rank-K.json`` files in ``directory`` by rank; supervisor.

    Missing directory -> ``{}``. Unreadable, partial or invalid files, and files
    whose content names another rank than their file name, are skipped. With
    ``attempt``, heartbeats of other attempts are skipped too.
    """
    directory = Path(directory)
    beats: Dict[int, Heartbeat] = {}
    try:
        entries = list(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return beats
    for path in entries:
        name = path.name
        if not (name.startswith(_PREFIX) and name.endswith(_SUFFIX)):
            continue
        try:
            file_rank = int(name[len(_PREFIX):-len(_SUFFIX)])
            with open(path, "rb") as f:
                beat = Heartbeat.from_dict(json.loads(f.read()))
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            continue
        if beat.rank != file_rank or (attempt is not None and beat.attempt != attempt):
            continue
        beats[beat.rank] = beat
    return beats


def stale_ranks(
    beats: Mapping[int, Heartbeat],
    now: float,
    hang_timeout_s: float,
    phase_timeouts: Optional[Mapping[str, float]] = None,
) -> Dict[int, str]:
    """Ranks that look hung, with a reason a human can act on; supervisor.

    See the module docstring for the rule. ``phase_timeouts`` overrides
    ``hang_timeout_s`` for the phases it names. Take ``now = time.time()``
    *before* reading the files, so that a slow read can only make ages smaller.
    """
    stale: Dict[int, str] = {}
    for rank in sorted(beats):
        hb = beats[rank]
        if hb.ended:
            continue
        timeout = hang_timeout_s
        if phase_timeouts and hb.phase in phase_timeouts:
            timeout = phase_timeouts[hb.phase]
        where = f"at step {hb.step}, phase {hb.phase} (pid {hb.pid} on {hb.host})"
        if hb.age(now) > timeout:
            stale[rank] = (
                f"{NO_HEARTBEAT} for {hb.age(now):.1f} s {where}: "
                f"the process is dead, stopped (SIGSTOP) or frozen")
        elif hb.progress_age(now) > timeout:
            stale[rank] = (
                f"no progress for {hb.progress_age(now):.1f} s {where}: "
                f"the process is alive but its training thread is stuck "
                f"(a collective waiting for a peer?)")
    return stale


def lowest_live_rank(directory: PathLike, my_rank: int, remote_fresh_s: float = 10.0) -> int:
    """The lowest rank that is still alive, by the heartbeat files; worker side.

    For a worker whose collective just failed because a peer died, to agree
    without communicating on who writes an emergency snapshot. ``my_rank`` is
    always alive. A rank on this host counts if its ``(pid, start_ticks)`` is
    still a live process (not a zombie); a rank on another host, which cannot be
    checked that way, if its file was written within ``remote_fresh_s``. Ranks in
    phase ``done`` and heartbeats of another attempt than ``my_rank``'s own are
    left out. Best effort: a peer dying at this very moment may still count as
    alive, so that at worst nobody writes the emergency snapshot -- never two.
    (Two can only happen if clocks or files lie.)
    """
    now = time.time()
    beats = read_heartbeats(directory)
    mine = beats.get(my_rank)
    host = socket.gethostname()
    live = {int(my_rank)}
    for rank, hb in beats.items():
        if rank == my_rank or hb.ended:
            continue
        if mine is not None and hb.attempt != mine.attempt:
            continue
        if hb.host == host:
            alive = hb.identity.alive()
        else:
            alive = now - hb.time <= remote_fresh_s
        if alive:
            live.add(rank)
    return min(live)


def clear_heartbeats(directory: PathLike) -> None:
    """Delete every heartbeat (and leftover temporary) file; supervisor, before an attempt.

    Creates ``directory`` if missing. Call it only after the previous attempt's
    processes are gone, or a surviving writer will simply write its file again.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for path in directory.iterdir():
        name = path.name
        if (name.startswith(_PREFIX) and name.endswith(_SUFFIX)) or (
                name.startswith(_TMP_PREFIX) and name.endswith(".tmp")):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except IsADirectoryError:
                continue
