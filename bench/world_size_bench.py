"""What resuming at another world size changes in the numbers, with the real launcher.

    python bench/world_size_bench.py                    # 2->1, 1->2, 2->3 and sharded 2->1 (~6 min on 2 cores)
    python bench/world_size_bench.py --transitions 2:1 --steps 100 --json /tmp/ws.json

For each transition W -> W': W workers train LeNet on MNIST (global batch 48, divisible by
1-4 workers) to step ``--at``; the run directory is copied twice; one copy goes on with W
workers, the other with W', both for ``--steps`` more steps. Same global batch, same
samples at every step (tests/test_world_size_e2e.py checks that); the only difference is
the order in which floats are summed (each worker sums its share, then the all-reduce
sums the workers). Printed per transition: the largest absolute difference of any
parameter, the relative one (over the largest parameter), the difference of the last
logged training loss, and the final eval accuracy of each continuation.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

import table  # bench/table.py: scripts here run with bench/ on sys.path
from paddlerun.trainer.checkpoint import CheckpointStore
from paddlerun.trainer.rundir.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
COMMON = ["train.global_batch_size=48", "train.epochs=20", "checkpoint.every_steps=50",
          "train.log_every_steps=10", "supervisor.hang_timeout_s=120"]


def run(run_dir: Path, workers: int, steps: int, sharded: bool, extra=()) -> None:
    argv = [sys.executable, "-m", "paddlerun.launcher.cli", "run", str(REPO / "configs" / "mnist_lenet.yaml"),
            "--run-dir", str(run_dir)]
    for item in [*COMMON, f"launch.nproc_per_node={workers}", f"train.max_steps={steps}",
                 f"train.sharded_optimizer={'true' if sharded else 'false'}", *extra]:
        argv += ["--set", item]
    out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{out.stdout[-4000:]}")


def final_model(run_dir: Path) -> dict:
    info = CheckpointStore(run_dir / "checkpoints").newest_complete()
    return load_file(str(info.path / "model.safetensors"))


def last(run_dir: Path, key: str):
    values = [m[key] for m in read_metrics(run_dir / "metrics.jsonl") if key in m]
    return values[-1] if values else float("nan")


def transition(work: Path, before: int, after: int, sharded: bool, at: int, steps: int, extra=()) -> dict:
    base = work / f"{before}-{after}{'-sharded' if sharded else ''}"
    run(base / "start", before, at, sharded, extra)
    for name, workers in (("same", before), ("other", after)):
        shutil.copytree(base / "start", base / name, ignore=shutil.ignore_patterns("supervisor.json", ".*"))
        run(base / name, workers, at + steps, sharded, extra)
    same, other = final_model(base / "same"), final_model(base / "other")
    diff = max(float(np.max(np.abs(same[k] - other[k]))) for k in same)
    scale = max(float(np.max(np.abs(same[k]))) for k in same)
    return {"transition": f"{'sharded ' if sharded else ''}{before} -> {after}", "max_abs_diff": diff,
            "max_rel_diff": diff / scale, "loss_same": last(base / "same", "loss"),
            "loss_other": last(base / "other", "loss"), "acc_same": last(base / "same", "eval_acc"),
            "acc_other": last(base / "other", "eval_acc")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transitions", nargs="+", default=["2:1", "1:2", "2:3", "s2:1"],
                        help="W:W' (an s in front: train.sharded_optimizer=true)")
    parser.add_argument("--at", type=int, default=50, help="the step the world size changes at")
    parser.add_argument("--steps", type=int, default=100, help="steps after the change")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="another config override for every run (e.g. train.drop_last=true)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ws-bench-") as work:
        for spec in args.transitions:
            sharded = spec.startswith("s")
            before, after = (int(x) for x in spec.lstrip("s").split(":"))
            row = transition(Path(work), before, after, sharded, args.at, args.steps, args.set)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\nafter {args.steps} steps at the new world size against the same-world continuation")
    table.print_table(["transition", "max |dparam|", "relative", "loss (same / other)", "eval acc (same / other)"], [
        [r["transition"], f"{r['max_abs_diff']:.2e}", f"{r['max_rel_diff']:.2e}",
         f"{r['loss_same']:.5f} / {r['loss_other']:.5f}", f"{r['acc_same']:.4f} / {r['acc_other']:.4f}"]
        for r in rows])
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
