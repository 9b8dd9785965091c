"""The launch environment of a GPU job: determinism flags and Paddle's NCCL timeout, the
user's own values kept; nothing of it for a CPU job."""
from pathlib import Path

from helpers import CONFIG
from paddlerun.launcher import gpu_env
from paddlerun.launcher.launch import LaunchSpec
from paddlerun.trainer.rundir.config import load_config


def _spec(tmp_path, *sets):
    return LaunchSpec(config=load_config(CONFIG, ["supervisor.hang_timeout_s=20", *sets]),
                      run_dir=Path(tmp_path))


def test_a_gpu_job_gets_determinism_flags_and_the_hang_timeout_as_nccl_timeout(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    env = _spec(tmp_path).env(attempt=0, restarts=0, base={"PATH": "/bin"})
    assert env["FLAGS_cudnn_deterministic"] == "1" and env["FLAGS_embedding_deterministic"] == "1"
    assert env["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert env[gpu_env.PG_TIMEOUT] == "20000"


def test_the_users_own_values_win_even_the_scrubbed_paddle_one(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    base = {"FLAGS_cudnn_deterministic": "0", gpu_env.PG_TIMEOUT: "5000", "PADDLE_MASTER": "x:1"}
    env = _spec(tmp_path).env(attempt=0, restarts=0, base=base)
    assert env["FLAGS_cudnn_deterministic"] == "0" and env[gpu_env.PG_TIMEOUT] == "5000"
    assert "PADDLE_MASTER" not in env  # the rest of PADDLE_* is still scrubbed


def test_a_cpu_job_gets_none_of_it(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    env = _spec(tmp_path, "launch.device=cpu").env(attempt=0, restarts=0, base={})
    assert not set(gpu_env.DETERMINISM) & set(env) and gpu_env.PG_TIMEOUT not in env
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    env = _spec(tmp_path).env(attempt=0, restarts=0, base={})
    assert gpu_env.PG_TIMEOUT not in env
