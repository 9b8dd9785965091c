"""The sbatch script of ``paddlerun slurm submit|script`` (what it does: docs/slurm.md).

One task per node runs ``paddlerun run`` through ``srun --kill-on-bad-exit=1``; each finds
its node rank and the master from ``SLURM_*`` (cluster/slurm.py). The script itself only
passes Slurm's notices on and decides whether the job goes back into the queue:

- SIGUSR1 (``--signal=B:USR1@S``, S seconds before the time limit) and SIGTERM
  (preemption, ``scancel --full``) are written to ``RUN_DIR/control/scheduler.json``,
  which every node's supervisor watches: they snapshot and exit 75;
- after srun, cluster/slurm_end.py decides from the supervisors' events of this start
  and srun's exit: finished (never requeued), a supervisor gave up (budget spent,
  counted across requeues) or a bad config: the job ends there. Otherwise (75 after a
  snapshot, a node lost, srun killed the step): ``scontrol requeue``, and the next start
  resumes from the newest complete snapshot.
"""
from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from paddlerun.cluster.slurm_job import NOTICE_FILE

#: Slurm looks at time limits every ~30 s: SIGUSR1@S arrives between S and S+30 s
#: before the end time; S itself must cover the snapshot and the grace.
WARNING_MIN_S = 30
#: Beyond the measured snapshot time: the supervisors' check period, srun and requeue.
WARNING_MARGIN_S = 10


@dataclass(frozen=True)
class BatchJob:
    config: Path
    run_dir: Path
    nodes: int
    python: str
    job_name: str
    warning_s: int
    gpus_per_node: Optional[int] = None
    time: Optional[str] = None
    partition: Optional[str] = None
    sets: Sequence[str] = ()
    extra_sbatch: Sequence[str] = ()

    @property
    def output(self) -> Path:
        return self.run_dir / "slurm-%j.out"


def warning_seconds(grace_s: float, snapshot_s: Optional[float]) -> int:
    """S of ``--signal=B:USR1@S``: the config's grace or, when this run directory has
    measured its snapshots, the slowest one plus a margin, whichever is longer."""
    need = max(grace_s, (snapshot_s or 0.0) + WARNING_MARGIN_S)
    return max(WARNING_MIN_S, int(math.ceil(need)))


def render(job: BatchJob) -> str:
    q = shlex.quote
    directives = [f"--job-name={job.job_name}", f"--nodes={job.nodes}", "--ntasks-per-node=1",
                  "--requeue", f"--signal=B:USR1@{job.warning_s}", "--open-mode=append",
                  f"--output={job.output}"]
    if job.time:
        directives.append(f"--time={job.time}")
    if job.partition:
        directives.append(f"--partition={job.partition}")
    if job.gpus_per_node:
        directives.append(f"--gpus-per-node={job.gpus_per_node}")
    directives += list(job.extra_sbatch)
    run = [job.python, "-m", "paddlerun.launcher.cli", "run", str(job.config),
           "--run-dir", str(job.run_dir)]
    for item in job.sets:
        run += ["--set", item]
    lines = ["#!/bin/bash"] + [f"#SBATCH {d}" for d in directives] + [
        "# Written by paddlerun (docs/slurm.md). One `paddlerun run` per node; each finds its",
        "# node rank and master from SLURM_*. Exit: 0 done, 1 gave up, 2 bad config; requeued",
        "# after a snapshot (75) or a lost node, and resumed from the newest snapshot.",
        "set -u",
        f"RUN_DIR={q(str(job.run_dir))}",
        f'NOTICE="$RUN_DIR/{NOTICE_FILE}"',
        'START="${SLURM_RESTART_COUNT:-0}"',
        f"PY={q(job.python)}",
        'mkdir -p "$(dirname "$NOTICE")" && rm -f "$NOTICE"',
        "event() {  # a line in events.jsonl with the job id and restart count",
        '    "$PY" -m paddlerun.cluster.slurm_event "$RUN_DIR" "$1" slurm_job_id="$SLURM_JOB_ID" \\',
        '        slurm_restart_count="$START" "${@:2}"',
        "}",
        'signals=0; stopping=""',
        "notice() {  # every node's supervisor looks for this file between its checks",
        "    signals=$((signals + 1)); stopping=\"$1\"",
        "    printf '{\"cause\": \"%s\", \"signal\": \"%s\", \"job_id\": %s, \"restart_count\": %s, "
        "\"time\": %s}\\n' \\",
        '        "$1" "$2" "$SLURM_JOB_ID" "$START" "$(date +%s)" >"$NOTICE.tmp" && mv -f "$NOTICE.tmp" "$NOTICE"',
        '    echo "paddlerun-slurm: $2 ($1): the supervisors snapshot and stop"',
        '    event slurm_signal cause="$1" signal="$2"',
        "}",
        "trap 'notice time_limit SIGUSR1' USR1",
        "trap 'notice preemption SIGTERM' TERM",
        'echo "paddlerun-slurm: job $SLURM_JOB_ID start $START on $SLURM_JOB_NODELIST at $(date +%FT%T)"',
        'event slurm_started nodes="$SLURM_JOB_NODELIST"',
        "srun --kill-on-bad-exit=1 --ntasks-per-node=1 " + " ".join(q(a) for a in run) + " &",
        "srun_pid=$!",
        "while :; do  # a trapped signal ends `wait` early: wait again for srun's own exit",
        '    before=$signals; wait "$srun_pid"; rc=$?',
        '    [ "$signals" != "$before" ] && [ "$rc" -gt 128 ] || break',
        "done",
        'echo "paddlerun-slurm: srun exit $rc${stopping:+ (asked to stop: $stopping)}"',
        '# The supervisors\' events of this start decide first (cluster/slurm_end.py); srun\'s exit',
        '# code alone cannot tell a node that gave up from one srun killed after it.',
        'verdict=$("$PY" -m paddlerun.cluster.slurm_end "$RUN_DIR" "$SLURM_JOB_ID" "$START" "$rc" "$stopping")',
        'case "$verdict" in',
        '    requeue) ;;',
        '    "exit "*) exit "${verdict#exit }" ;;  # finished (never requeued), gave up or bad config',
        '    *) case "$rc" in 0|1|2) exit "$rc" ;; esac ;;  # no verdict: srun\'s exit alone',
        'esac',
        'echo "paddlerun-slurm: requeue job $SLURM_JOB_ID (start $START ended with $rc)"',
        'scontrol requeue "$SLURM_JOB_ID" && exit 0',
        'echo "paddlerun-slurm: scontrol requeue failed (the job was requeued already, by Slurm or by hand,"',
        'echo "    or it was submitted with --no-requeue)"',
        'exit "$rc"',
    ]
    return "\n".join(lines) + "\n"
