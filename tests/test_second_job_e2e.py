"""Two jobs on one checkpoints directory, with real processes: the second is refused before
it touches anything of the first, which loses nothing."""
import socket

import pytest

from helpers import (reference_digest, assert_no_leftovers, events, heartbeat, killed_on_error, run, start, summary,
                     wait, wait_for)

pytestmark = pytest.mark.slow

TOTAL = "train.max_steps=60"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_digest(tmp_path_factory, TOTAL)


def test_a_second_job_is_refused_while_the_first_is_mid_persist_and_the_first_loses_nothing(
        tmp_path, reference):
    shared = tmp_path / "shared-ckpt"
    first_dir, second_dir, release = tmp_path / "first", tmp_path / "second", tmp_path / "release"
    # The first job's persist of step 30 waits (before its commit) until `release` exists.
    # Its final snapshot waits for that persist: no progress, which must not count as a hang.
    first = start(first_dir, TOTAL, f"checkpoint.dir={shared}", "supervisor.hang_timeout_s=600",
                  env={"PADDLERUN_TEST_PAUSE_BEFORE_COMMIT": "30:240",
                       "PADDLERUN_TEST_RELEASE_COMMIT": str(release)})
    with killed_on_error(first):
        staging = shared / ".staging-step-00000030"
        wait_for(lambda: (staging / "trainer_state.json").exists(), 120, "the persist of step 30")
        writer_pid = heartbeat(first_dir, 0)["pid"]

        second = run(second_dir, TOTAL, f"checkpoint.dir={shared}", timeout=180)
        assert second.returncode == 1, second.stdout[-5000:]
        assert f"host {socket.gethostname()}, pid {writer_pid}" in second.stdout, second.stdout[-5000:]
        assert "WriterBusyError" in second.stdout
        assert "giving up: not retriable" in second.stdout, "a live owner is not retried blindly"
        assert staging.is_dir() and (staging / "model.safetensors").is_file(), \
            "the second job left the first one's snapshot in flight alone"
        assert not (shared / "step-00000030").exists(), "still paused before its commit"

        release.touch()
        out = wait(first, 300)
    assert first.returncode == 0, out[-5000:]
    committed = [e for e in events(first_dir) if e["event"] == "snapshot_committed"]
    assert any(e["step"] == 30 and e["attempt"] == 0 for e in committed), committed
    assert [e["event"] for e in events(first_dir)].count("started") == 1, "no failure, no restart"
    assert summary(first_dir)["digest"] == reference
    for run_dir in (first_dir, second_dir):
        assert_no_leftovers(run_dir)
