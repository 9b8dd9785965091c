"""A rank of test_shm_reduce.py's shared-memory sums, in its own process.

    python shm_peer.py PATH RANK WORLD TOKEN_HEX OUT_DIR

Attaches, prints "attached", waits for "go" on stdin, then sums the arrays of
``arrays(rank)`` in order and saves each result as OUT_DIR/rank-R-I.npy, then prints "done"
and waits for stdin to close (so a test can kill it between sums).
"""
import sys
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


def main() -> None:
    path, rank, world, token, out = sys.argv[1:6]
    rank, world = int(rank), int(world)
    host_sum = SharedMemorySum.attach(path, rank, world, bytes.fromhex(token))
    print("attached", flush=True)
    sys.stdin.readline()
    host_sum.watch_peers()
    for i, array in enumerate(arrays(rank)):
        host_sum.all_reduce(array)
        np.save(Path(out) / f"rank-{rank}-{i}.npy", array)
    print("done", flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
