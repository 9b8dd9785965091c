"""Resuming at another number of workers, with the real launcher: the same global batch, the
same samples at every global step, the optimizer state resharded.

Each transition trains W workers to step 30 (a final snapshot), then W' workers from it
to step 60. The samples every global step saw (recorded by ``tests/recording_dataset.py``)
must be the uninterrupted 2-worker run's, step by step, nothing repeated or skipped; the
loss goes on as the uninterrupted run's, up to the order of float sums (the numbers are
measured by ``bench/world_size_bench.py`` and in docs/world-size.md).
"""
from pathlib import Path

import pytest

from helpers import REPO, assert_no_leftovers, events, run
from paddlerun.trainer.rundir.metrics import read_metrics

pytestmark = pytest.mark.slow

GLOBAL_BATCH = 48  # divisible by 1, 2, 3 and 4 workers
RECORDING = ["train.dataset=recording_dataset:build", "train.num_workers=0",
             f"train.global_batch_size={GLOBAL_BATCH}", "checkpoint.every_steps=10"]
ENV = {"PYTHONPATH": str(REPO / "tests")}


def train(run_dir: Path, workers: int, steps: int, *sets: str):
    result = run(run_dir, f"launch.nproc_per_node={workers}", f"train.max_steps={steps}",
                 *RECORDING, *sets, timeout=300, env=ENV)
    assert result.returncode == 0, result.stdout[-5000:]
    return result


def steps_seen(run_dir: Path, attempt: int, workers: int):
    """Global step (1-based, within the attempt) -> the set of sample ids all ranks read for it."""
    per_rank = GLOBAL_BATCH // workers
    steps = {}
    for rank in range(workers):
        ids = [int(x) for x in (run_dir / "samples" / f"attempt-{attempt}-rank-{rank}.txt").read_text().split()]
        for i in range(len(ids) // per_rank):
            steps.setdefault(i + 1, []).extend(ids[i * per_rank:(i + 1) * per_rank])
    return {step: sorted(ids) for step, ids in steps.items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    train(run_dir, 2, 60)
    return run_dir


@pytest.mark.parametrize("before, after, sharded", [(2, 1, False), (1, 2, False), (2, 3, False),
                                                     (2, 1, True)])
def test_resume_at_another_world_size(tmp_path, reference, before, after, sharded):
    sets = ["train.sharded_optimizer=true"] if sharded else []
    train(tmp_path, before, 30, *sets)
    again = train(tmp_path, after, 60, *sets)
    resumed = [e for e in events(tmp_path) if e["event"] == "resumed"]
    assert len(resumed) == 1, resumed
    assert (resumed[0]["from_world_size"], resumed[0]["to_world_size"], resumed[0]["step"]) == \
        (before, after, 30), resumed
    assert resumed[0]["sharded_optimizer"] is (sharded and before > 1)
    assert f"written by {before} workers, this attempt has {after}" in again.stdout

    want = steps_seen(reference, 0, 2)
    first, second = steps_seen(tmp_path, 0, before), steps_seen(tmp_path, 1, after)
    got = {**{s: first[s] for s in range(1, 31)}, **{30 + s: second[s] for s in range(1, 31)}}
    assert got == {s: want[s] for s in range(1, 61)}, "the same samples at every global step"

    ours = {m["step"]: m for m in read_metrics(tmp_path / "metrics.jsonl") if "loss" in m}
    theirs = {m["step"]: m for m in read_metrics(reference / "metrics.jsonl") if "loss" in m}
    assert abs(ours[60]["loss"] - theirs[60]["loss"]) < 0.05, (ours[60], theirs[60])
    assert_no_leftovers(tmp_path)


def test_a_global_batch_the_new_world_size_cannot_split_is_refused_before_any_worker(tmp_path):
    result = run(tmp_path, "launch.nproc_per_node=3", "train.global_batch_size=64",
                 "train.max_steps=10", timeout=120)
    assert result.returncode == 2, result.stdout[-3000:]
    assert "train.global_batch_size" in result.stdout and "3" in result.stdout
    assert not (tmp_path / "logs").exists()


def test_a_session_script_resumes_at_another_world_size(tmp_path):
    """examples/train_script.py (Session, global batch 64) on 2 workers, then on 1."""
    import subprocess
    import sys

    def script(workers, steps):
        argv = [sys.executable, "-m", "paddlerun.launcher.cli", "run", "--script",
                str(REPO / "examples" / "train_script.py"), "--nproc-per-node", str(workers),
                "--run-dir", str(tmp_path / "run"), "--set", "supervisor.hang_timeout_s=60",
                "--", "--max-steps", str(steps), "--every-steps", "10"]
        done = subprocess.run(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-5000:]
        return done.stdout

    script(2, 20)
    out = script(1, 30)
    resumed = [e for e in events(tmp_path / "run") if e["event"] == "resumed"]
    assert [(e["from_world_size"], e["to_world_size"], e["step"]) for e in resumed] == [(2, 1, 20)]
    assert "starting at step 20 " in out
    assert_no_leftovers(tmp_path / "run")
