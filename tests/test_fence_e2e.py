"""The generation fence end to end: a real ``paddlerun run`` whose workers are of generation 1
is overtaken by generation 2 in the middle of a persist (docs/checkpoints.md#generation-fence).

The fence is raised by this test's process, as an elastic job's supervisor on another node
would; the workers learn their generation from PADDLERUN_TEST_GENERATION (the supervisor
scrubs PADDLERUN_GENERATION from its own environment: only an elastic supervisor sets it).
"""
import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, assert_no_leftovers, events, killed_on_error, start, wait, wait_for
from paddlerun.trainer.checkpoint import CheckpointStore, inspect_snapshot
from paddlerun.trainer.rundir.process_identity import ProcessIdentity

pytestmark = pytest.mark.slow


def generation_1_env(release) -> dict:
    """Workers of generation 1, whose persist of step 30 waits before its commit until ``release``."""
    return {"PADDLERUN_TEST_GENERATION": "1", "PADDLERUN_TEST_PAUSE_BEFORE_COMMIT": "30:240",
            "PADDLERUN_TEST_RELEASE_COMMIT": str(release)}


def overtake_at_step_30(proc: subprocess.Popen, checkpoints, release) -> list:
    """Once step 30 is staged, start generation 2 (raise the fence), let the commit go on;
    returns the snapshots committed before the fence."""
    with killed_on_error(proc):
        staging = checkpoints / ".staging-step-00000030"
        wait_for(lambda: (staging / "trainer_state.json").exists(), 180, "the persist of step 30")
        assert CheckpointStore(checkpoints).raise_fence(2) == 2
        landed = sorted(p.name for p in checkpoints.glob("step-*"))
        release.touch()
    return landed


def assert_refused_and_nothing_landed(run_dir, out: str, landed: list) -> None:
    checkpoints = run_dir / "checkpoints"
    assert "StaleGenerationError" in out and "giving up: not retriable" in out, out[-5000:]
    assert [e["event"] for e in events(run_dir)].count("started") == 1, "not restarted"
    record = json.loads((run_dir / "errors" / "attempt-0" / "rank-0.json").read_text())
    assert record["type"] == "StaleGenerationError" and record["retriable"] is False, record
    assert "generation 1" in record["message"] and "generation 2" in record["message"]
    assert landed == ["step-00000010", "step-00000020"], landed
    assert sorted(p.name for p in checkpoints.glob("step-*")) == landed, "nothing landed after the fence"
    assert not list(checkpoints.glob(".staging-*")), "the refused snapshot was removed"
    assert all(inspect_snapshot(checkpoints / name).manifest["generation"] == 1 for name in landed)


def test_a_generation_1_worker_stops_not_retriable_once_generation_2_started_and_lands_nothing(tmp_path):
    run_dir, release = tmp_path / "run", tmp_path / "release"
    # The final snapshot waits for step 30's persist: no progress meanwhile, not a hang.
    proc = start(run_dir, "train.max_steps=60", "supervisor.hang_timeout_s=600",
                 env=generation_1_env(release))
    landed = overtake_at_step_30(proc, run_dir / "checkpoints", release)
    out = wait(proc, 300)

    assert proc.returncode == 1, out[-5000:]
    assert_refused_and_nothing_landed(run_dir, out, landed)
    beats = [json.loads((run_dir / "heartbeats" / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    workers = [ProcessIdentity(beat["pid"], beat["start_ticks"]) for beat in beats]
    wait_for(lambda: not any(w.alive() for w in workers), 15, f"workers {workers} to exit")
    worker_log = (run_dir / "logs" / "attempt-0" / "workerlog.0").read_text(errors="replace")
    assert "generation 1 is over (the job runs generation 2 now)" in worker_log
    committed = [e["step"] for e in events(run_dir) if e["event"] == "snapshot_committed"]
    assert committed == [10, 20], committed
    assert_no_leftovers(run_dir)


def test_a_session_script_of_generation_1_is_refused_the_same_and_not_restarted(tmp_path):
    """A user's script: nobody records its exceptions but the Checkpointer, which must say
    "not retriable" itself, or the supervisor would restart generation 1 again and again."""
    run_dir, release = tmp_path / "run", tmp_path / "release"
    argv = [sys.executable, "-m", "paddlerun.launcher.cli", "run", "--script",
            str(REPO / "examples" / "train_script.py"), "--nproc-per-node", "2", "--run-dir", str(run_dir),
            "--set", "supervisor.heartbeat_interval_s=0.25", "--set", "supervisor.hang_timeout_s=600",
            "--set", "supervisor.backoff_s=0.2", "--", "--max-steps", "60", "--every-steps", "10"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PADDLE_", "PADDLERUN_"))}
    proc = subprocess.Popen(argv, cwd=tmp_path, env={**env, **generation_1_env(release)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    landed = overtake_at_step_30(proc, run_dir / "checkpoints", release)
    out = wait(proc, 300)

    assert proc.returncode == 1, out[-5000:]
    assert_refused_and_nothing_landed(run_dir, out, landed)
    beats = [json.loads((run_dir / "heartbeats" / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    workers = [ProcessIdentity(beat["pid"], beat["start_ticks"]) for beat in beats]
    wait_for(lambda: not any(w.alive() for w in workers), 15, f"workers {workers} to exit")
