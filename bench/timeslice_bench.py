"""Steady-state cost of paddlerun with the machine's drift cancelled: the two jobs take turns.

    python bench/timeslice_bench.py                        # 40 turns of 3 s each, ~5 min on 2 cores
    python bench/timeslice_bench.py --turns 80 --variant no-snapshots

``overhead_bench.py`` runs plain and paddlerun one after the other. On the 2-core VM this
project is built on, speed drifts by ±15 % between runs a minute apart (the same job,
measured again), so even 30 pairs leave the median ratio uncertain by ±3 %. Here both jobs
run at once and take turns on the machine: while one runs for ``--turn-s`` seconds, every
process of the other -- supervisor, launcher, workers, all their threads -- is stopped
(SIGSTOP), then they swap (SIGCONT). Turns alternate ABBA, so drift within a pair of
turns cancels too. The jobs are the ones ``overhead_bench.py`` compares:

``plain``      ``bench/plain_train.py`` under ``python -m paddle.distributed.launch
               --nproc_per_node 2``: LeNet, MNIST, global batch 64, Adam, DataParallel,
               no checkpoints; ``--progress`` makes rank 0 note (step, time) every 10 steps.
``paddlerun``  ``paddlerun run configs/mnist_lenet.yaml`` with its default schedule, or a
               variant of overhead_bench (``--variant``); rank 0's metrics.jsonl has
               (step, time) every 10 steps.

A turn's speed is the steps between its first and last progress record over the time
between them (so a step cut by the stop is not counted). The table gives the median ratio
paddlerun / plain over the pairs of adjacent turns with a bootstrap 95 % confidence interval,
and the ratio of the jobs' total steps over their total measured time. Both jobs start
together and run side by side until each is past ``--warmup`` steps (start-up is not
measured); at the end both are stopped (paddlerun with SIGTERM: it snapshots and exits 75).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import psutil

from overhead_bench import CONFIG, GLOBAL_BATCH, PLAIN, REPO, VARIANTS, spread
from procs import stop  # bench/procs.py: scripts here run with bench/ on sys.path
from table import print_table
from paddlerun.trainer.metrics import read_metrics

Record = Tuple[int, float]  # (step, time.time() after it)


class Job:
    def __init__(self, name: str, argv: List[str], log: Path, progress: Path, paddlerun: bool):
        self.name, self.argv, self.log, self.progress, self.paddlerun = name, argv, log, progress, paddlerun
        self.proc: Optional[subprocess.Popen] = None
        self.processes: List[psutil.Process] = []

    def start(self) -> None:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def records(self) -> List[Record]:
        if self.paddlerun:
            return [(m["step"], m["time"]) for m in read_metrics(self.progress) if "loss" in m]
        try:
            lines = self.progress.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [(int(s), float(t)) for s, t in (line.split() for line in lines if line.count(" ") == 1)]

    def step(self) -> int:
        found = self.records()
        return found[-1][0] if found else 0

    def freeze_process_list(self) -> None:
        """Every process of the job (workers live in their own sessions: no process group)."""
        root = psutil.Process(self.proc.pid)
        self.processes = [root] + root.children(recursive=True)

    def signal(self, signum: int) -> None:
        for p in self.processes:
            try:
                p.send_signal(signum)
            except psutil.NoSuchProcess:
                pass

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log}")


def turn_speed(records: List[Record], start: float, end: float) -> Optional[Tuple[int, float]]:
    """(steps, seconds) between the first and the last record inside [start, end]."""
    inside = [r for r in records if start <= r[1] <= end]
    if len(inside) < 2:
        return None
    return inside[-1][0] - inside[0][0], inside[-1][1] - inside[0][1]


def wait_until(predicate, timeout_s: float, what: str, jobs: List[Job]) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        for job in jobs:
            job.check_alive()
        if time.time() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=40, help="turns of each job (default 40)")
    parser.add_argument("--turn-s", type=float, default=3.0, help="seconds per turn (default 3)")
    parser.add_argument("--warmup", type=int, default=100, help="steps each job runs before turns start")
    parser.add_argument("--variant", default="paddlerun", choices=[v for v in VARIANTS if VARIANTS[v] is not None],
                        help="which paddlerun variant of overhead_bench.py (default paddlerun)")
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "timeslice_bench.json"))
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="paddlerun-timeslice-bench-"))
    steps = 1_000_000  # never reached: both jobs are stopped after the last turn
    plain = Job("plain", [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
                          "--log_dir", str(work / "plain-logs"), str(PLAIN), "--steps", str(steps),
                          "--warmup", "1", "--progress", str(work / "plain-progress.txt")],
                work / "plain.out", work / "plain-progress.txt", paddlerun=False)
    sets = ["job.name=timeslice_bench", "train.epochs=100000", f"train.max_steps={steps}",
            "train.eval_every_epochs=100000", *VARIANTS[args.variant]]
    ours = Job(args.variant, [sys.executable, "-m", "paddlerun.launcher.cli", "run", str(CONFIG),
                              "--run-dir", str(work / "run"), *[x for s in sets for x in ("--set", s)]],
               work / "paddlerun.out", work / "run" / "metrics.jsonl", paddlerun=True)
    jobs = [plain, ours]
    turns: List[Tuple[str, float, float]] = []
    print(f"timeslice bench: {os.cpu_count()} CPUs, {args.turns} turns of {args.turn_s:g} s per job, "
          f"plain against {args.variant}; work dir {work}", flush=True)
    try:
        for job in jobs:
            job.start()
        wait_until(lambda: all(j.step() >= args.warmup for j in jobs), 600, f"step {args.warmup}", jobs)
        for job in jobs:
            job.freeze_process_list()
            job.signal(signal.SIGSTOP)
        for i in range(args.turns):
            for job in (jobs if i % 2 == 0 else jobs[::-1]):
                job.signal(signal.SIGCONT)
                started = time.time()
                time.sleep(args.turn_s)
                job.signal(signal.SIGSTOP)
                turns.append((job.name, started, time.time()))
                job.check_alive()
            if i % 10 == 9:
                print(f"  {i + 1} turns each", flush=True)
    finally:
        for job in jobs:
            job.signal(signal.SIGCONT)
            if job.proc is not None:
                stop(job.proc)

    records = {job.name: job.records() for job in jobs}
    speeds: Dict[str, List[Optional[Tuple[int, float]]]] = {job.name: [] for job in jobs}
    for name, start, end in turns:
        speeds[name].append(turn_speed(records[name], start, end))
    pairs = [(p, o) for p, o in zip(speeds["plain"], speeds[ours.name]) if p and o and p[1] > 0 and o[1] > 0]
    ratios = [(o[0] / o[1]) / (p[0] / p[1]) for p, o in pairs]
    totals = {name: (sum(s[0] for s in got if s), sum(s[1] for s in got if s)) for name, got in speeds.items()}
    rate = {name: steps_done * GLOBAL_BATCH / seconds for name, (steps_done, seconds) in totals.items()}
    s = spread(ratios)
    print(f"\nsamples/s while running (global batch {GLOBAL_BATCH}, 2 CPU workers), {len(pairs)} pairs of turns:")
    print_table(["job", "steps measured", "seconds measured", "samples/s", "/ plain"],
                [["plain", str(totals["plain"][0]), f"{totals['plain'][1]:.1f}", f"{rate['plain']:.0f}", "1"],
                 [ours.name, str(totals[ours.name][0]), f"{totals[ours.name][1]:.1f}", f"{rate[ours.name]:.0f}",
                  f"{rate[ours.name] / rate['plain']:.3f} overall; per pair of turns: median {s['median']:.3f} "
                  f"(95% CI {s['ci95'][0]:.3f}..{s['ci95'][1]:.3f}; {s['min']:.3f}..{s['max']:.3f})"]])
    result = {"machine": {"nproc": os.cpu_count(), "python": platform.python_version()},
              "time": time.time(), "argv": sys.argv[1:] if argv is None else list(argv),
              "variant": args.variant, "settings": VARIANTS[args.variant], "turn_s": args.turn_s,
              "turns": turns, "speeds": speeds, "ratios": ratios, "samples_per_s": rate,
              "summary": {"overall_ratio": rate[ours.name] / rate["plain"], "pair_ratio": s}}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwritten to {path}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
