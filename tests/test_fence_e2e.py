"""The generation fence end to end: a real ``paddlerun run`` whose workers are of generation 1
is overtaken by generation 2 in the middle of a persist (docs/checkpoints.md#generation-fence).

The fence is raised by this test's process, as an elastic job's supervisor on another node
would; the workers learn their generation from PADDLERUN_TEST_GENERATION (the supervisor
scrubs PADDLERUN_GENERATION from its own environment: only an elastic supervisor sets it).
"""
import json

import pytest

from helpers import assert_no_leftovers, events, killed_on_error, start, wait, wait_for
from paddlerun.trainer.checkpoint import CheckpointStore, inspect_snapshot

pytestmark = pytest.mark.slow


def test_a_generation_1_worker_stops_not_retriable_once_generation_2_started_and_lands_nothing(tmp_path):
    run_dir, release = tmp_path / "run", tmp_path / "release"
    checkpoints = run_dir / "checkpoints"
    # Step 30's persist waits before its commit until `release` exists; the final snapshot
    # then waits for it: no progress meanwhile, which must not count as a hang.
    proc = start(run_dir, "train.max_steps=60", "supervisor.hang_timeout_s=600",
                 env={"PADDLERUN_TEST_GENERATION": "1",
                      "PADDLERUN_TEST_PAUSE_BEFORE_COMMIT": "30:240",
                      "PADDLERUN_TEST_RELEASE_COMMIT": str(release)})
    with killed_on_error(proc):
        staging = checkpoints / ".staging-step-00000030"
        wait_for(lambda: (staging / "trainer_state.json").exists(), 180, "the persist of step 30")
        assert CheckpointStore(checkpoints).raise_fence(2) == 2  # generation 2 starts
        landed = sorted(p.name for p in checkpoints.glob("step-*"))
        release.touch()
        out = wait(proc, 300)

    assert proc.returncode == 1, out[-5000:]
    assert "StaleGenerationError" in out and "giving up: not retriable" in out, out[-5000:]
    assert [e["event"] for e in events(run_dir)].count("started") == 1, "not restarted"
    record = json.loads((run_dir / "errors" / "attempt-0" / "rank-0.json").read_text())
    assert record["type"] == "StaleGenerationError" and record["retriable"] is False, record
    assert "generation 1" in record["message"] and "generation 2" in record["message"]
    worker_log = (run_dir / "logs" / "attempt-0" / "workerlog.0").read_text(errors="replace")
    assert "generation 1 is over (the job runs generation 2 now)" in worker_log

    assert landed == ["step-00000010", "step-00000020"], landed
    assert sorted(p.name for p in checkpoints.glob("step-*")) == landed, "nothing landed after the fence"
    assert not list(checkpoints.glob(".staging-*")), "the refused snapshot was removed"
    assert all(inspect_snapshot(checkpoints / name).manifest["generation"] == 1 for name in landed)
    committed = [e["step"] for e in events(run_dir) if e["event"] == "snapshot_committed"]
    assert committed == [10, 20], committed
    assert_no_leftovers(run_dir)
