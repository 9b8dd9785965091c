"""A persist slower than the collective timeout, with real processes: rank 0 skips the
snapshots due meanwhile instead of waiting for it, so no peer times out in its all-reduce."""
import json
import subprocess
import sys

import pytest

from helpers import (reference_digest, REPO, assert_no_leftovers, events, heartbeat, killed_on_error, start,
                     summary, wait, wait_for)

pytestmark = pytest.mark.slow

TOTAL = "train.max_steps=60"
#: gloo's all-reduce (and the shared-memory sum) give up on a silent peer after 30 s.
COLLECTIVE_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_digest(tmp_path_factory, TOTAL)


def test_snapshots_due_during_a_slow_persist_are_skipped_and_counted_no_peer_times_out(
        tmp_path, reference):
    release = tmp_path / "release"
    # The persist of step 20 takes (up to) 4 x the collective timeout: until `release` exists.
    proc = start(tmp_path, TOTAL, env={
        "PADDLERUN_TEST_PAUSE_BEFORE_COMMIT": f"20:{4 * COLLECTIVE_TIMEOUT_S}",
        "PADDLERUN_TEST_RELEASE_COMMIT": str(release)})
    with killed_on_error(proc):
        # Training goes on past the snapshots due at 30, 40 and 50 to the final one at 60,
        # which waits for the persist (nothing follows it). Had rank 0 waited at step 30,
        # rank 1 would have timed out in its all-reduce after 30 s and the attempt failed.
        wait_for(lambda: all((heartbeat(tmp_path, r) or {}).get("step", 0) >= 60 for r in (0, 1)),
                 3 * COLLECTIVE_TIMEOUT_S, "both ranks to reach step 60 while step 20 persists")
        assert not (tmp_path / "checkpoints" / "step-00000020").exists(), "still persisting"
        release.touch()
        out = wait(proc, 300)
    assert proc.returncode == 0, out[-5000:]
    assert_no_leftovers(tmp_path)
    names = [e["event"] for e in events(tmp_path)]
    assert names.count("started") == 1 and "worker_failed" not in names, names
    skipped = [e for e in events(tmp_path) if e["event"] == "snapshot_skipped"]
    assert [e["step"] for e in skipped] == [30, 40, 50], skipped
    assert all(e["reason"] == "persist_in_flight" and e["in_flight_step"] == 20 for e in skipped)
    assert "snapshot of step 30 (scheduled) skipped: the persist of step 20 is still running" in out
    committed = [e["step"] for e in events(tmp_path) if e["event"] == "snapshot_committed"]
    assert committed == [10, 20, 60], committed
    assert summary(tmp_path)["digest"] == reference

    status = subprocess.run([sys.executable, "-m", "paddlerun.launcher.cli", "status", str(tmp_path),
                             "--json"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert json.loads(status.stdout)["snapshots_skipped"]["count"] == 3, status.stdout
    human = subprocess.run([sys.executable, "-m", "paddlerun.launcher.cli", "status", str(tmp_path)],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "3 skipped: the previous persist was still running" in human.stdout, human.stdout
