"""Run by test_agreement.py under paddle.distributed.launch with 2 workers.

    python -m paddle.distributed.launch --nproc_per_node 2 agreement_job.py TMP_DIR

Each rank drives a :class:`StepAgreement` through three scenarios and prints, per
scenario, ``RESULT <rank> <name> <json>``: the steps after which it decided to stop or to
snapshot, as ``[step, stop, snapshot]``.

``loop`` (the config loop's settings): agreement every 3 steps and after step 8, time agreed.
    Each rank has its own run directory, as each node has; rank 1's asks for a stop after
    step 7. Rank 0's clock says a snapshot is due at step 6 only; rank 1's says one is
    always due (and must not count). Snapshots by step count every 4.
``script`` (script mode): every 3 steps, no run directory, SIGTERM watched, time not
    agreed. Rank 0 signals itself after step 7; its clock says due at step 5; rank 1's
    always (ignored: rank 0 writes alone).
``silent``: no run directory, no SIGTERM watch: no collective at all. Only rank 0 steps;
    if it entered a collective, its sums would pair with rank 1's final check below.
"""
import json
import os
import signal
import sys
from pathlib import Path

import paddle.distributed as dist

from paddlerun.trainer import signals
from paddlerun.trainer.agreement import StepAgreement
from paddlerun.trainer.grad_sync import all_reduce_sums
from paddlerun.trainer.rundir import control


class Schedule:
    """A snapshot schedule whose clock is scripted by the step."""

    def __init__(self, every_steps, due_at_steps):
        self.every_steps, self.due_at_steps, self.agreement = every_steps, due_at_steps, None

    def due_by_steps(self, step):
        return step % self.every_steps == 0

    def due_by_time(self, now):
        return self.due_at_steps is None or self.agreement.position.step in self.due_at_steps


def drive(agreement, steps, after_step=lambda step: None):
    decided = []
    for _ in range(steps):
        step = agreement.advance()
        decision = agreement.agree()
        if decision.stop or decision.snapshot:
            decided.append([step, decision.stop, decision.snapshot])
        if decision.stop:
            break
        after_step(step)
    return decided


def scenario(rank, world, *, due_at_steps, **options):
    schedule = Schedule(4, due_at_steps)
    agreement = StepAgreement(rank, world, 3, schedule=schedule, **options)
    schedule.agreement = agreement
    return agreement


dist.init_parallel_env()
rank, world = dist.get_rank(), dist.get_world_size()
tmp = Path(sys.argv[1])

node_dir = tmp / f"node-{rank}"
node_dir.mkdir(parents=True, exist_ok=True)
loop = scenario(rank, world, due_at_steps={6} if rank == 0 else None, run_dir=node_dir,
                agree_time=True, last_step=8)
asks = (lambda step: step == 7 and control.request_stop(node_dir, "test")) if rank == 1 else (lambda step: None)
print(f"RESULT {rank} loop {json.dumps(drive(loop, 20, asks))}", flush=True)

signals.install_stop_handler()
script = scenario(rank, world, due_at_steps={5} if rank == 0 else None, watch_sigterm=True)
signal_self = (lambda step: step == 7 and os.kill(os.getpid(), signal.SIGTERM)) if rank == 0 \
    else (lambda step: None)
print(f"RESULT {rank} script {json.dumps(drive(script, 20, signal_self))}", flush=True)

silent = scenario(rank, world, due_at_steps=set())
decided = drive(silent, 9) if rank == 0 else []
check = all_reduce_sums([rank + 1.0])
print(f"RESULT {rank} silent {json.dumps([decided, check])}", flush=True)
