"""The training loop's parts against a plain loop, in the same 2 processes: where overhead goes.

    python bench/ab_loop.py                   # 24 blocks of 50 steps per variant, ~3 min on 2 cores
    python bench/ab_loop.py --blocks 12 --json /tmp/ab_loop.json

Whole-job runs (overhead_bench.py) are too noisy on a small machine to resolve a few per
cent: its speed drifts by ±15 % from run to run. Here one ``paddle.distributed.launch``
with 2 CPU workers builds every variant side by side -- LeNet, the same data, 32 samples
a rank, Adam -- and runs them in alternating blocks of ``--steps`` steps (odd blocks in
reverse order), so every variant sees the same machine. Variants:

``plain``              ``paddle.DataParallel`` + ``DistributedBatchSampler`` (a user's loop)
``dp+resumable``       ``DataParallel`` + paddlerun's ``ResumableBatchSampler``
``sync+distributed``   paddlerun's Python ``GradientSync`` + ``DistributedBatchSampler``
``sync+resumable``     ``GradientSync`` + ``ResumableBatchSampler``
``paddlerun step``     the last, plus what paddlerun's loop does every step: the RNG capture
                       for an emergency snapshot and the accuracy metric
``... (shm)``          the same two, the gradients summed through shared memory
                       (``train.grad_transport: auto``) instead of gloo; the four above use gloo

Prints each variant's median ms/step and the median over blocks of plain's block time
over the variant's (its speed relative to plain).
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

from procs import stop  # bench/procs.py: scripts here run with bench/ on sys.path
from table import print_table


def launch_self(argv) -> int:
    """Re-run this script under paddle.distributed.launch with 2 workers; show rank 0's output."""
    with tempfile.TemporaryDirectory(prefix="paddlerun-ab-loop-") as logs:
        cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
               "--log_dir", logs, __file__, *argv]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=1800)
        except BaseException:  # a timeout or Ctrl-C: leave no worker behind
            stop(proc)
            raise
        out = (Path(logs) / "workerlog.0").read_text()
    print(out[out.find("ab_loop:"):] if "ab_loop:" in out else out[-5000:])
    return code


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=24, help="blocks per variant (default 24)")
    parser.add_argument("--steps", type=int, default=50, help="steps per block (default 50)")
    parser.add_argument("--json", default=None, help="also write the block times here")
    args = parser.parse_args(argv)
    if "PADDLE_TRAINER_ID" not in os.environ:
        return launch_self(sys.argv[1:] if argv is None else list(argv))

    import paddle
    import paddle.distributed as dist

    from paddlerun.trainer.data import mnist
    from paddlerun.trainer.grad_sync import GradientSync, broadcast_parameters, connect_host_sum
    from paddlerun.trainer.models import LeNet
    from paddlerun.trainer.sampler import ResumableBatchSampler
    from paddlerun.trainer.state import capture_rng

    dist.init_parallel_env()
    rank, world = dist.get_rank(), dist.get_world_size()
    paddle.seed(0)
    data = mnist("train")
    loss_fn = paddle.nn.CrossEntropyLoss()
    loaders = {
        "distributed": paddle.io.DataLoader(data, return_list=True, batch_sampler=paddle.io.DistributedBatchSampler(
            data, batch_size=32, shuffle=True)),
        "resumable": paddle.io.DataLoader(data, return_list=True, batch_sampler=ResumableBatchSampler(
            len(data), 32 * world, world, rank, seed=1)),
    }

    def dataparallel_step():
        model = paddle.DataParallel(LeNet())
        opt = paddle.optimizer.Adam(parameters=model.parameters())

        def step(x, y):
            loss_fn(model(x), y).backward()
            opt.step()
            opt.clear_grad()
        return step

    host_sum, how = connect_host_sum(rank, world)
    if host_sum is None and rank == 0:
        print(f"ab_loop: the (shm) variants sum through {how}, not shared memory", flush=True)

    def python_sync_step(extras: bool, shared_memory: bool = False):
        model = LeNet()
        broadcast_parameters(model)
        sync = GradientSync(model.parameters(), world, host_sum=host_sum if shared_memory else None)
        opt = paddle.optimizer.Adam(parameters=model.parameters())

        def step(x, y):
            if extras:
                capture_rng()
            out = model(x)
            loss = loss_fn(out, y)
            loss.backward()
            sync()
            opt.step()
            opt.clear_grad()
            if extras:  # the loop keeps the argmax; it compares with the labels once per log window
                out.argmax(axis=-1)
        return step

    variants = {
        "plain": (dataparallel_step(), "distributed"),
        "dp+resumable": (dataparallel_step(), "resumable"),
        "sync+distributed": (python_sync_step(False), "distributed"),
        "sync+resumable": (python_sync_step(False), "resumable"),
        "paddlerun step": (python_sync_step(True), "resumable"),
        "sync(shm)+resumable": (python_sync_step(False, True), "resumable"),
        "paddlerun step (shm)": (python_sync_step(True, True), "resumable"),
    }

    def block(name: str, steps: int) -> float:
        step, loader = variants[name]
        dist.barrier()
        started = time.perf_counter()
        done = 0
        while done < steps:
            for x, y in loaders[loader]:
                step(x, y)
                done += 1
                if done == steps:
                    break
        return (time.perf_counter() - started) / steps

    for name in variants:
        block(name, 10)  # warm-up
    times = {name: [] for name in variants}
    for b in range(args.blocks):
        for name in (list(variants) if b % 2 == 0 else list(variants)[::-1]):
            times[name].append(block(name, args.steps))
    if rank == 0:
        print(f"ab_loop: {world} workers, {args.blocks} blocks of {args.steps} steps per variant, "
              f"alternating\n")
        rows = []
        for name, t in times.items():
            speed = statistics.median(p / v for p, v in zip(times["plain"], t))
            rows.append([name, f"{statistics.median(t) * 1e3:.2f}", f"{speed:.3f}"])
        print_table(["variant", "ms/step (median)", "speed / plain (median over blocks)"], rows)
        if args.json:
            Path(args.json).write_text(json.dumps({"steps": args.steps, "seconds_per_step": times}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
