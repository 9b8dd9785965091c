"""``paddle.Model.fit`` with paddlerun's Checkpoint callback: a killed run, run again, ends bit for bit
where an uninterrupted one does -- run directly and under ``paddlerun run --script``.

The process tests run ``examples/tutorial_lenet.py`` (one worker, 63 steps an epoch). The
in-process tests use a small slice of the data to cover what the tutorial does not: an LR
scheduler, evaluation data, a resume at an epoch boundary, and the errors.
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

EXAMPLE = REPO / "examples" / "tutorial_lenet.py"
TOTAL = 100  # into the second epoch
KILL_AFTER = 70  # kill once a snapshot at or after this step (mid second epoch) is committed
STEPS_PER_EPOCH = 63


def clean_env(**extra):
    """No inherited PADDLE_* / PADDLERUN_* variable may change the run
    (docs/paddle-behaviour.md#the-launcher)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PADDLE_", "PADDLERUN_"))}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def example_argv(run_dir: Path):
    return [sys.executable, str(EXAMPLE), "--checkpoint-dir", str(run_dir / "checkpoints"),
            "--max-steps", str(TOTAL), "--every-steps", "10", "--verbose", "0"]


def run_example(run_dir: Path, timeout: float = 120) -> str:
    # PADDLERUN_RUN_DIR: the callback also writes metrics.jsonl there, as in script mode.
    proc = subprocess.run(example_argv(run_dir), cwd=run_dir,
                          env=clean_env(PADDLERUN_RUN_DIR=str(run_dir)), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-5000:]
    return proc.stdout


def digest_of(output: str) -> str:
    return [line.split()[1] for line in output.splitlines() if line.startswith("digest ")][-1]


def metrics(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def newest_step(directory: Path):
    info = CheckpointStore(directory).newest_complete(verify=False)
    return info.step if info is not None else None


def snapshot_or_exit(directory: Path, proc: subprocess.Popen) -> bool:
    """A snapshot to be killed after is committed (or the process already ended: it failed)."""
    return (newest_step(directory) or 0) >= KILL_AFTER or proc.poll() is not None


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    digest = digest_of(run_example(run_dir))
    losses = {m["step"]: m["loss"] for m in metrics(run_dir)}
    assert sorted(losses) == list(range(1, TOTAL + 1))
    return digest, losses


def test_killed_then_run_again_gives_identical_parameters(tmp_path, reference):
    digest, losses = reference
    proc = subprocess.Popen(example_argv(tmp_path), cwd=tmp_path,
                            env=clean_env(PADDLERUN_RUN_DIR=str(tmp_path)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: snapshot_or_exit(tmp_path / "checkpoints", proc), timeout=90,
                 what=f"a snapshot at step >= {KILL_AFTER}", interval=0.01)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    resume_step = newest_step(tmp_path / "checkpoints")
    assert KILL_AFTER <= resume_step < TOTAL and resume_step % STEPS_PER_EPOCH, \
        f"expected a mid-epoch snapshot to resume from, got {resume_step}"

    logged_before = len(metrics(tmp_path))
    output = run_example(tmp_path)

    assert digest_of(output) == digest
    resumed = metrics(tmp_path)[logged_before:]
    assert resumed[0]["step"] == resume_step + 1, "training went on right after the snapshot"
    assert {m["step"]: m["loss"] for m in resumed} == \
        {s: losses[s] for s in range(resume_step + 1, TOTAL + 1)}
    # The final snapshot is paddlerun's format and holds the same parameters.
    info = CheckpointStore(tmp_path / "checkpoints").newest_complete(verify=True)
    assert info.step == TOTAL and set(info.files) == {"model.safetensors", "optimizer.safetensors",
                                                       "trainer_state.json"}
    from paddlerun.trainer.rundir.digest import params_digest
    assert params_digest(info.read_tensors("model.safetensors")) == digest
    state = info.read_json("trainer_state.json")
    assert (state["epoch"], state["batch"]) == divmod(TOTAL, STEPS_PER_EPOCH)


@pytest.mark.slow
def test_supervised_script_restarts_a_killed_worker_and_ends_identical(tmp_path, reference):
    digest, losses = reference
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "paddlerun.launcher.cli", "run", "--script", str(EXAMPLE),
            "--nproc-per-node", "1", "--run-dir", str(run_dir),
            "--set", "supervisor.heartbeat_interval_s=0.25", "--set", "supervisor.hang_timeout_s=30",
            "--set", "supervisor.backoff_s=0.2",
            "--", "--max-steps", str(TOTAL), "--every-steps", "10", "--verbose", "0"]
    proc = subprocess.Popen(argv, cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    with killed_on_error(proc):
        wait_for(lambda: snapshot_or_exit(run_dir / "checkpoints", proc), timeout=90,
                 what=f"a snapshot at step >= {KILL_AFTER}", interval=0.01)
        worker = json.loads((run_dir / "heartbeats" / "rank-0.json").read_text())
        os.kill(worker["pid"], signal.SIGKILL)
        resume_step = newest_step(run_dir / "checkpoints")
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-5000:]
    assert digest_of(out) == digest
    records = metrics(run_dir)
    assert {m["attempt"] for m in records} == {0, 1}
    resumed = [m for m in records if m["attempt"] == 1]
    assert resumed[0]["step"] == resume_step + 1, "training went on right after the snapshot"
    assert {m["step"]: m["loss"] for m in resumed} == \
        {s: losses[s] for s in range(resume_step + 1, TOTAL + 1)}
    assert_no_leftovers(run_dir)


def test_the_tutorial_runs_with_no_options_and_again_once_finished(tmp_path):
    # As a user runs it: no directory given (it defaults to ./checkpoints), then the same
    # command again after it finished -- what a requeue of a finished job does: nothing is
    # trained, and the inference model is saved from the restored parameters.
    argv = [sys.executable, str(EXAMPLE), "--max-steps", "3", "--epochs", "1", "--verbose", "0"]
    digests = []
    for run in range(2):
        proc = subprocess.run(argv, cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=300)
        assert proc.returncode == 0, f"run {run}:\n{proc.stdout[-5000:]}"
        digests.append(digest_of(proc.stdout))
        saved = sorted(tmp_path.glob("inference_model.*"))
        assert saved, f"run {run} saved no inference model"
        for path in saved:  # the next run must write its own
            path.unlink()
    assert [info.step for info in CheckpointStore(tmp_path / "checkpoints").snapshots()] == [3]
    assert digests[0] == digests[1]


# ---------------------------------------------------------------- in process


@pytest.fixture(scope="module")
def data():
    from paddlerun.trainer.data import ArrayDataset, mnist
    train, test = mnist("train"), mnist("eval")
    # 10 batches of 64 an epoch, 2 eval batches: quick, and still several epochs.
    return (ArrayDataset(train.images[:640], train.labels[:640], "train slice"),
            ArrayDataset(test.images[:128], test.labels[:128], "eval slice"))


class EvalBatches(paddle.callbacks.Callback):
    """How many batches each evaluation in ``fit`` ran."""

    def __init__(self):
        super().__init__()
        self.counts, self._n = [], 0

    def on_eval_begin(self, logs=None):
        self._n = 0

    def on_eval_batch_end(self, step, logs=None):
        self._n += 1

    def on_eval_end(self, logs=None):
        self.counts.append(self._n)


def fit(data, directory, epochs=3, max_steps=None, every_steps=4, **kwargs):
    """Train the tutorial's model, with dropout and a step-decayed LR that hapi's own
    LRScheduler callback advances every batch; returns (digest, eval batch counts)."""
    from paddlerun.trainer.rundir.digest import params_digest
    from paddlerun.trainer.hapi import Checkpoint
    paddle.seed(11)
    # Optimizer state is keyed by names (parameters', and its accumulators' made at the first
    # step) that count up within a process: each "process" here names them as a fresh one does.
    with paddle.utils.unique_name.guard():
        # Dropout draws from paddle's RNG every step: the snapshot's RNG state must be restored.
        network = paddle.nn.Sequential(paddle.vision.models.LeNet(), paddle.nn.Dropout(0.2))
        model = paddle.Model(network)
        lr = paddle.optimizer.lr.StepDecay(learning_rate=0.003, step_size=3, gamma=0.7)
        model.prepare(paddle.optimizer.Adam(learning_rate=lr, parameters=model.parameters()),
                      paddle.nn.CrossEntropyLoss(), paddle.metric.Accuracy())
        ckpt = Checkpoint(directory, every_steps=every_steps, max_steps=max_steps, **kwargs)
        evals = EvalBatches()
        model.fit(ckpt.loader(data[0], batch_size=64), data[1], batch_size=64, epochs=epochs,
                  verbose=0, callbacks=[ckpt, evals])
    return params_digest({k: v.numpy() for k, v in model.network.state_dict().items()}), evals.counts


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    return fit(data, tmp_path_factory.mktemp("hapi-ref"))


# Ten steps an epoch, a snapshot every 4 steps and a final one where max_steps stops it. The
# snapshots after ``resume_from`` are deleted, as if the first run had been killed right after
# that one was written. 16: scheduled, mid-epoch; 20: scheduled, at the end of an epoch (taken
# before its evaluation, so that runs again); 23: final, mid-epoch; 10: final, at an epoch's end.
@pytest.mark.parametrize("stop_at,resume_from,evals_after", [
    (23, 16, [0, 2, 2]), (23, 20, [0, 2, 2]), (23, 23, [0, 0, 2]), (10, 10, [2, 2, 2])])
def test_resume_with_lr_schedule_and_eval_data_is_exact(data, uninterrupted, tmp_path, stop_at,
                                                        resume_from, evals_after):
    digest, evals = uninterrupted
    assert evals == [2, 2, 2]
    first, _ = fit(data, tmp_path, max_steps=stop_at)
    assert first != digest
    for info in CheckpointStore(tmp_path).snapshots():
        if info.step > resume_from:
            shutil.rmtree(info.path)
    assert newest_step(tmp_path) == resume_from
    resumed, evals = fit(data, tmp_path)
    assert resumed == digest
    assert evals == evals_after, "finished epochs are neither trained nor evaluated again"
    # Run again once finished: nothing left to train, and the model stays as it is.
    assert fit(data, tmp_path, max_steps=stop_at)[0] == digest


def test_epoch_end_snapshots_without_a_schedule(data, tmp_path):
    fit(data, tmp_path, epochs=2, every_steps=None, async_save=False)
    assert [i.step for i in CheckpointStore(tmp_path).snapshots()] == [10, 20]


def test_script_mode_stop_request_snapshots_and_ends_fit(data, tmp_path, monkeypatch):
    from paddlerun.trainer.rundir import control
    from paddlerun.trainer.rundir.heartbeat import read_heartbeats
    monkeypatch.setenv("PADDLERUN_RUN_DIR", str(tmp_path))  # what the supervisor sets
    monkeypatch.setenv("PADDLERUN_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    control.request_stop(tmp_path, reason="SIGTERM")
    fit(data, None, epochs=3, every_steps=4)
    info = CheckpointStore(tmp_path / "checkpoints").newest_complete()
    assert (info.step, info.manifest["reason"]) == (10, "preempted")
    assert [m["step"] for m in metrics(tmp_path)] == list(range(1, 11))
    beat = read_heartbeats(tmp_path / "heartbeats")[0]
    assert (beat.step, beat.phase) == (10, "stopped")  # stopped on request: the run is not finished


def test_fit_on_the_dataset_instead_of_the_loader_is_refused(data, tmp_path):
    from paddlerun.trainer.hapi import Checkpoint
    model = paddle.Model(paddle.vision.models.LeNet())
    model.prepare(paddle.optimizer.Adam(parameters=model.parameters()), paddle.nn.CrossEntropyLoss())
    with pytest.raises(RuntimeError, match=r"pass ckpt.loader\(train_dataset"):
        model.fit(data[0], batch_size=64, verbose=0, callbacks=[Checkpoint(tmp_path)])
    ckpt = Checkpoint(tmp_path)
    ckpt.loader(data[0], batch_size=64)  # built, but fit is given the dataset
    with pytest.raises(RuntimeError, match="fit is not reading the loader"):
        model.fit(data[0], batch_size=64, verbose=0, callbacks=[ckpt])
    assert newest_step(tmp_path) is None


def test_resume_false_refuses_a_directory_with_snapshots(data, tmp_path):
    from paddlerun.trainer.rundir.config import ConfigError
    fit(data, tmp_path, epochs=1, max_steps=4)
    with pytest.raises(ConfigError, match="resume=False.*step-00000004"):
        fit(data, tmp_path, epochs=1, resume=False)


def test_a_directory_is_required_outside_script_mode(monkeypatch):
    from paddlerun.trainer.hapi import Checkpoint
    monkeypatch.delenv("PADDLERUN_CHECKPOINT_DIR", raising=False)
    with pytest.raises(ValueError, match="PADDLERUN_CHECKPOINT_DIR"):
        Checkpoint()
    with pytest.raises(Exception, match="every_steps must be >= 1"):
        Checkpoint("x", every_steps=0)
