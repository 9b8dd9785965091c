"""``python -m paddlerun.cluster.slurm_end RUN_DIR JOB_ID START SRUN_EXIT [CAUSE]``: whether
the batch script requeues the job after ``srun`` returned (cluster/slurm_script.py).

srun's exit code alone cannot say: with ``--kill-on-bad-exit`` the first node that exits
non-zero has srun SIGTERM the others, so a start where one node gave up may end with the
SIGTERM's 143 or with the 75 of a supervisor that took that SIGTERM for a preemption.
Slurm's own view comes first: a job that is no longer RUNNING (``scancel`` makes it
COMPLETING before the batch shell's SIGTERM; ``scontrol requeue`` and a node failure
requeue it themselves) is never requeued by the script. Then the supervisors' own events
of this start (``slurm_restart_count`` = START):

- a ``gave_up``: the restart budget is spent (counted over every start of the job) or the
  fault is one no restart fixes -> exit 1, no requeue;
- ``succeeded`` from every node that started -> exit 0, no requeue (a finished job never
  requeues itself);

then srun's exit: 0 done, 2 bad config (never retried); anything else (75 after a snapshot,
a killed step) -> requeue. Prints ``requeue`` or ``exit CODE`` and writes the start's
``slurm_ended`` event.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from paddlerun.cluster.slurm_status import show_job
from paddlerun.trainer.rundir.events import EventLog, read_events


@dataclass(frozen=True)
class End:
    requeue: bool
    exit_code: int
    why: str


def decide(events: List[dict], job_id: int, start: int, srun_exit: int,
           job_state: Optional[str] = None) -> End:
    """``job_state``: Slurm's JobState now, if known. Anything but RUNNING means Slurm is
    ending the job itself -- ``scancel`` (COMPLETING), ``scontrol requeue`` or a node
    failure (Slurm requeues it), the time limit passed -- and a requeue from the script
    would undo a cancel."""
    mine = [e for e in events if e.get("slurm_job_id") == job_id and e.get("slurm_restart_count") == start]
    if job_state and job_state != "RUNNING":
        return End(False, srun_exit or 1, f"Slurm is ending the job itself (JobState={job_state}): "
                                          f"cancelled, requeued by Slurm or past its time limit")
    if any(e.get("event") == "gave_up" for e in mine):
        return End(False, 1, "a supervisor gave up")
    started = {e.get("node") for e in mine if e.get("event") == "started"}
    succeeded = {e.get("node") for e in mine if e.get("event") == "succeeded"}
    if started and started <= succeeded:
        return End(False, 0, "finished")
    if srun_exit == 0:
        return End(False, 0, "finished")
    if srun_exit == 2:
        return End(False, 2, "bad config or usage")
    return End(True, srun_exit, "stopped early")


def supervisors_cause(events: List[dict], job_id: int, start: int) -> Optional[str]:
    """Why the supervisors of this start stopped, when they were signalled themselves."""
    for e in events:
        if e.get("slurm_job_id") == job_id and e.get("slurm_restart_count") == start \
                and e.get("event") == "preempt_requested" and e.get("cause"):
            return str(e["cause"])
    return None


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (4, 5):
        print("usage: python -m paddlerun.cluster.slurm_end RUN_DIR JOB_ID START SRUN_EXIT [CAUSE]",
              file=sys.stderr)
        return 2
    run_dir, job_id, start, srun_exit = Path(argv[0]), int(argv[1]), int(argv[2]), int(argv[3])
    cause = argv[4] if len(argv) == 5 and argv[4] else None
    events = read_events(run_dir / "events.jsonl")
    end = decide(events, job_id, start, srun_exit, show_job(job_id).get("JobState"))
    if cause is None:  # the batch shell got no signal: the steps may have (a preemption)
        cause = supervisors_cause(events, job_id, start) or ("lost" if end.requeue else "none")
    try:
        EventLog(run_dir / "events.jsonl").emit(
            "slurm_ended", start, slurm_job_id=job_id, slurm_restart_count=start, srun_exit=srun_exit,
            cause=cause, requeue="yes" if end.requeue else "no", why=end.why)
    except OSError as e:
        print(f"paddlerun-slurm: cannot write to {run_dir}/events.jsonl: {e}", file=sys.stderr)
    print("requeue" if end.requeue else f"exit {end.exit_code}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
