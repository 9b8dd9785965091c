"""``python -m paddlerun.cluster.slurm_event RUN_DIR EVENT KEY=VALUE...``: the batch
script's own lines in ``RUN_DIR/events.jsonl`` (cluster/slurm_script.py).

The batch shell sees what the supervisors may not live to write: ``scancel --full`` and
a hard requeue SIGKILL the steps at once (srun answers its own SIGTERM so). Its events,
``slurm_started``, ``slurm_signal`` (cause ``time_limit`` or ``preemption``) and
``slurm_ended`` (srun's exit, whether the job was requeued), carry ``slurm_job_id`` and
``slurm_restart_count`` like the supervisors' (and, as ``attempt``, the restart count: the
script runs once per start). Values that look like integers are
written as integers. An event that cannot be written never fails the job.
"""
from __future__ import annotations

import sys
from pathlib import Path

from paddlerun.trainer.rundir.events import EventLog


def value(text: str):
    return int(text) if text.lstrip("-").isdigit() else text


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print("usage: python -m paddlerun.cluster.slurm_event RUN_DIR EVENT KEY=VALUE...", file=sys.stderr)
        return 2
    run_dir, event = Path(argv[0]), argv[1]
    details = {}
    for item in argv[2:]:
        key, _, text = item.partition("=")
        details[key] = value(text)
    # Its "attempt" is the start's restart count: the batch script runs once per start.
    attempt = details.get("slurm_restart_count", 0)
    try:
        EventLog(run_dir / "events.jsonl").emit(event, attempt if isinstance(attempt, int) else 0,
                                                **details)
    except (OSError, ValueError, TypeError) as e:
        print(f"paddlerun-slurm: cannot write event {event} to {run_dir}/events.jsonl: {e}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
