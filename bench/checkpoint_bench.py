"""What a snapshot costs: training-thread blocked time, and how fast it reaches the disk.

    python bench/checkpoint_bench.py                          # 210 MB of parameters + 420 MB of Adam state, 5 rounds
    python bench/checkpoint_bench.py --mb 10 100 1000         # one row per model size (the scaling study)
    python bench/checkpoint_bench.py --rounds 9 --dir /data/tmp --json /tmp/ckpt.json

The model is a stack of ``paddle.nn.Linear(1024, 1024)`` layers with ``--mb`` MB (10^6
bytes) of float32 parameters, trained one Adam step so that the optimizer holds its two
moments (twice the parameters). Each round measures, side by side on the same state:

(a) ``async``   what the training thread waits for in paddlerun's async save: the real
                :class:`~paddlerun.trainer.checkpointer.Checkpointer` ``.save()`` returning
                (capture only). The persist then runs in the background while training
                steps go on (see below); it is waited for before the next measurement
                and never counted as blocked time.
(b) ``paddle.save``  ``paddle.save(model.state_dict())`` + ``paddle.save(opt.state_dict())``,
                with an fsync of both files (what a durable save costs) and without.
(c) ``persist`` paddlerun's synchronous persist of a captured state: safetensors write,
                fsync, sha256, done marks, manifest, rename, directory fsyncs; and its
                throughput (bytes of the committed snapshot / time). Timed twice: with
                the model and optimizer files written one after the other (CPU workers)
                and side by side (``side by side``: GPU workers, whose cores are free).
(d) ``raw``     a sequential write + fsync of the same number of bytes into the same
                directory, 8 MB at a time: what the disk can do. Also ``raw+wb``: the
                same with the kernel's writeback started after every 8 MB, as
                paddlerun's persist does (left alone, it starts only once 10 % of
                memory is dirty, so the disk idles until then).

Also, to show where the time goes, two other ways to capture (neither is paddlerun's):

- ``model_arrays`` / ``optimizer_arrays``: ``Tensor.numpy()`` of every tensor (paddlerun's
  capture before it kept its buffers), its two halves timed apart, and the minor page
  faults (first touches of fresh memory) of each call;
- ``dlpack+copyto``: a zero-copy DLPack view of each tensor copied into host buffers
  allocated once and reused, by one thread (paddlerun's capture does this split over
  up to 4 threads: ``trainer/host_copy.py``);
- the background persist with training going on: a few training steps of the same model
  (batch 8) are timed with no persist in flight, then steps are run for as long as the
  persist of (a) is in flight; their mean time over the idle one is the slowdown the
  "background" work costs the training thread on this machine.

Every figure is the median over ``--rounds`` rounds, with the min-max spread; one warm-up
round is not counted. Nothing is timed while another measurement's data is still being
flushed (``sync`` between them). The work directory (default: a fresh directory under
``$TMPDIR`` or /tmp; ``--dir`` to choose) is removed at the end. Peak memory is about
3.5 x (parameters + moments): measured 2.3 GB at the default 210 MB, 10 GB at --mb 1000
(~3.5 min for one round on 2 cores). Sizes run one after the other; each is freed before
the next. The default run takes ~1.5 min on 2 cores.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np
import paddle

from paddlerun.trainer import state as tstate
from paddlerun.trainer.checkpoint.atomic import CHUNK, start_writeback
from paddlerun.trainer.checkpointer import Checkpointer
from paddlerun.trainer.rundir.config import TrainConfig, config_from_dict
from paddlerun.trainer.rundir.env import WorkerEnv
from paddlerun.trainer.agreement import Position
from table import print_table  # bench/table.py: scripts here run with bench/ on sys.path

REPO = Path(__file__).resolve().parent.parent
WIDTH = 1024
MB = 1e6
#: Training steps per round without a persist in flight (the baseline step time).
IDLE_STEPS = 3


@dataclasses.dataclass
class BenchTrainer:
    """What :class:`Checkpointer` reads from a trainer (as ``trainer/hapi.py``'s ``_FitTrainer``)."""
    layer: paddle.nn.Layer
    optimizer: Any
    train: TrainConfig
    position: Position = dataclasses.field(default_factory=Position)


def build_model(mb: float):
    """A Linear stack with about ``mb`` MB of float32 parameters, after one Adam step."""
    per_layer = (WIDTH * WIDTH + WIDTH) * 4
    layers = max(1, round(mb * MB / per_layer))
    paddle.seed(0)
    model = paddle.nn.Sequential(*[paddle.nn.Linear(WIDTH, WIDTH) for _ in range(layers)])
    opt = paddle.optimizer.Adam(parameters=model.parameters(), learning_rate=1e-4)
    loss = model(paddle.randn([4, WIDTH])).mean()
    loss.backward()
    opt.step()
    opt.clear_grad(set_to_zero=False)  # frees the gradients
    del loss
    return model, opt, layers


def timed(fn: Callable[[], Any]):
    """(seconds, minor page faults of this process, result) of ``fn()``."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults, result


def train_step(model, opt, x) -> None:
    model(x).mean().backward()
    opt.step()
    opt.clear_grad(set_to_zero=False)


def persist_in_flight() -> bool:
    """The Checkpointer names its background thread ``paddlerun-persist-<step>``."""
    return any(t.name.startswith("paddlerun-persist-") for t in threading.enumerate())


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    os.sync()  # the next measurement starts with nothing of this one left to flush


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def paddle_save(model, opt, directory: Path, fsync: bool) -> int:
    paths = [str(directory / "model.pdparams"), str(directory / "model.pdopt")]
    paddle.save(model.state_dict(), paths[0])
    paddle.save(opt.state_dict(), paths[1])
    if fsync:
        for p in paths:
            fsync_path(p)
    return sum(os.path.getsize(p) for p in paths)


def raw_write(path: Path, nbytes: int, block: memoryview, writeback: bool = False) -> None:
    """Sequential write of ``nbytes`` in CHUNK pieces (the store's own chunk size), then fsync;
    with ``writeback``, starting the kernel's writeback of each piece as the persist does."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        done = 0
        while done < nbytes:
            written = os.write(fd, block[:min(nbytes - done, len(block))])
            if writeback:
                start_writeback(fd, done, written)
            done += written
        os.fsync(fd)
    finally:
        os.close(fd)


class ReusedBuffers:
    """Not paddlerun's capture: host buffers allocated once, filled from zero-copy DLPack views."""

    def __init__(self, tensors: Dict[str, paddle.Tensor]):
        self.buffers = {name: np.empty(t.shape, dtype=np.from_dlpack(t.detach()).dtype)
                        for name, t in tensors.items()}
        for b in self.buffers.values():
            b.fill(0)  # fault the pages in once, as a long-lived buffer would be

    def capture(self, tensors: Dict[str, paddle.Tensor]) -> None:
        for name, t in tensors.items():
            np.copyto(self.buffers[name], np.from_dlpack(t.detach()))


def all_tensors(model, opt) -> Dict[str, paddle.Tensor]:
    found = {f"model/{k}": v for k, v in model.state_dict().items()}
    for key, value in opt.state_dict().items():
        if isinstance(value, paddle.Tensor):
            found[f"opt/{key}"] = value
    return found


def bench_size(mb: float, rounds: int, work: Path) -> Dict[str, Any]:
    model, opt, layers = build_model(mb)
    params = sum(int(p.size) for p in model.parameters())
    state_bytes = sum(int(t.size) * t.element_size() for t in all_tensors(model, opt).values())
    run_dir = work / f"mb-{mb:g}"
    ckpt_dir = run_dir / "checkpoints"
    config = config_from_dict({
        "train": {"global_batch_size": 64},
        # keep_last high: retention deletes nothing inside a timed persist; we delete untimed.
        "checkpoint": {"dir": str(ckpt_dir), "every_steps": 1, "keep_last": 1000, "async_save": True}},
        source="checkpoint_bench")
    env = WorkerEnv(rank=0, world_size=1, local_rank=0, nnodes=1, attempt=0, restarts=0,
                    run_dir=run_dir, checkpoint_dir=ckpt_dir, config_path=None, tty=False)
    trainer = BenchTrainer(model, opt, config.train)
    ckpt = Checkpointer(config, env, ckpt_dir, run_dir=run_dir)
    scratch = run_dir / "scratch"
    scratch.mkdir()
    block = memoryview(np.random.default_rng(0).integers(0, 256, CHUNK, dtype=np.uint8).tobytes())
    reused = ReusedBuffers(all_tensors(model, opt))
    x = paddle.randn([8, WIDTH])
    samples: Dict[str, List[float]] = {k: [] for k in (
        "async_blocked_s", "async_blocked_faults", "async_background_persist_s",
        "train_step_idle_s", "train_step_during_persist_s", "model_arrays_s", "model_arrays_faults",
        "optimizer_arrays_s", "optimizer_arrays_faults", "dlpack_copyto_s", "dlpack_copyto_faults",
        "persist_s", "persist_bytes", "persist_side_by_side_s", "paddle_save_fsync_s", "paddle_save_s", "paddle_save_bytes",
        "raw_write_fsync_s", "raw_writeback_s")}

    def snapshot_path() -> Path:
        return ckpt_dir / f"step-{trainer.position.step:08d}"

    for r in range(rounds + 1):  # round 0 warms up and is not counted
        keep = r > 0

        def record(key, value):
            if keep:
                samples[key].append(value)

        # Training as usual (it also churns the allocator, as real training does).
        took, _, _ = timed(lambda: [train_step(model, opt, x) for _ in range(IDLE_STEPS)])
        record("train_step_idle_s", took / IDLE_STEPS)

        # (a) async save: the training thread's share is the call itself. Training goes
        # on while the persist runs; then wait for it (not counted as blocked).
        trainer.position.step += 1
        blocked, faults, _ = timed(lambda: ckpt.save(trainer, "bench"))
        returned = time.perf_counter()
        steps = 0
        while persist_in_flight():
            train_step(model, opt, x)
            steps += 1
        overlapped = time.perf_counter() - returned
        ckpt.wait()
        record("async_blocked_s", blocked)
        record("async_blocked_faults", faults)
        record("async_background_persist_s", time.perf_counter() - returned)
        if steps:
            record("train_step_during_persist_s", overlapped / steps)
        remove(snapshot_path())

        # Where the blocked time goes (each result dropped at once).
        for key, fn in (("model_arrays", lambda: tstate.model_arrays(model)),
                        ("optimizer_arrays", lambda: tstate.optimizer_arrays(opt)),
                        ("dlpack_copyto", lambda: reused.capture(all_tensors(model, opt)))):
            took, faults, _ = timed(fn)
            record(f"{key}_s", took)
            record(f"{key}_faults", faults)

        # (c) paddlerun's synchronous persist of a captured state.
        trainer.position.step += 1
        captured = ckpt.capture(trainer, "bench", tstate.capture_rng())
        took, _, _ = timed(lambda: ckpt.persist(captured))
        del captured
        nbytes = dir_bytes(snapshot_path())
        record("persist_s", took)
        record("persist_bytes", nbytes)
        remove(snapshot_path())

        # (c') the same with the model and optimizer files written side by side (what a
        # worker training on a GPU does; CPU workers write one after the other).
        trainer.position.step += 1
        captured = ckpt.capture(trainer, "bench", tstate.capture_rng())
        ckpt.write_side_by_side = True
        took, _, _ = timed(lambda: ckpt.persist(captured))
        ckpt.write_side_by_side = False
        del captured
        record("persist_side_by_side_s", took)
        remove(snapshot_path())

        # (b) paddle.save, durable and not.
        took, _, saved = timed(lambda: paddle_save(model, opt, scratch, fsync=True))
        record("paddle_save_fsync_s", took)
        record("paddle_save_bytes", saved)
        remove(scratch)
        scratch.mkdir()
        took, _, _ = timed(lambda: paddle_save(model, opt, scratch, fsync=False))
        record("paddle_save_s", took)
        remove(scratch)  # its dirty pages are flushed here, untimed
        scratch.mkdir()

        # (d) the disk: the same number of bytes, same directory.
        raw = scratch / "raw.bin"
        took, _, _ = timed(lambda: raw_write(raw, nbytes, block))
        record("raw_write_fsync_s", took)
        remove(raw)
        took, _, _ = timed(lambda: raw_write(raw, nbytes, block, writeback=True))
        record("raw_writeback_s", took)
        remove(raw)
        gc.collect()

    ckpt.close()
    result = {
        "mb_requested": mb, "layers": layers, "width": WIDTH, "params": params,
        "param_bytes": params * 4, "state_bytes": state_bytes, "rounds": rounds,
        "samples": samples,
        "median": {k: statistics.median(v) for k, v in samples.items() if v},
        "min": {k: min(v) for k, v in samples.items() if v},
        "max": {k: max(v) for k, v in samples.items() if v},
    }
    med = result["median"]
    result["persist_bytes_per_s"] = med["persist_bytes"] / med["persist_s"]
    result["raw_bytes_per_s"] = med["persist_bytes"] / med["raw_write_fsync_s"]
    result["ratios"] = {
        "async_blocked_over_paddle_save_fsync": med["async_blocked_s"] / med["paddle_save_fsync_s"],
        "async_blocked_over_paddle_save": med["async_blocked_s"] / med["paddle_save_s"],
        "persist_throughput_over_raw": result["persist_bytes_per_s"] / result["raw_bytes_per_s"],
        "persist_side_by_side_throughput_over_raw": med["raw_write_fsync_s"] / med["persist_side_by_side_s"],
        "persist_throughput_over_raw_writeback": med["raw_writeback_s"] / med["persist_s"],
        "train_step_during_persist_over_idle": med["train_step_during_persist_s"] / med["train_step_idle_s"]
        if "train_step_during_persist_s" in med else None,
    }
    del reused, trainer, ckpt, model, opt, block, x
    gc.collect()
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


def ms(seconds: float) -> str:
    value = seconds * 1e3
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def spread(result: Dict[str, Any], key: str) -> str:
    """Median (min-max) of a time, in milliseconds."""
    return f"{ms(result['median'][key])} ({ms(result['min'][key])}-{ms(result['max'][key])})"


def print_results(results: List[Dict[str, Any]]) -> None:
    head = ["state MB", "async blocked ms", "paddle.save+fsync ms", "paddle.save ms", "persist ms",
            "persist MB/s", "raw MB/s", "blocked/save+fsync", "persist/raw", "side by side ms", "its /raw",
            "raw+wb MB/s", "persist/raw+wb"]
    rows = []
    for r in results:
        rows.append([
            f"{r['state_bytes'] / MB:.0f}",
            spread(r, "async_blocked_s"), spread(r, "paddle_save_fsync_s"), spread(r, "paddle_save_s"),
            spread(r, "persist_s"), f"{r['persist_bytes_per_s'] / MB:.0f}",
            f"{r['raw_bytes_per_s'] / MB:.0f}",
            f"{r['ratios']['async_blocked_over_paddle_save_fsync']:.2f}",
            f"{r['ratios']['persist_throughput_over_raw']:.2f}",
            spread(r, "persist_side_by_side_s"),
            f"{r['ratios']['persist_side_by_side_throughput_over_raw']:.2f}",
            f"{r['state_bytes'] / r['median']['raw_writeback_s'] / MB:.0f}",
            f"{r['ratios']['persist_throughput_over_raw_writeback']:.2f}"])
    print_table(head, rows)
    print("\nthe capture against two others (page faults: 4 KB pages first touched during the call)\n")
    head = ["state MB", "async blocked ms", "its page faults", "numpy() model ms", "numpy() optimizer ms",
            "their faults", "1-thread dlpack+copyto ms", "its faults"]
    rows = [[f"{r['state_bytes'] / MB:.0f}", spread(r, "async_blocked_s"),
             f"{r['median']['async_blocked_faults']:.0f}",
             spread(r, "model_arrays_s"), spread(r, "optimizer_arrays_s"),
             f"{r['median']['model_arrays_faults'] + r['median']['optimizer_arrays_faults']:.0f}",
             spread(r, "dlpack_copyto_s"), f"{r['median']['dlpack_copyto_faults']:.0f}"]
            for r in results]
    print_table(head, rows)
    print("\nthe persist in the background, with training going on (2 cores shared)\n")
    head = ["state MB", "background persist ms", "train step idle ms", "train step during persist ms",
            "slowdown", "snapshot MB", "paddle.save MB"]
    rows = []
    for r in results:
        during = spread(r, "train_step_during_persist_s") if "train_step_during_persist_s" in r["median"] else "-"
        ratio = r["ratios"]["train_step_during_persist_over_idle"]
        rows.append([f"{r['state_bytes'] / MB:.0f}", spread(r, "async_background_persist_s"),
                     spread(r, "train_step_idle_s"), during, f"{ratio:.2f}x" if ratio else "-",
                     f"{r['median']['persist_bytes'] / MB:.0f}",
                     f"{r['median']['paddle_save_bytes'] / MB:.0f}"])
    print_table(head, rows)


def machine(work: Path) -> Dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "paddle": paddle.__version__, "numpy": np.__version__,
            "work_dir": str(work), "same_device_as_repo": os.stat(work).st_dev == os.stat(REPO).st_dev,
            "mem_total_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
            "load_average_1min_at_start": os.getloadavg()[0],
            **memory_speeds()}


def memory_speeds(nbytes: int = 256 << 20) -> Dict[str, float]:
    """sha256 and memcpy speed of this machine (bytes/s), the two bounds of persist and capture."""
    a = np.random.default_rng(1).integers(0, 256, nbytes, dtype=np.uint8)
    b = np.empty_like(a)
    b.fill(0)
    hash_s = min(timed(lambda: hashlib.sha256(memoryview(a)).digest())[0] for _ in range(3))
    copy_s = min(timed(lambda: np.copyto(b, a))[0] for _ in range(3))
    fresh_s = min(timed(lambda: a.copy())[0] for _ in range(3))
    return {"sha256_bytes_per_s": nbytes / hash_s, "memcpy_bytes_per_s": nbytes / copy_s,
            "copy_to_new_array_bytes_per_s": nbytes / fresh_s}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, nargs="+", default=[210],
                        help="MB (10^6 bytes) of float32 parameters; several values: a row each "
                             "(the Adam moments add twice as much)")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per size (default 5)")
    parser.add_argument("--dir", default=None,
                        help="where to write (a temporary directory is made inside it and removed); "
                             "default $TMPDIR or /tmp")
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "checkpoint_bench.json"),
                        help="write the results here (default bench/results/checkpoint_bench.json)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or any(mb <= 0 for mb in args.mb):
        parser.error("--rounds must be >= 1 and every --mb > 0")
    paddle.set_device("cpu")
    logging.getLogger("paddlerun").setLevel(logging.WARNING)  # one INFO line per commit otherwise
    work = Path(tempfile.mkdtemp(prefix="paddlerun-ckpt-bench-", dir=args.dir))
    info = machine(work)
    if not info["same_device_as_repo"]:
        print(f"note: {work} is not on the same filesystem as {REPO}", file=sys.stderr)
    print(f"checkpoint bench: {info['nproc']} x {info['cpu']}, paddle {info['paddle']}, "
          f"writing into {work}\n  this machine: sha256 {info['sha256_bytes_per_s'] / MB:.0f} MB/s, "
          f"memcpy {info['memcpy_bytes_per_s'] / MB:.0f} MB/s, copy into a new array "
          f"{info['copy_to_new_array_bytes_per_s'] / MB:.0f} MB/s", flush=True)
    results = []
    try:
        for mb in args.mb:
            started = time.time()
            result = bench_size(mb, args.rounds, work)
            result["wall_s"] = time.time() - started
            result["peak_rss_gb_so_far"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            results.append(result)
            print(f"  {mb:g} MB of parameters: {result['layers']} x Linear({WIDTH}, {WIDTH}), "
                  f"{result['state_bytes'] / MB:.0f} MB with Adam state, {result['wall_s']:.0f} s",
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\nmedian (min-max) over", args.rounds, "rounds; MB = 10^6 bytes\n")
    print_results(results)
    info["load_average_1min_at_end"] = os.getloadavg()[0]  # includes this benchmark's own ~2
    if info["load_average_1min_at_start"] > 1.0:
        print(f"\nnote: load average {info['load_average_1min_at_start']:.1f} on {info['nproc']} CPUs "
              f"before this started: other work is running; expect wide spreads")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": info, "time": time.time(), "argv": sys.argv[1:],
                                "results": results}, indent=1) + "\n")
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
