"""``paddlerun run --script`` with a plain Paddle loop (``examples/train_script.py``, Session):
a killed worker or a preempted run ends bit for bit where an uninterrupted run does.

The process tests run the example with two workers (DataParallel over gloo, 60 steps of 63
in its first epoch, a snapshot every 10). The in-process tests train one process on a
slice of the data to cover what 60 steps do not: epoch boundaries, an LR scheduler and
dropout (RNG), the stop request, SIGTERM and misuse.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

paddle = pytest.importorskip("paddle")

from helpers import REPO, assert_no_leftovers, killed_on_error, wait_for
from paddlerun.trainer.checkpoint import CheckpointStore
from paddlerun.trainer.rundir.process_identity import ProcessIdentity

EXAMPLE = REPO / "examples" / "train_script.py"
STEPS = 60
SCRIPT_ARGS = ["--max-steps", str(STEPS), "--every-steps", "10"]
SUPERVISOR = ["supervisor.heartbeat_interval_s=0.25", "supervisor.hang_timeout_s=30",
              "supervisor.backoff_s=0.2", "supervisor.preempt_grace_s=30"]


def clean_env():
    """No inherited PADDLE_* / PADDLERUN_* variable may change the run
    (docs/paddle-behaviour.md#the-launcher)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PADDLE_", "PADDLERUN_"))}
    return {**env, "PYTHONUNBUFFERED": "1"}


def start(run_dir: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "paddlerun.launcher.cli", "run", "--script", str(EXAMPLE),
            "--nproc-per-node", "2", "--run-dir", str(run_dir)]
    for item in SUPERVISOR:
        argv += ["--set", item]
    return subprocess.Popen([*argv, "--", *SCRIPT_ARGS], cwd=run_dir.parent, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 90) -> str:
    with killed_on_error(proc):
        out, _ = proc.communicate(timeout=timeout)
    return out


def digest_of(output: str) -> str:
    digests = [line.split()[1] for line in output.splitlines() if line.startswith("digest ")]
    assert digests, f"no digest printed:\n{output[-5000:]}"
    return digests[-1]


def newest_step(run_dir: Path) -> int:
    info = CheckpointStore(run_dir / "checkpoints").newest_complete(verify=False)
    return info.step if info is not None else 0


def metrics(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def workers(run_dir: Path) -> dict:
    """rank -> (pid, start_ticks) from the heartbeat files of the current attempt."""
    found = {}
    for rank in (0, 1):
        beat = json.loads((run_dir / "heartbeats" / f"rank-{rank}.json").read_text())
        found[rank] = (beat["pid"], beat["start_ticks"])
    return found


def assert_workers_gone(*pids) -> None:
    """The example's command line does not name the run dir: check its workers by pid."""
    wait_for(lambda: not any(ProcessIdentity(*p).alive() for p in pids), timeout=15, what=f"workers {pids} to exit")


def wait_for_snapshot(run_dir: Path, proc: subprocess.Popen, step: int) -> None:
    """Until a snapshot at ``step`` or later is committed (or the run ended: the test fails)."""
    wait_for(lambda: newest_step(run_dir) >= step or proc.poll() is not None, timeout=90,
             what=f"a snapshot at step >= {step}", interval=0.01)
    assert proc.poll() is None, "the run ended before the fault could be injected"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = start(run_dir)
    out = finish(proc)
    assert proc.returncode == 0, out[-5000:]
    digest_of(out)
    return run_dir, out


@pytest.mark.slow
def test_script_runs_to_the_end_under_the_supervisor(reference):
    run_dir, out = reference
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["status"], summary["restarts"]) == ("succeeded", 0), out[-3000:]
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, STEPS + 1))
    assert {m["attempt"] for m in metrics(run_dir)} == {0}
    info = CheckpointStore(run_dir / "checkpoints").newest_complete(verify=True)
    assert (info.step, info.manifest["reason"]) == (STEPS, "final")
    from paddlerun.trainer.rundir.digest import params_digest
    assert params_digest(info.read_tensors("model.safetensors")) == digest_of(out)
    beats = [json.loads((run_dir / "heartbeats" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [(b["step"], b["phase"]) for b in beats] == [(STEPS, "done")] * 2
    assert_no_leftovers(run_dir)


@pytest.mark.slow
def test_killed_worker_is_restarted_and_the_run_ends_identical(tmp_path, reference):
    run_dir = tmp_path / "run"
    proc = start(run_dir)
    with killed_on_error(proc):
        wait_for_snapshot(run_dir, proc, 10)
        first = workers(run_dir)
        os.kill(first[1][0], signal.SIGKILL)
    out = finish(proc)
    assert proc.returncode == 0, out[-5000:]
    assert digest_of(out) == digest_of(reference[1])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["restarts"] == 1 and summary["failures"][0]["rank"] == 1, summary
    assert "SIGKILL" in summary["failures"][0]["cause"]
    resumed = [m["step"] for m in metrics(run_dir) if m["attempt"] == 1]
    assert resumed[0] > 10 and resumed[0] % 10 == 1, "the restart resumed from a snapshot"
    assert resumed == list(range(resumed[0], STEPS + 1))
    assert_no_leftovers(run_dir)
    assert_workers_gone(*first.values(), *workers(run_dir).values())


@pytest.mark.slow
def test_sigterm_to_the_supervisor_snapshots_exits_75_and_a_rerun_ends_identical(tmp_path,
                                                                                  reference):
    run_dir = tmp_path / "run"
    proc = start(run_dir)
    with killed_on_error(proc):
        wait_for_snapshot(run_dir, proc, 10)
        first = workers(run_dir)
        os.kill(proc.pid, signal.SIGTERM)  # what a scheduler does to preempt the job
    out = finish(proc)
    assert proc.returncode == 75, out[-5000:]
    assert "digest" not in out
    info = CheckpointStore(run_dir / "checkpoints").newest_complete()
    assert info.manifest["reason"] == "preempted" and info.step % 10 == 0 and info.step < STEPS
    assert_no_leftovers(run_dir)
    assert_workers_gone(*first.values())

    proc = start(run_dir)  # what the scheduler's requeue does
    out = finish(proc)
    assert proc.returncode == 0, out[-5000:]
    assert digest_of(out) == digest_of(reference[1])
    assert f"starting at step {info.step} " in out
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, STEPS + 1))
    assert_no_leftovers(run_dir)


# ---------------------------------------------------------------- in process


@pytest.fixture(scope="module")
def data():
    from paddlerun.trainer.data import ArrayDataset, mnist
    train = mnist("train")
    return ArrayDataset(train.images[:640], train.labels[:640], "train slice")  # 10 batches of 64


def train(data, directory, epochs=3, max_steps=None, every_steps=4, stop_on_sigterm=False,
          after_step=None):
    """A plain loop with dropout (paddle's RNG every step) and a step-decayed LR; returns
    (digest, session)."""
    from paddlerun.trainer.rundir.digest import params_digest
    from paddlerun.trainer.models import LeNet
    from paddlerun.trainer.session import Session
    paddle.seed(11)
    # Optimizer state is keyed by names that count up within a process: name them as a
    # fresh process does.
    with paddle.utils.unique_name.guard():
        net = paddle.nn.Sequential(LeNet(), paddle.nn.Dropout(0.2))
        lr = paddle.optimizer.lr.StepDecay(learning_rate=0.003, step_size=3, gamma=0.7)
        optimizer = paddle.optimizer.Adam(learning_rate=lr, parameters=net.parameters())
        session = Session(net, optimizer, directory, every_steps=every_steps, max_steps=max_steps,
                          stop_on_sigterm=stop_on_sigterm)
        session.restore()
        loader = paddle.io.DataLoader(data, batch_sampler=session.sampler(len(data), 64))
        for _ in session.epochs(epochs):
            for images, labels in loader:
                loss = paddle.nn.functional.cross_entropy(net(images), labels)
                loss.backward()
                optimizer.step()
                optimizer.clear_grad()
                lr.step()
                if after_step is not None:
                    after_step(session)
                if session.step(loss=loss):
                    break
        session.finish()
    return params_digest({k: v.numpy() for k, v in net.state_dict().items()}), session


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    return train(data, tmp_path_factory.mktemp("session-ref"))[0]


# Ten steps an epoch, a snapshot every 4 and a final one where max_steps stops. Snapshots
# after ``resume_from`` are deleted, as if the run had been killed right after that one was
# written. 16: mid-epoch; 20: the last batch of an epoch (resumes into an empty epoch);
# 23: final, mid-epoch; 10: final, at an epoch's end.
@pytest.mark.parametrize("stop_at,resume_from", [(23, 16), (23, 20), (23, 23), (10, 10)])
def test_session_resume_is_exact(data, uninterrupted, tmp_path, stop_at, resume_from):
    first, _ = train(data, tmp_path, max_steps=stop_at)
    assert first != uninterrupted
    for info in CheckpointStore(tmp_path).snapshots():
        if info.step > resume_from:
            shutil.rmtree(info.path)
    assert CheckpointStore(tmp_path).newest_complete().step == resume_from
    resumed, session = train(data, tmp_path)
    assert resumed == uninterrupted
    assert (session.position.step, session.position.epoch) == (30, 3)
    # Run again once finished: nothing left to train, and the model stays as it is.
    assert train(data, tmp_path, max_steps=stop_at)[0] == uninterrupted


def test_epoch_end_snapshots_without_a_schedule(data, tmp_path):
    train(data, tmp_path, epochs=2, every_steps=None)
    snapshots = CheckpointStore(tmp_path).snapshots()
    assert [(i.step, i.manifest["reason"]) for i in snapshots] == [(10, "epoch"), (20, "final")]
    state = snapshots[0].read_json("trainer_state.json")
    assert (state["epoch"], state["batch"], state["global_batch_size"]) == (1, 0, 64)


def test_stop_request_in_script_mode(data, tmp_path, monkeypatch):
    from paddlerun.trainer.rundir import control
    from paddlerun.trainer.rundir.heartbeat import read_heartbeats
    monkeypatch.setenv("PADDLERUN_RUN_DIR", str(tmp_path))  # what the supervisor sets
    monkeypatch.setenv("PADDLERUN_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    control.request_stop(tmp_path, reason="SIGTERM")
    _, session = train(data, None)
    assert session.preempted
    info = CheckpointStore(tmp_path / "checkpoints").newest_complete()
    assert (info.step, info.manifest["reason"]) == (10, "preempted")
    assert [m["step"] for m in metrics(tmp_path)] == list(range(1, 11))
    assert all(isinstance(m["loss"], float) and m["lr"] > 0 for m in metrics(tmp_path))
    beat = read_heartbeats(tmp_path / "heartbeats")[0]
    assert (beat.step, beat.phase) == (10, "stopped")  # stopped on request: the run is not finished


def test_sigterm_stops_at_the_next_check_with_a_snapshot(data, tmp_path):
    from paddlerun.trainer import signals
    previous = signal.getsignal(signal.SIGTERM)

    def preempt_at_step_13(session):
        if session.position.step == 12:  # step() is about to count step 13
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        _, session = train(data, tmp_path, stop_on_sigterm=True, after_step=preempt_at_step_13)
    finally:
        signal.signal(signal.SIGTERM, previous)
        signals._stop.clear()  # the flag is process-wide
    assert session.preempted and session.position.step == 20
    assert CheckpointStore(tmp_path).newest_complete().manifest["reason"] == "preempted"


def test_misuse_is_refused(data, tmp_path, monkeypatch):
    from paddlerun.trainer.models import LeNet
    from paddlerun.trainer.session import Session
    net = LeNet()
    optimizer = paddle.optimizer.Adam(parameters=net.parameters())
    monkeypatch.delenv("PADDLERUN_CHECKPOINT_DIR", raising=False)
    with pytest.raises(ValueError, match="PADDLERUN_CHECKPOINT_DIR"):
        Session(net, optimizer, stop_on_sigterm=False)
    with pytest.raises(Exception, match="every_steps must be >= 1"):
        Session(net, optimizer, tmp_path, every_steps=0, stop_on_sigterm=False)
    session = Session(net, optimizer, tmp_path, stop_on_sigterm=False)
    loader = paddle.io.DataLoader(data, batch_sampler=session.sampler(len(data), 64))
    with pytest.raises(RuntimeError, match="epoch 0 ended after batch 1 of 10"):
        for _ in session.epochs(1):
            for images, labels in loader:
                session.step()
                break
    session.finish()
