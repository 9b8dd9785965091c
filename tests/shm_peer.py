"""A rank of test_shm_reduce.py's shared-memory sums, in its own process.

    python shm_peer.py PATH RANK WORLD TOKEN_HEX OUT_DIR [KIND SEED CALLS]

Attaches, prints "attached", waits for "go" on stdin, then sums:

* without KIND: the arrays of ``arrays(rank)`` in order, saving each result as
  OUT_DIR/rank-R-I.npy, then prints "done";
* with KIND: the CALLS arrays of ``Plan(KIND, SEED, WORLD)``, checking every sum against
  numpy's, then prints "done N" (N sums, all right), or "wrong I" at the first wrong sum,
  or "error TYPE: MESSAGE" if a sum raised.

Then it waits for stdin to close (so a test can kill it between sums).
"""
import sys
import time
from pathlib import Path

import numpy as np

from paddlerun.trainer.shm_reduce import CHUNK, SharedMemorySum


def arrays(rank: int):
    rng = np.random.default_rng(rank)
    # more than one round, exactly one round, tiny, float64; twice (both sets of slots)
    shapes = [((CHUNK // 4) * 2 + 123,), (CHUNK // 4,), (1,), (3, 5)]
    dtypes = [np.float32, np.float32, np.float32, np.float64]
    return [rng.standard_normal(shape).astype(dtype) for _ in range(2)
            for shape, dtype in zip(shapes, dtypes)]


class Plan:
    """The same sequence of sums on every rank: each call's size and dtype come from
    ``seed`` alone, each rank's values from ``(seed, rank)``, so any rank can work out
    every rank's input and the rank-order sum numpy gives. The values are slices of a
    random pool per rank and dtype, made once: drawing them afresh for every call took
    most of a stress test's time.

    ``kind`` "mixed": random dtypes (float16/32/64, int32/64) and sizes, nearly all
    tiny (quick rounds), 2 % up to 50,000 elements, 0.2 % over one CHUNK (several
    rounds). "same": 64 float32 every time (a slot left from an earlier round of the
    same parity has the right size).
    """

    DTYPES = [np.float16, np.float32, np.float64, np.int32, np.int64]

    def __init__(self, kind: str, seed: int, world: int):
        if kind not in ("mixed", "same"):
            raise ValueError(f"unknown plan {kind!r}")
        self.kind = kind
        self._rng = np.random.default_rng([seed, 1000])
        self._pools = {}  # dtype -> every rank's pool of values: 1.5 CHUNKs
        for dtype in map(np.dtype, self.DTYPES if kind == "mixed" else [np.float32]):
            size = 3 * CHUNK // 2 // dtype.itemsize
            pools = []
            for rank in range(world):
                rng = np.random.default_rng([seed, rank, dtype.num])
                pools.append(rng.standard_normal(size, dtype=np.float32).astype(dtype)
                             if dtype.kind == "f" else rng.integers(-1000, 1000, size, dtype=dtype))
            self._pools[dtype] = pools

    def next_call(self):
        """(every rank's input, a fresh array each, and their sum in rank order) of the
        next call."""
        rng = self._rng
        if self.kind == "same":
            dtype, size = np.dtype(np.float32), 64
        else:
            dtype = np.dtype(self.DTYPES[rng.integers(len(self.DTYPES))])
            u = rng.random()
            pool = self._pools[dtype][0].size
            if u < 0.002:
                size = int(rng.integers(CHUNK // dtype.itemsize + 1, pool))
            elif u < 0.02:
                size = int(rng.integers(100, 50_000))
            else:
                size = int(rng.integers(1, 100))
        pools = self._pools[dtype]
        start = int(rng.integers(pools[0].size - size + 1))
        inputs = [pool[start:start + size].copy() for pool in pools]
        expected = inputs[0] + inputs[1]
        for x in inputs[2:]:
            expected += x
        return inputs, expected


def pause(rng: np.random.Generator) -> None:
    """Now and then this rank arrives late, so that every rank is sometimes last."""
    u = rng.random()
    if u < 0.02:
        time.sleep(rng.random() * 0.001)
    elif u < 0.07:  # a little later without giving up the CPU
        until = time.perf_counter() + rng.random() * 0.0001
        while time.perf_counter() < until:
            pass


def run_plan(host_sum: SharedMemorySum, kind: str, seed: int, calls: int) -> str:
    plan = Plan(kind, seed, host_sum.world)
    delays = np.random.default_rng([seed, host_sum.rank, 7])
    for i in range(calls):
        inputs, expected = plan.next_call()
        mine = inputs[host_sum.rank]
        pause(delays)
        try:
            host_sum.all_reduce(mine)
        except Exception as e:
            return f"error {type(e).__name__}: {e}"
        if mine.tobytes() != expected.tobytes():
            return f"wrong {i}"
    return f"done {calls}"


def main() -> None:
    path, rank, world, token, out = sys.argv[1:6]
    rank, world = int(rank), int(world)
    host_sum = SharedMemorySum.attach(path, rank, world, bytes.fromhex(token))
    print("attached", flush=True)
    sys.stdin.readline()
    host_sum.watch_peers()
    if len(sys.argv) > 6:
        kind, seed, calls = sys.argv[6:9]
        print(run_plan(host_sum, kind, int(seed), int(calls)), flush=True)
    else:
        for i, array in enumerate(arrays(rank)):
            host_sum.all_reduce(array)
            np.save(Path(out) / f"rank-{rank}-{i}.npy", array)
        print("done", flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
