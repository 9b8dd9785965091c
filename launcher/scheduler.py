"""What the supervisor asks of the batch scheduler it runs under (none, Slurm, ...).

The supervisor's policy stays in ``supervisor.py``; a scheduler adds facts to it:
fields for every event (a job id, a restart count), a notice that the job must stop
(why: a time limit, a preemption), restarts already spent in earlier starts of the same
job, and what to wait for before exiting. :class:`NoScheduler` is the plain run.
Implementations live in ``cluster/`` (``cluster/slurm_job.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from paddlerun.launcher.restart_policy import Failure


@dataclass(frozen=True)
class StopNotice:
    """The job must stop soon: a scheduler, a signal or the cloud says so."""
    #: ``time_limit`` (a warning before the job's end time), ``preemption``,
    #: ``preemption_notice`` (a cloud's spot notice), ...
    cause: str
    #: The signal that was sent, e.g. ``SIGUSR1``; None for a notice that came otherwise.
    signal: Optional[str]
    #: In words, where ``signal`` does not say it (``aws preemption notice``).
    detail: str = ""

    @property
    def reason(self) -> str:
        return self.signal or self.detail or self.cause


class NoScheduler:
    """A run started by hand: no job, nothing to add."""

    def event_fields(self) -> Dict[str, object]:
        return {}

    def notice(self) -> Optional[StopNotice]:
        """A stop the scheduler asked for some other way than a signal to this process."""
        return None

    def cause_of(self, signal_name: str) -> str:
        """Why a signal to the supervisor means a stop."""
        return "interrupted" if signal_name == "SIGINT" else "signal"

    def earlier_failures(self, events: List[dict]) -> List[Failure]:
        """Failures of earlier starts of this job that count against the restart budget."""
        return []

    def before_exit(self, run_dir: Path, preempted: bool) -> None:
        """Called last, after every process of this node stopped."""
