"""Steady-state cost of paddlerun with the machine's drift cancelled: the jobs take turns.

    python bench/timeslice_bench.py --variants plain-again paddlerun          # 5 launches x 8 turns, ~8 min on 2 cores
    python bench/timeslice_bench.py --launches 8 --variants plain-again paddlerun dataparallel no-snapshots
    git worktree add /tmp/before HEAD~1 && python bench/timeslice_bench.py --baseline /tmp/before

``overhead_bench.py`` runs plain and paddlerun one after the other. On the 2-core VM this
project is built on, speed drifts by ±15 % between runs a minute apart (the same job,
measured again), so even 30 pairs leave the median ratio uncertain by ±3 %. Here all jobs
run at once and take turns on the machine: while one runs for ``--turn-s`` seconds, every
process of the others -- supervisor, launcher, workers, all their threads -- is stopped
(SIGSTOP), then the next one runs (SIGCONT). The order is shuffled from round to round,
so drift within a round favours none and no job always follows the same one.

That cancels drift, not a job's own luck: two identical plain jobs side by side came out
4.6 % apart over 40 rounds (0.954), every quarter of the run the same way, presumably
from where each process's memory and threads happened to land. So all jobs are started
afresh ``--launches`` times, each launch in another start order, and the ratio is taken
per launch; the ``plain-again`` control shows the spread that is left. The jobs:

``plain``      ``bench/plain_train.py`` under ``python -m paddle.distributed.launch
               --nproc_per_node 2``: LeNet, MNIST, global batch 64, Adam, DataParallel,
               no checkpoints; ``--progress`` makes rank 0 note (step, time) every 10 steps.
``paddlerun``  ``paddlerun run configs/mnist_lenet.yaml`` with its default schedule, or
               another of overhead_bench's variants (``no-snapshots``, ``dataparallel``);
               rank 0's metrics.jsonl has (step, time) every 10 steps. Evaluation is off in
               all of them (``train.eval_every_epochs=100000``): plain has none.
``plain-under-supervisor``  the plain script under ``paddlerun run --script``: what the
               supervisor costs around an unchanged job.
``plain-again``  a second plain job: the control, how far apart two identical jobs
               come out in the same run.
``baseline``   with ``--baseline DIR``: paddlerun's default from another checkout (imported
               as ``paddlerun`` through a symlink first on ``PYTHONPATH``), to measure a
               change against the version before it in the same turns.

A turn's speed is the steps between its first and last progress record over the time
between them (so a step cut by the stop is not counted). The table gives, per job, the
ratio of its total steps over its total measured time to plain's; the median over the
launches of that ratio within each launch; and the median over all rounds of its speed
over plain's in the same round; medians with a bootstrap 95 % confidence interval. In
each launch all jobs start together and run side by side until each is past ``--warmup``
steps (start-up is not measured); at its end all are stopped (paddlerun with SIGTERM: it
snapshots and exits 75).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
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
from paddlerun.trainer.rundir.metrics import read_metrics

Record = Tuple[int, float]  # (step, time.time() after it)


class Job:
    def __init__(self, name: str, argv: List[str], log: Path, progress: Path, paddlerun: bool,
                 env: Optional[Dict[str, str]] = None):
        self.name, self.argv, self.log, self.progress, self.paddlerun = name, argv, log, progress, paddlerun
        self.env = env
        self.proc: Optional[subprocess.Popen] = None
        self.processes: List[psutil.Process] = []

    def start(self) -> None:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=self.env)

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
#: A second plain job, the control: how far apart two identical jobs come out in one run.
PLAIN_AGAIN = "plain-again"


#: paddlerun's default from another checkout (``--baseline DIR``): a change against the version before it.
BASELINE = "baseline"


def make_jobs(work: Path, names: List[str], baseline: Optional[Path] = None) -> List[Job]:
    steps = 1_000_000  # never reached: the jobs are stopped after the last turn

    def plain_args(progress: Path) -> List[str]:
        return [str(PLAIN), "--steps", str(steps), "--warmup", "1", "--progress", str(progress)]

    def plain_job(name: str) -> Job:
        progress = work / f"{name}-progress.txt"
        return Job(name, [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
                          "--log_dir", str(work / f"{name}-logs"), *plain_args(progress)],
                   work / f"{name}.out", progress, paddlerun=False)

    jobs = [plain_job("plain")]
    for name in names:
        if name == PLAIN_AGAIN:
            jobs.append(plain_job(name))
            continue
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
        jobs.append(paddlerun_job(work, name, VARIANTS[name], steps))
    if baseline is not None:
        # The checkout is imported as ``paddlerun`` through a symlink put first on the path.
        package_dir = work / "baseline-package"
        package_dir.mkdir()
        (package_dir / "paddlerun").symlink_to(baseline.resolve())
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(package_dir),
                                                                         os.environ.get("PYTHONPATH")]))}
        jobs.append(paddlerun_job(work, BASELINE, [], steps, config=baseline / CONFIG.relative_to(REPO), env=env))
    return jobs


def paddlerun_job(work: Path, name: str, settings: List[str], steps: int, config: Path = CONFIG,
                  env: Optional[Dict[str, str]] = None) -> Job:
    sets = [f"job.name=timeslice_{name}", "train.epochs=100000", f"train.max_steps={steps}",
            "train.eval_every_epochs=100000", *settings]
    argv = [sys.executable, "-m", "paddlerun.launcher.cli", "run", str(config),
            "--run-dir", str(work / name), *[x for s in sets for x in ("--set", s)]]
    return Job(name, argv, work / f"{name}.out", work / name / "metrics.jsonl", paddlerun=True, env=env)


def run_launch(names: List[str], args, launch: int):
    """Start every job afresh, run them to the warm-up step, then ``args.turns`` rounds of
    turns; stop them all. Returns each job's speed per turn, and the turns."""
    work = Path(tempfile.mkdtemp(prefix="paddlerun-timeslice-bench-"))
    jobs = make_jobs(work, [n for n in names if n != BASELINE], args.baseline)
    turns: List[Tuple[str, float, float]] = []
    try:
        # Each launch starts the jobs in another order: no job is always first.
        shift = launch % len(jobs)
        for job in jobs[shift:] + jobs[:shift]:
            job.start()
        wait_until(lambda: all(j.step() >= args.warmup for j in jobs), 600, f"step {args.warmup}", jobs)
        for job in jobs:
            job.freeze_process_list()
            job.signal(signal.SIGSTOP)
        for i in range(args.turns):
            # A new order every round (seeded): drift within a round favours none, and no
            # job always follows the same one. Rotated instead, the control plain-again
            # (always right after plain) came out behind plain in 6 launches of 6: 0.965
            # overall; shuffled, 0.986.
            for job in random.Random(f"{launch}-{i}").sample(jobs, len(jobs)):
                job.signal(signal.SIGCONT)
                started = time.time()
                time.sleep(args.turn_s)
                job.signal(signal.SIGSTOP)
                turns.append((job.name, started, time.time()))
                job.check_alive()
    finally:
        for job in jobs:
            job.signal(signal.SIGCONT)
            if job.proc is not None:
                stop(job.proc)
    records = {job.name: job.records() for job in jobs}
    speeds = {job.name: [turn_speed(records[job.name], start, end) for name, start, end in turns
                         if name == job.name] for job in jobs}
    shutil.rmtree(work, ignore_errors=True)
    return speeds, turns


def totals_of(speeds: List[Optional[Tuple[int, float]]]) -> Tuple[int, float]:
    return sum(s[0] for s in speeds if s), sum(s[1] for s in speeds if s)


def rate_of(speeds: List[Optional[Tuple[int, float]]]) -> float:
    steps_done, seconds = totals_of(speeds)
    return steps_done * GLOBAL_BATCH / seconds


def describe_spread(s: Dict) -> str:
    return f"{s['median']:.3f} ({s['ci95'][0]:.3f}..{s['ci95'][1]:.3f}; {s['min']:.3f}..{s['max']:.3f})"


def describe(name: str) -> List[str]:
    """A job's settings, for the JSON."""
    if name in VARIANTS:
        return VARIANTS[name]
    return {SCRIPT: ["--script", str(PLAIN)], PLAIN_AGAIN: [str(PLAIN)], BASELINE: []}[name]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--launches", type=int, default=5,
                        help="times every job is started afresh (default 5): identical jobs differ by "
                             "a few per cent from launch to launch, so one launch cannot tell")
    parser.add_argument("--turns", type=int, default=8, help="turns of each job per launch (default 8)")
    parser.add_argument("--turn-s", type=float, default=3.0, help="seconds per turn (default 3)")
    parser.add_argument("--warmup", type=int, default=100, help="steps each job runs before turns start")
    choices = [v for v in VARIANTS if VARIANTS[v] is not None] + [SCRIPT, PLAIN_AGAIN]
    parser.add_argument("--variants", nargs="+", default=["paddlerun"], choices=choices,
                        help="the jobs to measure against plain (default: paddlerun)")
    parser.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                        help="also run paddlerun's default from the checkout DIR (say, a git worktree "
                             "of the commit before a change), as the job 'baseline'")
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "timeslice_bench.json"))
    args = parser.parse_args(argv)
    if args.baseline is not None and not (args.baseline / "launcher" / "cli.py").is_file():
        parser.error(f"--baseline {args.baseline} is not a paddlerun checkout (no launcher/cli.py)")
    names = list(dict.fromkeys(args.variants)) + ([BASELINE] if args.baseline else [])

    print(f"timeslice bench: {os.cpu_count()} CPUs, {args.launches} launches x {args.turns} turns of "
          f"{args.turn_s:g} s per job, plain against {', '.join(names)}", flush=True)
    speeds: Dict[str, List[Optional[Tuple[int, float]]]] = {name: [] for name in ["plain", *names]}
    per_launch: Dict[str, List[float]] = {name: [] for name in names}
    turns: List[Tuple[int, str, float, float]] = []
    for launch in range(args.launches):
        got, launch_turns = run_launch(names, args, launch)
        turns += [(launch, *t) for t in launch_turns]
        for name in speeds:
            speeds[name] += got[name]
        launch_rate = {name: rate_of(got[name]) for name in got}
        for name in names:
            per_launch[name].append(launch_rate[name] / launch_rate["plain"])
        print(f"  launch {launch + 1}/{args.launches}: " + ", ".join(
            f"{name} {per_launch[name][-1]:.3f}" for name in names), flush=True)

    rate = {name: rate_of(got) for name, got in speeds.items()}
    totals = {name: totals_of(got) for name, got in speeds.items()}
    rows = [["plain", str(totals["plain"][0]), f"{totals['plain'][1]:.1f}", f"{rate['plain']:.0f}", "1", "", ""]]
    summary, ratios = {}, {}
    for name in names:
        # Per round: this job's speed over plain's in the same round of turns.
        ratios[name] = [(o[0] / o[1]) / (p[0] / p[1]) for p, o in zip(speeds["plain"], speeds[name])
                        if p and o and p[1] > 0 and o[1] > 0]
        by_round, by_launch = spread(ratios[name]), spread(per_launch[name])
        summary[name] = {"overall_ratio": rate[name] / rate["plain"], "launch_ratio": by_launch,
                         "round_ratio": by_round}
        rows.append([name, str(totals[name][0]), f"{totals[name][1]:.1f}", f"{rate[name]:.0f}",
                     f"{rate[name] / rate['plain']:.3f}", describe_spread(by_launch), describe_spread(by_round)])
    print(f"\nsamples/s while running (global batch {GLOBAL_BATCH}, 2 CPU workers), {args.launches} launches "
          f"x {args.turns} rounds of turns:")
    print_table(["job", "steps measured", "seconds measured", "samples/s", "/ plain overall",
                 "/ plain per launch: median (95% CI; min..max)",
                 "/ plain per round: median (95% CI; min..max)"], rows)
    result = {"machine": {"nproc": os.cpu_count(), "python": platform.python_version()},
              "time": time.time(), "argv": sys.argv[1:] if argv is None else list(argv),
              "variants": {name: describe(name) for name in names},
              "baseline": str(args.baseline.resolve()) if args.baseline else None,
              "launches": args.launches, "turn_s": args.turn_s, "turns": turns, "speeds": speeds,
              "ratios": ratios, "launch_ratios": per_launch, "samples_per_s": rate, "summary": summary}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
