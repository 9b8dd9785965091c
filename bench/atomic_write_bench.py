"""Cost of one atomic file replacement, the way the heartbeat writes (a ~250-byte JSON).

    python bench/atomic_write_bench.py [--dir DIR] [--writes N] [--rounds R]

Compares, in the same directory and alternating rounds (median over rounds, per write):
``inline``  the heartbeat's former hand-written temp file + rename;
``write_atomic(durable=False)``  the shared primitive, as heartbeats now use it;
``write_atomic(durable=True)``  with fsync of the file and the directory (summary.json).
"""
import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from paddlerun.trainer.rundir.atomic_file import write_atomic

DATA = json.dumps({"rank": 0, "pid": 12345, "create_time": 1.7e9, "step": 1234, "time": 1.7e9,
                   "step_time": 1.7e9, "attempt": 0, "host": "node-1", "phase": "train"}).encode()


def inline(path: Path, tmp: Path) -> None:
    with open(tmp, "wb") as f:
        f.write(DATA)
    os.replace(tmp, path)


def per_write_us(fn, writes: int) -> float:
    started = time.perf_counter()
    for _ in range(writes):
        fn()
    return (time.perf_counter() - started) / writes * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", help="where to write (default: a temporary directory)")
    parser.add_argument("--writes", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        path = Path(d) / "rank-0.json"
        cases = {
            "inline (before)": lambda: inline(path, Path(d) / ".rank-0.json.tmp"),
            "write_atomic(durable=False)": lambda: write_atomic(path, DATA, durable=False),
            "write_atomic(durable=True)": lambda: write_atomic(path, DATA, durable=True),
        }
        figures = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, fn in cases.items():
                writes = args.writes if "True" not in name else max(args.writes // 20, 10)
                figures[name].append(per_write_us(fn, writes))
    print(f"{'writer':<30} {'median us/write':>16} {'min':>8} {'max':>8}   ({args.rounds} rounds, {d})")
    for name, values in figures.items():
        print(f"{name:<30} {statistics.median(values):>16.1f} {min(values):>8.1f} {max(values):>8.1f}")


if __name__ == "__main__":
    main()
