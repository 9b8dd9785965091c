"""What an elastic job costs when a node goes and comes back, on a real etcd, side by side
with the cold start of the same job.

Each round: two nodes (separate supervisors on this machine, one worker each, a shared
checkpoints directory, ``launch.nnodes: 1:2``) start together and train; at step 40 node 1
is SIGKILLed whole (supervisor, launcher, worker). Measured from the kill:

- *stopped*: node 0's old attempt is torn down (its ``teardown`` event);
- *node_lost*: node 0 says which node is gone (its lease expired: ``node_ttl_s`` 2 s here);
- *first step alone*: node 0's first training step at world size 1 (``metrics.jsonl``,
  every step logged).

Then node 1 starts again; measured from its start:

- *scale-up stall*: from node 0's ``scale_up_requested`` to the first step at 2 nodes;
- *rejoin*: from node 1's start to that step.

*cold start*: from both supervisors' start to the first step at 2 nodes (the same import,
rendezvous and restore work a restart does, plus the etcd join and elastic_wait_s,
which is 30 s but ends at once when MAX nodes are there).

    python bench/elastic_bench.py --rounds 3 [--json out.json]
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
from etcd_server import EtcdServer  # noqa: E402
from helpers import command, kill_node, wait_for  # noqa: E402
from paddlerun.trainer.rundir.events import read_events  # noqa: E402
from paddlerun.trainer.rundir.metrics import read_metrics  # noqa: E402

TTL = 2
SETS = ["launch.nproc_per_node=1", "launch.nnodes=1:2", "train.log_every_steps=1",
        "train.max_steps=400", "checkpoint.every_steps=20", f"supervisor.node_ttl_s={TTL}",
        "supervisor.elastic_wait_s=30", "supervisor.scale_up_min_interval_s=1"]
KILL_AT_STEP = 40


def start(run_dir: Path, sets) -> subprocess.Popen:
    return subprocess.Popen(command(run_dir, *sets), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def events(run_dir: Path, name: str):
    return [e for e in read_events(run_dir / "events.jsonl") if e["event"] == name]


def first_step(run_dir: Path, attempt: int):
    for m in read_metrics(run_dir / "metrics.jsonl"):
        if m.get("attempt") == attempt and "loss" in m:
            return m
    return None


def newest_step(run_dir: Path) -> int:
    steps = [m.get("step", 0) for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]
    return max(steps, default=0)


def one_round(work: Path, etcd: EtcdServer) -> dict:
    n0_dir, n1_dir = work / "n0", work / "n1"
    sets = [f"launch.rendezvous={etcd.url}", f"checkpoint.dir={work / 'ckpt'}",
            f"launch.job_id=bench-{work.name}", *SETS]
    t0 = time.time()
    n0 = start(n0_dir, sets)
    n1 = start(n1_dir, sets)
    procs = [n0, n1]
    try:
        leader = wait_for(lambda: next((d for d in (n0_dir, n1_dir) if first_step(d, 0)), None),
                          300, "the first step")
        if leader != n0_dir:  # kill the follower: node 0 is the one that goes on
            n0_dir, n1_dir, n0, n1 = n1_dir, n0_dir, n1, n0
        cold = first_step(n0_dir, 0)["time"] - t0
        wait_for(lambda: newest_step(n0_dir) >= KILL_AT_STEP, 300, f"step {KILL_AT_STEP}")
        kill_node(n1_dir)
        killed = time.time()
        n1.wait(timeout=30)
        gen = wait_for(lambda: [g for g in events(n0_dir, "generation") if len(g["members"]) == 1],
                       120, "the 1-node generation")[0]
        alone = wait_for(lambda: first_step(n0_dir, gen["attempt"]), 300, "a step alone")
        stopped = [e for e in events(n0_dir, "teardown") if e["attempt"] == gen["attempt"] - 1][0]
        lost = wait_for(lambda: events(n0_dir, "node_lost"), 30, "node_lost")[0]

        back = time.time()
        n1 = start(n1_dir, sets)
        procs.append(n1)
        regen = wait_for(lambda: [g for g in events(n0_dir, "generation")
                                  if len(g["members"]) == 2 and g["number"] > gen["number"]],
                         300, "the 2-node generation again")[0]
        together = wait_for(lambda: first_step(n0_dir, regen["attempt"]), 300, "a step at 2 nodes")
        asked = events(n0_dir, "scale_up_requested")[-1]
        n0.wait(timeout=600)
        n1.wait(timeout=600)
        return {"cold_start_s": cold, "stopped_s": stopped["time"] - killed,
                "node_lost_s": lost["time"] - killed, "first_step_alone_s": alone["time"] - killed,
                "scale_up_stall_s": together["time"] - asked["time"],
                "rejoin_s": together["time"] - back,
                "exit_codes": [n0.returncode, n1.returncode]}
    finally:
        kill_node(n0_dir), kill_node(n1_dir)
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="paddlerun-elastic-bench-") as tmp:
        etcd = EtcdServer(Path(tmp) / "etcd").start()
        try:
            for i in range(args.rounds):
                work = Path(tmp) / f"round-{i}"
                work.mkdir()
                result = one_round(work, etcd)
                results.append(result)
                print(f"round {i + 1}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else
                                                     f"{k} {v}" for k, v in result.items()), flush=True)
        finally:
            etcd.stop()
    keys = [k for k in results[0] if k.endswith("_s")]
    print(f"\n{'':<22}{'median':>8}{'min':>8}{'max':>8}   ({args.rounds} rounds, node_ttl_s {TTL})")
    for key in keys:
        values = [r[key] for r in results]
        print(f"{key:<22}{statistics.median(values):8.2f}{min(values):8.2f}{max(values):8.2f}")
    cold = statistics.median(r["cold_start_s"] for r in results)
    alone = statistics.median(r["first_step_alone_s"] for r in results)
    print(f"\nnode loss -> first step alone = {alone / cold:.2f} x the cold start")
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": results, "node_ttl_s": TTL}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
