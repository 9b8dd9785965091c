"""``paddlerun doctor``: says whether a job can start here, without importing paddle."""
import json
import os
import socket
import subprocess
import sys

import paddle

from helpers import REPO
from test_paddle_versions import _fake_paddle


def doctor(*args, env=None, timeout=60):
    result = subprocess.run([sys.executable, "-m", "paddlerun.launcher.cli", "doctor", *args],
                            cwd=REPO, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    return result


def checks_of(result):
    return {c["name"]: c for c in json.loads(result.stdout)["checks"]}


def test_this_machine_can_start_the_default_job(tmp_path):
    result = doctor("mnist_lenet", "--run-dir", str(tmp_path), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    checks = checks_of(result)
    assert checks["paddle"]["ok"] and paddle.__version__ in checks["paddle"]["detail"]
    assert str(tmp_path / "checkpoints") in checks["checkpoints"]["detail"]
    assert "free" in checks["checkpoints"]["detail"] and "master" not in checks


def test_a_cuda_build_maps_workers_to_gpus_and_paddle_is_never_imported(tmp_path):
    fake = _fake_paddle(tmp_path / "site", "3.2.0", cuda="12.6")  # importing it raises
    env = {"PYTHONPATH": str(fake), "CUDA_VISIBLE_DEVICES": "3,5"}
    result = doctor("--run-dir", str(tmp_path / "run"), "--json", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    checks = checks_of(result)
    assert "3.2.0 (CUDA 12.6" in checks["paddle"]["detail"]
    assert checks["gpus"]["detail"] == "2 visible; local rank 0 -> GPU 3, local rank 1 -> GPU 5"
    more = doctor("--run-dir", str(tmp_path / "run"), "--set", "launch.nproc_per_node=3", env=env)
    assert more.returncode == 1 and "FAIL gpus" in more.stdout


def test_an_old_paddle_fails_the_check(tmp_path):
    env = {"PYTHONPATH": str(_fake_paddle(tmp_path / "site", "2.6.2"))}
    result = doctor("--run-dir", str(tmp_path / "run"), env=env)
    assert result.returncode == 1
    assert "FAIL paddle" in result.stdout and "Paddle 2.6.2 is installed" in result.stdout


def test_an_unwritable_checkpoints_dir_fails_the_check(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = doctor("--set", f"checkpoint.dir={blocker}/checkpoints", "--run-dir", str(tmp_path))
    assert result.returncode == 1 and "FAIL checkpoints" in result.stdout, result.stdout


def test_master_port_in_use_on_node_0_and_reachable_from_node_1(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        sets = ["--set", "launch.nnodes=2", "--set", f"launch.master=127.0.0.1:{port}",
                "--run-dir", str(tmp_path)]
        node0 = doctor(*sets, "--json")
        assert node0.returncode == 1 and "in use" in checks_of(node0)["master"]["detail"]
        node1 = doctor(*sets, "--set", "launch.node_rank=1", "--json")
        assert node1.returncode == 0 and "reachable now" in checks_of(node1)["master"]["detail"]
    nowhere = doctor("--set", "launch.nnodes=2", "--set", "launch.master=no-such-host.invalid:1234",
                     "--set", "launch.node_rank=1", "--run-dir", str(tmp_path))
    assert nowhere.returncode == 1 and "does not resolve" in nowhere.stdout


def test_free_space_is_weighed_against_the_newest_snapshot(tmp_path, monkeypatch):
    import collections
    import shutil as shutil_module

    from checkpointer_kit import make_checkpointer, train_step
    from paddlerun.launcher import doctor_cmd
    ckpt, trainer = make_checkpointer(tmp_path)
    train_step(trainer, 2)
    ckpt.save(trainer, wait=True)
    ckpt.close()
    fine = doctor_cmd._checkpoints(tmp_path / "ckpt")
    assert fine.ok and "newest snapshot step-00000002" in fine.detail, fine
    size = sum(f.stat().st_size for f in (tmp_path / "ckpt" / "step-00000002").iterdir())
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10 * size, 9 * size, size // 2))
    full = doctor_cmd._checkpoints(tmp_path / "ckpt")
    assert not full.ok and "will not fit" in full.detail, full
