"""How fast a job recovers from a dead worker, and how much work it redoes, with the real launcher.

    python bench/recovery_bench.py                           # 3 crashes in each of 3 scenarios (~4-5 min on 2 cores)
    python bench/recovery_bench.py --rounds 5 --json /tmp/recovery.json
    python bench/recovery_bench.py --scenarios python --keep  # one scenario; keep the run directories

Each round runs ``paddlerun run configs/mnist_lenet.yaml`` (2 CPU workers through
``paddle.distributed.launch``) with ``train.epochs=7 train.max_steps=400`` (63 steps an
epoch), ``checkpoint.every_steps=50``, ``train.log_every_steps=1`` (so ``metrics.jsonl``
has a line and a time for every step) and ``supervisor.heartbeat_interval_s=0.25``; the
restart policy keeps its defaults (a first failure after training restarts at once). Once rank 1's heartbeat reports a step drawn at
random from ``[--kill-from, --kill-to)`` (the same steps in every scenario), it SIGKILLs
worker(s) by the pids in their heartbeat files, waits for the first training step of the
restarted attempt, then stops the job with SIGTERM (a preemption: snapshot, exit 75)
rather than training to the end. Scenarios:

``python``        kill rank 1; ``train.grad_sync=python`` (paddlerun's default on CPU): the
                  survivor's all-reduce raises in Python and it writes an emergency snapshot
                  of the last completed step.
``dataparallel``  kill rank 1; ``train.grad_sync=dataparallel``: a death seen inside
                  ``paddle.DataParallel``'s backward all-reduce aborts the survivor in C++, no
                  emergency snapshot. (One seen in the per-step metrics all-reduce, which is
                  Python, still gets one: the table counts how often that happened.)
``kill-all``      kill both ranks at once (a lost node): nobody can write an emergency
                  snapshot; the newest scheduled one is used.

Measured, from ``events.jsonl``, ``metrics.jsonl`` and the worker logs:

- cold start: ``paddlerun run`` started -> first training step completed (its metrics
  line), split into supervisor start (-> ``started`` event) and launch + workers
  (-> first step: import Paddle, rendezvous, data, restore);
- detection: SIGKILL -> ``worker_failed``'s ``failed_at``, the start of the supervisor
  poll (every 0.1 s) that saw the death -- so it can come out a few ms *before* the
  kill -- and SIGKILL -> the ``worker_failed`` event written (after 0.2 s more for an
  error file to appear);
- teardown: ``worker_failed`` -> ``teardown`` (the launcher's own shutdown of the other
  worker, during which a survivor writes its emergency snapshot, then the process tree);
- backoff: ``teardown`` -> the next ``started``;
- restart: the next ``started`` -> its first training step;
- total: SIGKILL -> the first training step of the next attempt, and total / cold start;
- steps redone: the last step completed before the crash minus the step the next
  attempt resumed from (``resumed from .../step-XXXXXXXX`` in its workerlog.0; 0 when
  none). The last completed step is the last ``metrics.jsonl`` train line of the
  crashed attempt, or the emergency snapshot's step if that is later (a peer can die
  after the gradient all-reduce of a step, before it is logged). Training time redone
  is that times the crashed attempt's mean step time.

Every round checks that no process of its run is left (and kills any it finds, saying so).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import psutil

import table  # bench/table.py: scripts here run with bench/ on sys.path
from chaos import processes_of  # never this process or its ancestors
from paddlerun.trainer.rundir.events import read_events
from paddlerun.trainer.rundir.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "mnist_lenet.yaml"
EVERY_STEPS = 50
SETTINGS = ["job.name=recovery_bench", "train.epochs=7", "train.max_steps=400", f"checkpoint.every_steps={EVERY_STEPS}",
            "train.log_every_steps=1", "supervisor.heartbeat_interval_s=0.25"]
RESUMED = re.compile(r"resumed from \S*step-(\d+)")
POLL_S = 0.02
#: scenario -> (train.grad_sync, ranks to SIGKILL)
SCENARIOS = {"python": ("python", (1,)), "dataparallel": ("dataparallel", (1,)),
             "kill-all": ("python", (1, 0))}


class RoundFailed(RuntimeError):
    """A round that did not go as the benchmark needs (names what and where to look)."""


def wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen, out: Path):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise RoundFailed(f"paddlerun exited with {proc.returncode} while waiting for {what}; "
                              f"see {out}")
        time.sleep(POLL_S)
    raise RoundFailed(f"timed out after {timeout_s:g} s waiting for {what}; see {out}")


def heartbeat(run_dir: Path, rank: int) -> Optional[dict]:
    try:
        return json.loads((run_dir / "heartbeats" / f"rank-{rank}.json").read_text())
    except (OSError, ValueError):
        return None


def train_lines(run_dir: Path, attempt: int) -> List[dict]:
    return [m for m in read_metrics(run_dir / "metrics.jsonl")
            if m.get("attempt") == attempt and "loss" in m]


def event(events: List[dict], name: str, attempt: int) -> dict:
    found = [e for e in events if e["event"] == name and e["attempt"] == attempt]
    if not found:
        raise RoundFailed(f"no {name!r} event for attempt {attempt} in events.jsonl "
                          f"(events: {[(e['event'], e['attempt']) for e in events]})")
    return found[0]


def reap_leftovers(run_dir: Path, timeout_s: float = 15) -> List[int]:
    """Pids of the run still alive ``timeout_s`` after it ended (killed, and reported)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        left = processes_of(run_dir)
        if not left:
            return []
        time.sleep(0.2)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    return [p.pid for p in left]


def one_round(scenario: str, kill_step: int, run_dir: Path, timeout_s: float) -> Dict[str, Any]:
    grad_sync, victims = SCENARIOS[scenario]
    out = run_dir.with_suffix(".out")
    argv = [sys.executable, "-m", "paddlerun.launcher.cli", "run", str(CONFIG), "--run-dir", str(run_dir)]
    for item in (*SETTINGS, f"train.grad_sync={grad_sync}"):
        argv += ["--set", item]
    with open(out, "wb") as log:
        launched = time.time()
        proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        first = wait_for(lambda: train_lines(run_dir, 0), timeout_s, "the first training step",
                         proc, out)[0]
        victim = wait_for(lambda: (lambda hb: hb if hb and hb["step"] >= kill_step and hb["phase"] == "train"
                                   and hb.get("attempt", 0) == 0 else None)(heartbeat(run_dir, 1)),
                          timeout_s, f"rank 1 to reach step {kill_step}", proc, out)
        pids = [victim["pid"] if rank == 1 else heartbeat(run_dir, rank)["pid"] for rank in victims]
        killed = time.time()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        resumed_first = wait_for(lambda: train_lines(run_dir, 1), timeout_s,
                                 "the first training step after the restart", proc, out)[0]
        proc.send_signal(signal.SIGTERM)  # preempt: snapshot, exit 75
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            raise RoundFailed(f"paddlerun did not stop within 120 s of SIGTERM; see {out}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    leftovers = reap_leftovers(run_dir)

    events = read_events(run_dir / "events.jsonl")
    started0, started1 = event(events, "started", 0), event(events, "started", 1)
    failed = event(events, "worker_failed", 0)
    teardown = event(events, "teardown", 0)
    emergency = [e["step"] for e in events if e["event"] == "snapshot_committed"
                 and e.get("reason") == "emergency" and e["attempt"] == 0]
    crashed_lines = train_lines(run_dir, 0)
    last_logged = crashed_lines[-1]["step"]
    last_completed = max([last_logged, *emergency])
    log0 = (run_dir / "logs" / "attempt-1" / "workerlog.0").read_text(errors="replace")
    found = RESUMED.findall(log0)
    resumed_step = int(found[-1]) if found else 0
    if resumed_first["step"] != resumed_step + 1:
        raise RoundFailed(f"attempt 1's first step is {resumed_first['step']}, but it says it resumed "
                          f"from step {resumed_step}; see {run_dir}/logs/attempt-1/workerlog.0")
    steps = [m for m in crashed_lines if m["step"] > 1]
    step_s = (steps[-1]["time"] - steps[0]["time"]) / max(steps[-1]["step"] - steps[0]["step"], 1) \
        if len(steps) > 1 else None
    cold = first["time"] - launched
    total = resumed_first["time"] - killed
    return {
        "scenario": scenario, "grad_sync": grad_sync, "killed_ranks": list(victims),
        "kill_target_step": kill_step, "killed_at_heartbeat_step": victim["step"],
        "exit_code": code, "cause": failed.get("cause"), "leftover_pids": leftovers,
        "cold_start_s": cold,
        "cold_supervisor_s": started0["time"] - launched,
        "cold_workers_to_first_step_s": first["time"] - started0["time"],
        "detection_s": failed["failed_at"] - killed,
        "detection_reported_s": failed["time"] - killed,
        "teardown_s": teardown["time"] - failed["time"],
        "backoff_s": started1["time"] - teardown["time"],
        "restart_to_first_step_s": resumed_first["time"] - started1["time"],
        "total_s": total, "total_over_cold_start": total / cold,
        "last_completed_step": last_completed, "last_logged_step": last_logged,
        "emergency_snapshot_step": emergency[0] if emergency else None,
        "resumed_from_step": resumed_step, "steps_redone": last_completed - resumed_step,
        "step_s": step_s,
        "time_redone_s": (last_completed - resumed_step) * step_s if step_s else None,
    }


STAGES = ["cold_start_s", "cold_supervisor_s", "cold_workers_to_first_step_s", "detection_s",
          "detection_reported_s", "teardown_s", "backoff_s", "restart_to_first_step_s",
          "total_s", "total_over_cold_start", "steps_redone", "time_redone_s"]


def summarize(rounds: List[Dict[str, Any]]) -> Dict[str, Any]:
    summary: Dict[str, Any] = {}
    for key in STAGES:
        values = [r[key] for r in rounds if r.get(key) is not None]
        if values:
            summary[key] = {"median": statistics.median(values), "mean": statistics.fmean(values),
                            "min": min(values), "max": max(values), "n": len(values)}
    without = [r["steps_redone"] for r in rounds if r["emergency_snapshot_step"] is None]
    summary["emergency_snapshots"] = {"written": len(rounds) - len(without), "of": len(rounds)}
    if without:
        summary["steps_redone_without_emergency"] = {
            "mean": statistics.fmean(without), "min": min(without), "max": max(without), "n": len(without)}
    return summary


LABELS = {"cold_start_s": "cold start -> first step (s)",
          "cold_supervisor_s": "  of which supervisor start (s)",
          "cold_workers_to_first_step_s": "  of which launch + workers (s)",
          "detection_s": "SIGKILL -> noticed (s)",
          "detection_reported_s": "SIGKILL -> worker_failed event (s)",
          "teardown_s": "worker_failed -> torn down (s)", "backoff_s": "torn down -> restarted (s)",
          "restart_to_first_step_s": "restarted -> first step (s)",
          "total_s": "SIGKILL -> first step again (s)", "total_over_cold_start": "total / cold start",
          "emergency_snapshots": "emergency snapshots written",
          "steps_redone": "steps redone, mean (min-max)",
          "steps_redone_without_emergency": "  when no emergency snapshot",
          "time_redone_s": "training time redone (s), mean"}


def cell(key: str, s: Optional[Dict[str, Any]]) -> str:
    if s is None:
        return "-"
    if key == "emergency_snapshots":
        return f"{s['written']} of {s['of']}"
    if key.startswith("steps_redone"):
        return f"{s['mean']:.1f} ({s['min']}-{s['max']})"
    if key == "time_redone_s":
        return f"{s['mean']:.2f} ({s['min']:.2f}-{s['max']:.2f})"
    return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"


def print_results(by_scenario: Dict[str, Dict[str, Any]]) -> None:
    names = list(by_scenario)
    head = ["median (min-max)"] + names
    rows = [[label] + [cell(key, by_scenario[n].get(key)) for n in names] for key, label in LABELS.items()]
    table.print_table(head, rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="crashes per scenario (default 3)")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS),
                        help="which crashes to run (default: all three)")
    parser.add_argument("--kill-from", type=int, default=55, help="kill at a step drawn from [from, to)")
    parser.add_argument("--kill-to", type=int, default=155)
    parser.add_argument("--seed", type=int, default=6, help="seeds the kill steps (reproducible rounds)")
    parser.add_argument("--dir", default=None, help="where the run directories go (default $TMPDIR or /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the run directories")
    parser.add_argument("--timeout", type=float, default=180, help="seconds to wait for any one stage")
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "recovery_bench.json"),
                        help="write the results here (default bench/results/recovery_bench.json)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or not 1 < args.kill_from < args.kill_to < 400:
        parser.error("need --rounds >= 1 and 1 < --kill-from < --kill-to < 400")
    work = Path(tempfile.mkdtemp(prefix="paddlerun-recovery-bench-", dir=args.dir))
    rng = random.Random(args.seed)
    kill_steps = [rng.randrange(args.kill_from, args.kill_to) for _ in range(args.rounds)]
    print(f"recovery bench: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, "
          f"run directories in {work}; kill steps {kill_steps} (the same in every scenario)", flush=True)
    results: Dict[str, List[Dict[str, Any]]] = {n: [] for n in args.scenarios}
    load = [os.getloadavg()[0]]
    try:
        for i, kill_step in enumerate(kill_steps):
            for name in args.scenarios:  # interleaved, so a slow patch of the machine hits all
                r = one_round(name, kill_step, work / f"{name}-{i}", args.timeout)
                load.append(os.getloadavg()[0])
                results[name].append(r)
                print(f"  {name:12s} killed at step {r['killed_at_heartbeat_step']:3d}: noticed after "
                      f"{r['detection_s']:.2f} s, first step again after {r['total_s']:.2f} s "
                      f"(cold start {r['cold_start_s']:.2f} s), resumed from {r['resumed_from_step']} "
                      f"({'emergency' if r['emergency_snapshot_step'] is not None else 'scheduled'} "
                      f"snapshot), redid {r['steps_redone']} steps; exit {r['exit_code']}"
                      + (f"; LEFTOVER pids {r['leftover_pids']} killed" if r["leftover_pids"] else ""),
                      flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    summary = {n: summarize(rs) for n, rs in results.items()}
    print(f"\n{args.rounds} crashes per scenario; checkpoint.every_steps={EVERY_STEPS}; "
          f"load average (1 min) {min(load):.1f}-{max(load):.1f} on {os.cpu_count()} CPUs\n")
    print_results(summary)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "machine": {"nproc": os.cpu_count(), "load_average_1min": load}, "time": time.time(),
        "argv": sys.argv[1:], "settings": SETTINGS, "scenarios": {n: SCENARIOS[n] for n in args.scenarios},
        "kill_steps": kill_steps, "summary": summary, "rounds": results}, indent=1) + "\n")
    print(f"\nwritten to {path}" + (f"; run directories kept in {work}" if args.keep else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
