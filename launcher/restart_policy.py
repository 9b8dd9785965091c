"""When to restart a failed attempt, after how long, and when to give up.

Pure policy: it sees the history of failures and answers; it starts nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional, Sequence

from paddlerun.trainer.rundir.config import SupervisorConfig

#: Consecutive attempts that fail the same way before their first step: the fault is
#: in the job (a bad import, a broken install), not the machine; restarting won't help.
NO_PROGRESS_LIMIT = 2
#: The error a worker reports when another live process holds the checkpoint directory's
#: writer claim (trainer/checkpoint/errors.py).
WRITER_BUSY = "WriterBusyError"


class FailureKind(str, Enum):
    """How an attempt failed, as the root cause says (``kind`` in events and summary.json).

    ERROR        a worker raised: its error file has the exception and traceback
    WORKER_DIED  a worker process died (a signal, or an exit the launcher reported with a
                 negative code) without an error file
    WORKER_EXIT  the launcher reported a worker that exited non-zero, no error file
    HANG         a worker's heartbeat or progress stopped for longer than the timeout
    LAUNCH_EXIT  the launch process exited (or could not start) and nothing else explains it
    JOB_LOST     an earlier start of the scheduler's job ended without its supervisor's last
                 word (node failure, SIGKILL, hard requeue): seen by the next start
    TOO_FEW_NODES  elastic: fewer than MIN nodes (or no etcd) to form a generation in time
    PEER_MISSING   fixed-size multi-node: a node never joined the launcher's rendezvous
                   within the start timeout (not retried: a restart would wait for it again)
    """
    ERROR = "error"
    WORKER_DIED = "worker_died"
    WORKER_EXIT = "worker_exit"
    HANG = "hang"
    LAUNCH_EXIT = "launch_exit"
    JOB_LOST = "job_lost"
    TOO_FEW_NODES = "too_few_nodes"
    PEER_MISSING = "peer_missing"


@dataclass(frozen=True)
class Failure:
    """One failed attempt, root cause first (the supervisor's report names all of it)."""
    attempt: int
    time: float
    kind: FailureKind
    cause: str
    rank: Optional[int] = None
    pid: Optional[int] = None
    host: Optional[str] = None
    #: The failing worker's traceback or the last lines of its log.
    detail: str = ""
    #: False for faults no restart can fix (a bad config, an import error).
    retriable: bool = True
    #: Whether the attempt completed any training step.
    progressed: bool = True
    #: The exception's class name, for ``kind`` ERROR (from the worker's error file).
    error_type: Optional[str] = None
    #: The exit status the root cause names (negative: killed by that signal), if any.
    exit_code: Optional[int] = None

    def __post_init__(self):
        object.__setattr__(self, "kind", FailureKind(self.kind))

    @property
    def signature(self) -> tuple:
        """What "failed the same way" compares (typed fields, never the message text): an
        error's exception type (whichever rank raised it first), else rank and exit status."""
        if self.kind is FailureKind.ERROR:
            return (self.kind, self.error_type)
        return (self.kind, self.rank, self.exit_code)


@dataclass(frozen=True)
class Decision:
    restart: bool
    delay_s: float = 0.0
    reason: str = ""


class RestartPolicy:
    def __init__(self, config: SupervisorConfig):
        self.config = config

    def decide(self, failures: Sequence[Failure], now: float) -> Decision:
        last = failures[-1]
        c = self.config
        if not last.retriable:
            return Decision(False, reason=f"not retriable: {last.cause}")
        if last.error_type == WRITER_BUSY:
            # Another live job holds the checkpoint directory (this run's own leftovers were
            # stopped before the first attempt): a restart would only be refused again.
            return Decision(False, reason=f"the checkpoint directory belongs to another job: "
                                          f"{last.cause}")
        if len(failures) > c.max_restarts:
            return Decision(False, reason=f"restart budget spent: {len(failures)} failures, "
                                          f"supervisor.max_restarts={c.max_restarts}")
        recent = [f for f in failures if now - f.time <= c.failure_window_s]
        if len(recent) >= c.max_failures_in_window:
            return Decision(False, reason=f"{len(recent)} failures within "
                                          f"supervisor.failure_window_s={c.failure_window_s:g}")
        tail = failures[-NO_PROGRESS_LIMIT:]
        if (len(tail) == NO_PROGRESS_LIMIT and not any(f.progressed for f in tail)
                and len({f.signature for f in tail}) == 1):
            return Decision(False, reason=f"{NO_PROGRESS_LIMIT} attempts in a row failed the same "
                                          f"way before their first step: {last.cause}")
        return Decision(True, delay_s=self.backoff(len(recent), last.progressed))

    def backoff(self, failures_in_window: int, progressed: bool) -> float:
        """The first failure in the window of an attempt that trained restarts at once (a
        lost worker or node: waiting only adds to the recovery time); otherwise
        exponential in the window's failures: backoff_s, 2x, 4x, ... capped at backoff_max_s."""
        if failures_in_window <= 1 and progressed:
            return 0.0
        c = self.config
        return min(c.backoff_s * 2 ** max(failures_in_window - 1, 0), c.backoff_max_s)
