"""Requeue -> first training step again, against a cold start, on a real two-node Slurm.

    sudo python bench/slurm_requeue_bench.py               # 2 rounds (~3 min on 2 cores)
    sudo python bench/slurm_requeue_bench.py --rounds 3 --json /tmp/slurm_requeue.json

Starts the test suite's cluster (tests/slurm_cluster.py: munged, slurmctld, slurmd n1 and
n2 on this machine, ``cred_expire=5``), then per round submits a 2-node job of one CPU
worker per node with ``paddlerun slurm submit`` (LeNet on MNIST, ``train.log_every_steps=1``
so metrics.jsonl has every step's time). Once both nodes train past step 20 it ends the
start early, alternately:

``warning``  ``scancel --batch --signal=USR1`` (Slurm's time-limit warning): snapshot, exit
             75, the batch script's ``scontrol requeue``;
``hard``     ``scontrol requeue`` (no warning: the job's processes are killed).

Figures, from events.jsonl and metrics.jsonl (one clock: one machine):

- cold start: ``sbatch`` -> the first step of start 0 (job scheduling, srun, the
  supervisors, Paddle's launch and import, the rendezvous);
- requeue -> step: the signal -> the first step of start 1, split into the stop (signal ->
  node 0's last event of start 0), the wait in the queue (-> start 1's first ``started``:
  Slurm holds a requeued job ``cred_expire`` + ~1 s, 5 s here, 120 s by default) and the
  warm start (``started`` -> first step, the same work as a cold start's).

The job is cancelled after the first step of start 1; nothing is left running.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from slurm_cluster import SlurmCluster  # noqa: E402
from paddlerun.trainer.rundir.events import read_events  # noqa: E402

SETS = ["job.name=bench", "train.max_steps=2000", "train.log_every_steps=1", "checkpoint.every_steps=50",
        "supervisor.heartbeat_interval_s=0.25", "supervisor.preempt_grace_s=30",
        "launch.nproc_per_node=1"]


def metrics(run_dir: Path):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit(f"timed out after {timeout} s waiting for {what}")


def first_step_after(run_dir: Path, t: float):
    return next((m["time"] for m in metrics(run_dir) if m["time"] > t), None)


def one_round(cluster: SlurmCluster, run_dir: Path, how: str) -> dict:
    argv = [sys.executable, "-m", "paddlerun.launcher.cli", "slurm", "submit",
            str(REPO / "configs" / "mnist_lenet.yaml"), "--nodes", "2", "--run-dir", str(run_dir)]
    for item in SETS:
        argv += ["--set", item]
    submitted = time.time()
    out = subprocess.run(argv, env=cluster.env, capture_output=True, text=True, timeout=60, check=True)
    job = out.stdout.split()[-1]
    try:
        first = wait_for(lambda: first_step_after(run_dir, submitted), 300, "the first step")
        wait_for(lambda: (m := metrics(run_dir)) and m[-1]["step"] >= 20, 300, "step 20")
        signalled = time.time()
        if how == "warning":
            cluster.run("scancel", "--batch", "--signal=USR1", job)
        else:
            cluster.run("scontrol", "requeue", job)

        def restarted():
            return [e for e in read_events(run_dir / "events.jsonl")
                    if e.get("event") == "started" and e.get("slurm_restart_count") == 1]
        started = wait_for(restarted, 300, "start 1")[0]["time"]
        again = wait_for(lambda: first_step_after(run_dir, started), 300, "start 1's first step")
        stopped = max(e["time"] for e in read_events(run_dir / "events.jsonl")
                      if e.get("slurm_restart_count") == 0 and e.get("node") == 0)
    finally:
        cluster.run("scancel", job, check=False)
        wait_for(lambda: job not in cluster.jobs(), 300, f"job {job} to end")
    return {"how": how, "cold_start_s": first - submitted, "requeue_to_step_s": again - signalled,
            "stop_s": stopped - signalled, "queued_s": started - stopped, "warm_start_s": again - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="rounds (alternating warning / hard)")
    parser.add_argument("--json", help="also write the rounds here")
    args = parser.parse_args()
    cluster = SlurmCluster.start(cred_expire_s=5)
    rows = []
    try:
        for i in range(args.rounds):
            how = ("warning", "hard")[i % 2]
            with tempfile.TemporaryDirectory(prefix="slurm-bench-") as tmp:
                row = one_round(cluster, Path(tmp) / "run", how)
            rows.append(row)
            print(f"round {i} ({how}): cold start {row['cold_start_s']:.1f} s; requeue -> first step "
                  f"{row['requeue_to_step_s']:.1f} s = stop {row['stop_s']:.1f} + queued "
                  f"{row['queued_s']:.1f} + warm start {row['warm_start_s']:.1f}", flush=True)
    finally:
        cluster.stop()
    for key in ("cold_start_s", "requeue_to_step_s", "stop_s", "queued_s", "warm_start_s"):
        print(f"median {key:<18} {statistics.median(r[key] for r in rows):6.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
