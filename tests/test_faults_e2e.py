"""The failure model with real signals, the real launcher and 2 CPU workers.

Each fault ends with exit 0, the failure and the restart in events.jsonl, the same
final digest as an uninterrupted run, and no process of the run left alive.
"""
import json
import os
import signal
import subprocess
import time

import psutil
import pytest

from helpers import (reference_digest, REPO, assert_no_leftovers, events, heartbeat, run, start, summary, wait,
                     wait_for)

pytestmark = pytest.mark.slow

TOTAL = "train.max_steps=150"
KEEP_ALL = "checkpoint.keep_every_steps=1"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_digest(tmp_path_factory, TOTAL)


def finish(proc, run_dir, timeout=300):
    out = wait(proc, timeout)
    assert_no_leftovers(run_dir)
    return proc.returncode, out


def worker_pid_at_step(run_dir, rank, step, timeout=120):
    def ready():
        hb = heartbeat(run_dir, rank)
        return hb and hb["step"] >= step and hb["phase"] == "train" and hb["pid"]
    return wait_for(ready, timeout, f"rank {rank} to pass step {step}")


def kinds(run_dir):
    return [e["event"] for e in events(run_dir)]


def assert_recovered(run_dir, out, code, reference):
    assert code == 0, out[-6000:]
    names = kinds(run_dir)
    assert "worker_failed" in names and "restarting" in names and names[-1] == "succeeded", names
    s = summary(run_dir)
    assert s["status"] == "succeeded" and s["restarts"] >= 1
    assert s["digest"] == reference


@pytest.mark.parametrize("rank", [1, 0])
def test_sigkill_of_a_worker(tmp_path, reference, rank):
    proc = start(tmp_path, TOTAL, KEEP_ALL)
    pid = worker_pid_at_step(tmp_path, rank, 25)
    done_before_kill = heartbeat(tmp_path, rank)["step"]  # a lower bound: the file lags a little
    os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    code, out = finish(proc, tmp_path)
    assert_recovered(tmp_path, out, code, reference)
    failed = next(e for e in events(tmp_path) if e["event"] == "worker_failed")
    assert failed["rank"] == rank and failed["cause"] == f"rank {rank} killed by SIGKILL", failed
    assert failed["failed_at"] - killed_at < 1.5, "noticed within a second or so"
    # The survivor saved the last completed step (unless a snapshot of it was committed
    # already): the next attempt resumes at or after every step done before the kill --
    # the last one attempt 0 logged, and the one the killed rank had reported.
    resumed = [int(line.rsplit("step-", 1)[1][:8]) for line in out.splitlines()
               if "resumed from" in line]
    logged = [m["step"] for m in map(json.loads, (tmp_path / "metrics.jsonl").read_text()
                                     .splitlines()) if m.get("attempt") == 0 and "loss" in m]
    assert resumed and resumed[0] >= max(logged[-1], done_before_kill), \
        (resumed, logged[-1], done_before_kill)
    if rank == 1 and any(e.get("reason") == "emergency" for e in events(tmp_path)):
        # Rank 0 said so in its log just before the attempt was torn down, too soon for
        # Paddle's launcher to copy that line: the supervisor shows it.
        assert "written by rank 0" in out, out[-3000:]


def test_emergency_snapshot_equals_a_scheduled_one(tmp_path, tmp_path_factory):
    faulted = tmp_path / "faulted"
    # No scheduled snapshots: the step the crash interrupts is never committed already,
    # so the survivor always writes one.
    proc = start(faulted, TOTAL, "checkpoint.every_steps=1000")
    os.kill(worker_pid_at_step(faulted, 1, 25), signal.SIGKILL)
    code, out = finish(proc, faulted)
    assert code == 0, out[-5000:]
    step = next(e["step"] for e in events(faulted) if e.get("reason") == "emergency")
    clean = tmp_path / "clean"
    assert run(clean, f"train.max_steps={step}").returncode == 0
    a = faulted / "checkpoints" / f"step-{step:08d}"
    b = clean / "checkpoints" / f"step-{step:08d}"
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    state_a, state_b = (json.loads((d / "trainer_state.json").read_text()) for d in (a, b))
    for volatile in ("time", "reason", "attempt"):
        state_a.pop(volatile), state_b.pop(volatile)
    assert state_a == state_b


def test_a_slow_emergency_snapshot_outlives_a_peers_python_exception(tmp_path):
    # Rank 1 raises in its forward at step 26 (diagnosed "error", not "worker_died");
    # rank 0's emergency snapshot of step 25 then takes 8 s: longer than the teardown's
    # 5 s and Paddle's launcher's SIGTERM + 3 s. It commits and the rerun resumes from it.
    proc = start(tmp_path, "train.max_steps=40", "checkpoint.every_steps=1000",
                 "train.model=broken_factories:lenet_failing_on_rank",
                 "train.model_args={rank: 1, after_steps: 25}",
                 env={"PYTHONPATH": str(REPO / "tests"),
                      "PADDLERUN_TEST_PAUSE_BEFORE_EMERGENCY_COMMIT": "8"})
    code, out = finish(proc, tmp_path)
    assert code == 0, out[-6000:]
    failed = next(e for e in events(tmp_path) if e["event"] == "worker_failed")
    assert (failed["kind"], failed["rank"]) == ("error", 1), failed
    assert "ValueError: injected fault" in failed["cause"]
    committed = [e for e in events(tmp_path) if e["event"] == "snapshot_committed"]
    assert [(e["reason"], e["step"]) for e in committed] == [("emergency", 25), ("final", 40)], committed
    assert committed[0]["persist_s"] >= 8
    assert any(e["event"] == "launch_held" for e in events(tmp_path))
    assert "resumed from" in out and "step-00000025" in out.split("resumed from", 1)[1].splitlines()[0]


def test_sigkill_of_the_launch_process(tmp_path, reference):
    proc = start(tmp_path, TOTAL)
    worker_pid_at_step(tmp_path, 0, 25)
    launch_pid = next(e["pid"] for e in events(tmp_path) if e["event"] == "started")
    workers = [heartbeat(tmp_path, r)["pid"] for r in (0, 1)]
    os.kill(launch_pid, signal.SIGKILL)
    code, out = finish(proc, tmp_path)
    assert_recovered(tmp_path, out, code, reference)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in workers), "the orphaned workers were killed"


def test_sigstop_of_a_worker_is_a_hang(tmp_path, reference):
    proc = start(tmp_path, TOTAL, "supervisor.hang_timeout_s=6")
    pid = worker_pid_at_step(tmp_path, 1, 25)
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.time()
    code, out = finish(proc, tmp_path)
    assert_recovered(tmp_path, out, code, reference)
    hang = next(e for e in events(tmp_path) if e["event"] == "hang_detected")
    assert "1" in hang["ranks"]
    assert hang["time"] - stopped_at < 6 + 2 * 0.25 + 1.0


def test_sigkill_in_the_middle_of_a_persist(tmp_path, reference):
    proc = start(tmp_path, TOTAL, "checkpoint.async=false",
                 env={"PADDLERUN_TEST_PAUSE_BEFORE_COMMIT": "30:20"})
    staging = tmp_path / "checkpoints" / ".staging-step-00000030"
    wait_for(lambda: (staging / "model.safetensors").exists(), 120, "the persist of step 30")
    listed = subprocess.run(["paddlerun", "ckpt", "list", str(tmp_path), "--json"],
                            capture_output=True, text=True, timeout=60)
    assert 30 not in [s["step"] for s in json.loads(listed.stdout)], "no reader sees it"
    os.kill(heartbeat(tmp_path, 0)["pid"], signal.SIGKILL)
    code, out = finish(proc, tmp_path)
    assert_recovered(tmp_path, out, code, reference)
    # The survivor's emergency snapshot of step 30 completes the interrupted persist, or
    # (when it could not be written) the leftover is removed with a warning on the next start.
    completed = any(e.get("reason") == "emergency" and e.get("step") == 30 for e in events(tmp_path))
    assert completed or ("stale" in out and ".staging-step-00000030" in out)
    assert not staging.exists()


def test_sigterm_to_the_supervisor_then_rerun(tmp_path, reference):
    proc = start(tmp_path, TOTAL)
    worker_pid_at_step(tmp_path, 0, 25)
    signalled = time.time()
    os.kill(proc.pid, signal.SIGTERM)
    code, out = finish(proc, tmp_path, timeout=120)
    assert code == 75, out[-5000:]
    requested = next(e for e in events(tmp_path) if e["event"] == "preempt_requested")
    # The signal wakes the supervisor at once, not at its next check (every 0.5 s).
    assert requested["time"] - signalled < 0.3, requested["time"] - signalled
    preempted = next(e for e in events(tmp_path) if e["event"] == "preempted")
    assert preempted["clean"], preempted
    saved = [e for e in events(tmp_path) if e.get("reason") == "preempted"]
    assert saved, "a snapshot was taken on the way out"
    again = run(tmp_path, TOTAL)
    assert again.returncode == 0, again.stdout[-5000:]
    assert f"step-{saved[0]['step']:08d}" in again.stdout
    assert summary(tmp_path)["digest"] == reference
    assert_no_leftovers(tmp_path)


def test_a_worker_that_fails_on_every_start_gives_up_with_the_root_cause(tmp_path):
    started = time.time()
    result = run(tmp_path, "train.dataset=broken_factories:unreachable_dataset",
                 "supervisor.max_restarts=5", timeout=180,
                 env={"PYTHONPATH": str(REPO / "tests")})
    assert result.returncode == 1
    assert "RuntimeError: dataset server unreachable" in result.stdout
    assert "giving up: 2 attempts in a row failed the same way before their first step" in result.stdout
    assert 'raise RuntimeError("dataset server unreachable")' in result.stdout, "the traceback"
    assert kinds(tmp_path).count("started") == 2 and kinds(tmp_path)[-1] == "gave_up"
    assert summary(tmp_path)["status"] == "gave_up"
    assert time.time() - started < 90
    assert_no_leftovers(tmp_path)


def test_an_import_error_is_refused_before_any_worker_starts(tmp_path):
    result = run(tmp_path, "train.model=no_such_module:build", timeout=120)
    assert result.returncode == 2
    assert "train.model: cannot import 'no_such_module'" in result.stdout
    assert not (tmp_path / "logs").exists()


def test_an_import_error_inside_the_worker_is_not_retried(tmp_path):
    # The package exists (the supervisor's check passes); the attribute does not.
    result = run(tmp_path, "train.model=broken_factories:no_such_model", timeout=180,
                 env={"PYTHONPATH": str(REPO / "tests")})
    assert result.returncode == 1
    assert "module 'broken_factories' has no attribute 'no_such_model'" in result.stdout
    assert "giving up: not retriable" in result.stdout
    assert kinds(tmp_path).count("started") == 1


def test_ctrl_c_snapshots_and_exits_130(tmp_path):
    proc = start(tmp_path, TOTAL, "supervisor.preempt_signals=[SIGUSR1]")
    worker_pid_at_step(tmp_path, 0, 25)
    os.kill(proc.pid, signal.SIGINT)
    code, out = finish(proc, tmp_path, timeout=120)
    assert code == 130, out[-5000:]
    assert any(e.get("reason") == "preempted" for e in events(tmp_path)), "snapshot on the way out"
    assert summary(tmp_path)["status"] == "preempted"


def test_a_second_signal_stops_at_once(tmp_path):
    proc = start(tmp_path, TOTAL, "supervisor.preempt_grace_s=120",
                 env={"PADDLERUN_TEST_PAUSE_BEFORE_COMMIT": "30:100"})
    # The persist of step 30 hangs, so the workers cannot finish a snapshot in the grace period.
    wait_for(lambda: (tmp_path / "checkpoints" / ".staging-step-00000030").exists(), 120,
             "the stuck persist")
    os.kill(proc.pid, signal.SIGUSR1)
    time.sleep(1.0)
    second = time.time()
    os.kill(proc.pid, signal.SIGUSR1)
    code, out = finish(proc, tmp_path, timeout=60)
    assert code == 75, out[-5000:]
    assert time.time() - second < 20, "did not wait out the 120 s grace period"
    preempted = next(e for e in events(tmp_path) if e["event"] == "preempted")
    assert preempted["how"] == "second signal" and not preempted["clean"]
