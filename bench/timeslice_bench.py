"""Steady-state cost of paddlerun with the machine's drift cancelled: the jobs take turns.

    python bench/timeslice_bench.py                        # 40 turns of 3 s each, ~5 min on 2 cores
    python bench/timeslice_bench.py --turns 30 --variants paddlerun dataparallel no-snapshots plain-under-supervisor

``overhead_bench.py`` runs plain and paddlerun one after the other. On the 2-core VM this
project is built on, speed drifts by ±15 % between runs a minute apart (the same job,
measured again), so even 30 pairs leave the median ratio uncertain by ±3 %. Here all jobs
run at once and take turns on the machine: while one runs for ``--turn-s`` seconds, every
process of the others -- supervisor, launcher, workers, all their threads -- is stopped
(SIGSTOP), then the next one runs (SIGCONT). The order rotates from round to round (ABBA
for two jobs), so drift within a round favours none. The jobs:

``plain``      ``bench/plain_train.py`` under ``python -m paddle.distributed.launch
               --nproc_per_node 2``: LeNet, MNIST, global batch 64, Adam, DataParallel,
               no checkpoints; ``--progress`` makes rank 0 note (step, time) every 10 steps.
``paddlerun``  ``paddlerun run configs/mnist_lenet.yaml`` with its default schedule, or
               another of overhead_bench's variants (``no-snapshots``, ``dataparallel``);
               rank 0's metrics.jsonl has (step, time) every 10 steps. Evaluation is off in
               all of them (``train.eval_every_epochs=100000``): plain has none.
``plain-under-supervisor``  the plain script under ``paddlerun run --script``: what the
               supervisor costs around an unchanged job.

A turn's speed is the steps between its first and last progress record over the time
between them (so a step cut by the stop is not counted). The table gives, per job, the
ratio of its total steps over its total measured time to plain's, and the median over the
rounds of its speed over plain's in the same round, with a bootstrap 95 % confidence
interval. All jobs start together and run side by side until each is past ``--warmup``
steps (start-up is not measured); at the end all are stopped (paddlerun with SIGTERM: it
snapshots and exits 75).
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


#: A job besides paddlerun's variants: the plain script under ``paddlerun run --script``
#: (the supervisor and Paddle's launcher around it, no heartbeats, no snapshots).
SCRIPT = "plain-under-supervisor"


def make_jobs(work: Path, names: List[str]) -> List[Job]:
    steps = 1_000_000  # never reached: the jobs are stopped after the last turn

    def plain_args(progress: Path) -> List[str]:
        return [str(PLAIN), "--steps", str(steps), "--warmup", "1", "--progress", str(progress)]

    jobs = [Job("plain", [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
                          "--log_dir", str(work / "plain-logs"), *plain_args(work / "plain-progress.txt")],
                work / "plain.out", work / "plain-progress.txt", paddlerun=False)]
    for name in names:
        if name == SCRIPT:
            progress = work / f"{name}-progress.txt"
            # The script sends no heartbeats (so no start timeout) and ignores stop
            # requests (so a short grace: the SIGTERM at the end stops it at once).
            argv = [sys.executable, "-m", "paddlerun.launcher.cli", "run", "--script", str(PLAIN),
                    "--nproc-per-node", "2", "--run-dir", str(work / name),
                    "--set", "supervisor.start_timeout_s=1000000", "--set", "supervisor.preempt_grace_s=1", "--",
                    *plain_args(progress)[1:]]
            jobs.append(Job(name, argv, work / f"{name}.out", progress, paddlerun=False))
            continue
        sets = [f"job.name=timeslice_{name}", "train.epochs=100000", f"train.max_steps={steps}",
                "train.eval_every_epochs=100000", *VARIANTS[name]]
        argv = [sys.executable, "-m", "paddlerun.launcher.cli", "run", str(CONFIG),
                "--run-dir", str(work / name), *[x for s in sets for x in ("--set", s)]]
        jobs.append(Job(name, argv, work / f"{name}.out", work / name / "metrics.jsonl", paddlerun=True))
    return jobs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=40, help="turns of each job (default 40)")
    parser.add_argument("--turn-s", type=float, default=3.0, help="seconds per turn (default 3)")
    parser.add_argument("--warmup", type=int, default=100, help="steps each job runs before turns start")
    choices = [v for v in VARIANTS if VARIANTS[v] is not None] + [SCRIPT]
    parser.add_argument("--variants", nargs="+", default=["paddlerun"], choices=choices,
                        help="the jobs to measure against plain (default: paddlerun)")
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "timeslice_bench.json"))
    args = parser.parse_args(argv)
    names = list(dict.fromkeys(args.variants))

    work = Path(tempfile.mkdtemp(prefix="paddlerun-timeslice-bench-"))
    jobs = make_jobs(work, names)
    turns: List[Tuple[str, float, float]] = []
    print(f"timeslice bench: {os.cpu_count()} CPUs, {args.turns} turns of {args.turn_s:g} s per job, "
          f"plain against {', '.join(names)}; work dir {work}", flush=True)
    try:
        for job in jobs:
            job.start()
        wait_until(lambda: all(j.step() >= args.warmup for j in jobs), 600, f"step {args.warmup}", jobs)
        for job in jobs:
            job.freeze_process_list()
            job.signal(signal.SIGSTOP)
        for i in range(args.turns):
            # Rotate the order: every job takes every place in a round equally often
            # (ABBA for two jobs), so drift within a round favours none.
            shift = i % len(jobs)
            for job in jobs[shift:] + jobs[:shift]:
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
    totals = {name: (sum(s[0] for s in got if s), sum(s[1] for s in got if s)) for name, got in speeds.items()}
    rate = {name: steps_done * GLOBAL_BATCH / seconds for name, (steps_done, seconds) in totals.items()}
    rows = [["plain", str(totals["plain"][0]), f"{totals['plain'][1]:.1f}", f"{rate['plain']:.0f}", "1", ""]]
    summary, ratios = {}, {}
    for name in names:
        # Per round: this job's speed over plain's in the same round of turns.
        ratios[name] = [(o[0] / o[1]) / (p[0] / p[1]) for p, o in zip(speeds["plain"], speeds[name])
                        if p and o and p[1] > 0 and o[1] > 0]
        s = spread(ratios[name])
        summary[name] = {"overall_ratio": rate[name] / rate["plain"], "round_ratio": s}
        rows.append([name, str(totals[name][0]), f"{totals[name][1]:.1f}", f"{rate[name]:.0f}",
                     f"{rate[name] / rate['plain']:.3f}",
                     f"{s['median']:.3f} ({s['ci95'][0]:.3f}..{s['ci95'][1]:.3f}; {s['min']:.3f}..{s['max']:.3f})"])
    print(f"\nsamples/s while running (global batch {GLOBAL_BATCH}, 2 CPU workers), {args.turns} rounds of turns:")
    print_table(["job", "steps measured", "seconds measured", "samples/s", "/ plain overall",
                 "/ plain per round: median (95% CI; min..max)"], rows)
    result = {"machine": {"nproc": os.cpu_count(), "python": platform.python_version()},
              "time": time.time(), "argv": sys.argv[1:] if argv is None else list(argv),
              "variants": {name: VARIANTS.get(name, ["--script", str(PLAIN)]) for name in names},
              "turn_s": args.turn_s, "turns": turns, "speeds": speeds, "ratios": ratios,
              "samples_per_s": rate, "summary": summary}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwritten to {path}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
