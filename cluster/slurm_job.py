"""The supervisor's view of the Slurm job it runs in (launcher/scheduler.py's hooks).

- Every event carries ``slurm_job_id`` and ``slurm_restart_count``.
- Why a stop: Slurm's warning before the time limit is SIGUSR1 (``--signal=USR1@S``),
  a preemption is SIGTERM. The batch script paddlerun writes gets the warning itself
  (``--signal=B:USR1@S``: only the batch shell) and passes it on to every node's
  supervisor through :data:`NOTICE_FILE` in the shared run directory, which each
  supervisor looks at between its checks (no signal reaches the workers or Paddle's
  launcher, whose default action for SIGUSR1 is to die).
- The restart budget counts over requeues: failures recorded by earlier starts of the
  same job (same job id, lower restart count, this node), and each earlier start that
  ended without a word from its supervisor (a node failure, SIGKILL) unless the batch
  script had been told to stop it (a ``slurm_signal`` event: a preemption or time limit
  is no failure, even when srun killed the step before the supervisor could say so).
- A node other than node 0 that stops for a preemption waits until node 0's supervisor
  is done before it exits: ``srun --kill-on-bad-exit`` ends the whole step when the first
  task exits non-zero, which must not cut node 0's snapshot short.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Mapping, Optional

from paddlerun.cluster.slurm import SlurmError, SlurmPlace, master_address, place_from_environ
from paddlerun.launcher.restart_policy import Failure, FailureKind
from paddlerun.launcher.scheduler import NoScheduler, StopNotice
from paddlerun.launcher.usage import UsageError
from paddlerun.trainer.rundir.config import Config
from paddlerun.trainer.rundir.events import read_events

#: Written by the batch script when Slurm signals it (cluster/slurm_script.py).
NOTICE_FILE = Path("control") / "scheduler.json"
CAUSE_OF_SIGNAL = {"SIGUSR1": "time_limit", "SIGTERM": "preemption", "SIGINT": "interrupted"}
#: A start whose last supervisor event is one of these ended in the supervisor's own hands.
_ENDED_IN_HAND = frozenset({"succeeded", "gave_up", "preempted", "preempt_requested"})
_POLL_S = 0.2


class SlurmJob(NoScheduler):
    def __init__(self, place: SlurmPlace, run_dir: Path, node_rank: int, multi_node: bool,
                 grace_s: float):
        self.place = place
        self.run_dir = Path(run_dir)
        self.node_rank = node_rank
        self.multi_node = multi_node
        self.grace_s = grace_s

    def event_fields(self) -> Dict[str, object]:
        return {"slurm_job_id": self.place.job_id, "slurm_restart_count": self.place.restart_count}

    def notice(self) -> Optional[StopNotice]:
        try:
            record = json.loads((self.run_dir / NOTICE_FILE).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("job_id") != self.place.job_id \
                or record.get("restart_count") != self.place.restart_count:
            return None  # left by another job or an earlier start of this one
        signal = str(record.get("signal", "SIGUSR1"))
        return StopNotice(str(record.get("cause") or CAUSE_OF_SIGNAL.get(signal, "signal")), signal)

    def cause_of(self, signal_name: str) -> str:
        return CAUSE_OF_SIGNAL.get(signal_name, "signal")

    def _mine(self, event: dict) -> bool:
        return event.get("slurm_job_id") == self.place.job_id and \
            (event.get("node") == self.node_rank if self.multi_node else "node" not in event)

    def earlier_failures(self, events: List[dict]) -> List[Failure]:
        by_start: Dict[int, List[dict]] = defaultdict(list)
        signalled = set()  # starts the batch script was told to stop (slurm_signal)
        for event in events:
            count = event.get("slurm_restart_count")
            if event.get("slurm_job_id") != self.place.job_id or not isinstance(count, int) \
                    or count >= self.place.restart_count:
                continue
            if event.get("event") == "slurm_signal":
                signalled.add(count)
            elif self._mine(event) and not str(event.get("event")).startswith("slurm_"):
                by_start[count].append(event)
        failures = []
        for count in sorted(by_start):
            start = by_start[count]
            for e in start:
                if e.get("event") == "worker_failed":
                    failures.append(Failure(
                        attempt=e.get("attempt", 0), time=e.get("failed_at") or e.get("time", 0.0),
                        kind=e.get("kind", "error"), cause=e.get("cause", "?"), rank=e.get("rank"),
                        pid=e.get("pid"), host=e.get("host"), retriable=bool(e.get("retriable", True)),
                        progressed=bool(e.get("progressed", True))))
            last = [e["event"] for e in start if e.get("event") in _ENDED_IN_HAND or
                    e.get("event") in ("started", "restarting", "worker_failed")]
            if count not in signalled and (not last or last[-1] not in _ENDED_IN_HAND):
                failures.append(Failure(
                    attempt=start[-1].get("attempt", 0), time=start[-1].get("time", 0.0),
                    kind=FailureKind.JOB_LOST, cause=f"start {count} of Slurm job {self.place.job_id} ended "
                    f"without its supervisor's last word (node failure, SIGKILL or hard requeue)"))
        return failures

    def before_exit(self, run_dir: Path, preempted: bool) -> None:
        if not (preempted and self.multi_node and self.node_rank != 0):
            return
        deadline = time.time() + self.grace_s
        while time.time() < deadline:
            for e in reversed(read_events(self.run_dir / "events.jsonl")):
                if e.get("slurm_job_id") == self.place.job_id and e.get("node") == 0 \
                        and e.get("slurm_restart_count") == self.place.restart_count \
                        and e.get("event") in ("preempted", "succeeded", "gave_up"):
                    return
            time.sleep(_POLL_S)


def inside_slurm(config: Config, run_dir: Path, environ: Mapping[str, str] = os.environ):
    """``(config, scheduler)`` for a ``paddlerun run`` started in a Slurm job: the config
    with this node's place (nnodes, node rank, master) filled in from ``SLURM_*``, and
    the job's hooks; ``(config, None)`` outside Slurm.

    A config that already says ``launch.nnodes > 1`` keeps its own place: the user chose it.
    """
    place = place_from_environ(environ)
    if place is None:
        return config, None
    launch = config.launch
    if launch.nnodes == 1 and place.nnodes > 1:
        try:
            master = launch.master or master_address(place)
        except SlurmError as e:
            raise UsageError(f"inside Slurm job {place.job_id}: {e}") from None
        launch = dataclasses.replace(launch, nnodes=place.nnodes, node_rank=place.node_rank,
                                     master=master)
        config = dataclasses.replace(config, launch=launch)
    return config, SlurmJob(place, run_dir, launch.node_rank, launch.nnodes > 1,
                            grace_s=config.supervisor.preempt_grace_s)
