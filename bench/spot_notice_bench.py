"""How long a cloud's preemption notice takes to become a durable snapshot, with the real launcher.

    python bench/spot_notice_bench.py                       # LeNet (the default job), 3 rounds
    python bench/spot_notice_bench.py --state 630mb         # 210 MB of parameters + 420 MB of Adam state
    python bench/spot_notice_bench.py --rounds 5 --json /tmp/spot.json

Each round runs ``paddlerun run configs/mnist_lenet.yaml`` (2 CPU workers) with
``supervisor.spot_notice=aws`` pointed at a fake IMDSv2 service on 127.0.0.1 (the tests'
``tests/metadata_servers.py``, polled every ``--poll`` s) and a margin large enough that
the supervisor acts at once. Once rank 0 has trained ``--after`` steps the service starts
answering with a notice; measured from the run's own files:

- seen: notice given -> the supervisor's ``preempt_notice`` event's ``seen_at`` (the poll);
- asked: -> ``preempt_requested`` (the stop request written for the workers);
- durable: -> the ``snapshot_committed`` event of the ``preempted`` snapshot (fsynced, renamed);
- exited: -> the supervisor's exit (75), every worker gone.

``--state 630mb`` swaps LeNet for ``bench/spot_notice_bench.py:big_model``: a 784-1024-...-10
MLP of ~210 MB float32 parameters (plus Adam's two moments: the checkpoint bench's default
size), with ``train.log_every_steps=1`` so that the workers see the request after one step.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import table  # bench/table.py: scripts here run with bench/ on sys.path
from procs import stop

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from metadata_servers import MetadataServer  # noqa: E402  (the tests' fake IMDSv2)
from paddlerun.trainer.rundir.events import read_events  # noqa: E402

MB = 1e6


def big_model(width: int = 1024, mb: float = 210.0):
    """Flatten -> Linear(784, width) -> Linear(width, width) x N -> Linear(width, 10), ~``mb`` MB."""
    import paddle
    layers = max(1, round(mb * MB / ((width * width + width) * 4)) - 1)
    blocks = [paddle.nn.Flatten(), paddle.nn.Linear(784, width), paddle.nn.ReLU()]
    for _ in range(layers):
        blocks += [paddle.nn.Linear(width, width), paddle.nn.ReLU()]
    return paddle.nn.Sequential(*blocks, paddle.nn.Linear(width, 10))


def one_round(state: str, run_dir: Path, after: int, poll_s: float, timeout_s: float) -> dict:
    with MetadataServer("aws") as server:
        sets = ["train.epochs=30", "checkpoint.every_steps=100000", "supervisor.spot_notice=aws",
                f"supervisor.spot_endpoint={server.url}", f"supervisor.spot_poll_s={poll_s}",
                "supervisor.spot_margin_s=120", "supervisor.preempt_grace_s=300",
                "supervisor.hang_timeout_s=120"]
        if state == "630mb":
            sets += ["train.model=spot_notice_bench:big_model", "train.log_every_steps=1",
                     "train.global_batch_size=32"]
        argv = [sys.executable, "-m", "paddlerun.launcher.cli", "run",
                str(REPO / "configs" / "mnist_lenet.yaml"), "--run-dir", str(run_dir)]
        for item in sets:
            argv += ["--set", item]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(REPO / "bench"), os.environ.get("PYTHONPATH", "")])}
        log = open(run_dir.with_suffix(".out"), "w")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            deadline = time.time() + timeout_s
            while _step(run_dir) < after:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the run ended or stalled before step {after}: "
                                       f"see {run_dir.with_suffix('.out')}")
                time.sleep(0.05)
            given = time.time()
            server.give_notice(120)
            code = proc.wait(timeout=timeout_s)
            exited = time.time()
        finally:
            if proc.poll() is None:
                stop(proc)
            log.close()
    events = read_events(run_dir / "events.jsonl")
    notice = next(e for e in events if e["event"] == "preempt_notice")
    asked = next(e for e in events if e["event"] == "preempt_requested")
    saved = next(e for e in events if e["event"] == "snapshot_committed" and e.get("reason") == "preempted")
    return {"exit": code, "seen_s": notice["seen_at"] - given, "asked_s": asked["time"] - given,
            "durable_s": saved["time"] - given, "exited_s": exited - given,
            "persist_s": saved["persist_s"], "step": saved["step"]}


def _step(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "heartbeats" / "rank-0.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state", choices=("lenet", "630mb"), default="lenet")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--after", type=int, default=20, help="steps trained before the notice")
    parser.add_argument("--poll", type=float, default=1.0, help="supervisor.spot_poll_s")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", help="also write the rounds here")
    args = parser.parse_args(argv)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="spot-bench-") as work:
        for i in range(args.rounds):
            result = one_round(args.state, Path(work) / f"round-{i}", args.after, args.poll, args.timeout)
            print(f"round {i}: {json.dumps({k: round(v, 3) for k, v in result.items()})}", flush=True)
            rounds.append(result)
    keys = [("seen_s", "notice -> seen"), ("asked_s", "-> stop asked"), ("durable_s", "-> snapshot durable"),
            ("exited_s", "-> exited 75"), ("persist_s", "persist alone")]
    print(f"\n{args.state}, {args.rounds} rounds, poll every {args.poll:g} s (median, min-max, seconds after the notice)")
    table.print_table(["measure", "median", "min", "max"], [
        [label, f"{statistics.median(r[k] for r in rounds):.2f}", f"{min(r[k] for r in rounds):.2f}",
         f"{max(r[k] for r in rounds):.2f}"] for k, label in keys])
    if args.json:
        Path(args.json).write_text(json.dumps({"state": args.state, "rounds": rounds}, indent=2))
    return 0 if all(r["exit"] == 75 for r in rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
