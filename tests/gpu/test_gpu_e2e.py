"""On GPUs (one per worker): train, SIGKILL a worker, resume bit-exact; and the snapshot stall.

Run on a CUDA machine with ``pytest tests/gpu -v -s``; elsewhere every test is skipped with
the reason (conftest.py). The workers get the determinism flags of launcher/gpu_env.py, and
the snapshot capture goes through reused pinned host buffers (trainer/host_copy.py).
"""
import json
import os
import signal

import pytest

from helpers import assert_no_leftovers, events, heartbeat, run, start, summary, wait, wait_for

pytestmark = pytest.mark.slow

GPU = ("launch.device=gpu", "launch.nproc_per_node=2")
TOTAL = "train.max_steps=150"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("gpu-reference")
    result = run(run_dir, *GPU, TOTAL)
    assert result.returncode == 0, result.stdout[-5000:]
    s = summary(run_dir)
    assert s["device"].startswith("gpu"), s
    return s["digest"]


def test_the_same_gpu_run_twice_gives_the_same_bits(tmp_path, reference):
    result = run(tmp_path, *GPU, TOTAL)
    assert result.returncode == 0, result.stdout[-5000:]
    assert summary(tmp_path)["digest"] == reference, "GPU training is not deterministic here"


@pytest.mark.parametrize("rank", [1, 0])
def test_sigkill_of_a_gpu_worker_resumes_bit_exact(tmp_path, reference, rank):
    proc = start(tmp_path, *GPU, TOTAL)

    def past_step_25():
        hb = heartbeat(tmp_path, rank)
        return hb and hb["step"] >= 25 and hb["phase"] == "train" and hb["pid"]
    os.kill(wait_for(past_step_25, 300, f"rank {rank} to pass step 25"), signal.SIGKILL)
    out = wait(proc, 600)
    assert_no_leftovers(tmp_path)
    assert proc.returncode == 0, out[-6000:]
    s = summary(tmp_path)
    assert s["restarts"] >= 1 and s["digest"] == reference


def test_snapshot_stall_on_gpu(tmp_path):
    """Prints the capture stall (the training thread's part of a snapshot) per snapshot."""
    result = run(tmp_path, *GPU, "train.max_steps=60", "checkpoint.every_steps=10")
    assert result.returncode == 0, result.stdout[-5000:]
    stalls = [e["capture_s"] for e in events(tmp_path) if e["event"] == "snapshot_committed"]
    print("GPU snapshot capture stall per snapshot (s):", json.dumps(stalls))
    assert len(stalls) >= 5
    # Generous: LeNet's state is ~0.5 MB; a stall this long means the copy went wrong.
    assert max(stalls[1:]) < 1.0, stalls
