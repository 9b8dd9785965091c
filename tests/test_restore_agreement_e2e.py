"""Restore is an agreement, with 2 real workers: when one rank cannot read the snapshot
rank 0 resumed from, the attempt fails naming that rank and its reason -- no rank falls
back to an older snapshot on its own -- and the restart resumes both from the same one."""
import os
import signal
import subprocess
import sys

import pytest

from helpers import reference_digest, assert_no_leftovers, events, killed_on_error, run, summary
from test_script_mode import (EXAMPLE, SCRIPT_ARGS, SUPERVISOR, clean_env, digest_of, finish,
                              wait_for_snapshot, workers)

pytestmark = pytest.mark.slow

FIRST, TOTAL = "train.max_steps=40", "train.max_steps=80"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_digest(tmp_path_factory, TOTAL)


def test_a_rank_that_cannot_read_rank_0_s_choice_fails_the_attempt_loudly(tmp_path, reference):
    first = run(tmp_path, FIRST)  # attempt 0: snapshots of steps 20, 30 and 40 kept
    assert first.returncode == 0, first.stdout[-5000:]
    # The rerun's first attempt (1): rank 1's reads fail, as a transient I/O error would.
    again = run(tmp_path, TOTAL, env={"PADDLERUN_TEST_RESTORE_READ_FAILS": "1:1"})
    assert again.returncode == 0, again.stdout[-5000:]
    assert_no_leftovers(tmp_path)

    failed = [e for e in events(tmp_path) if e["event"] == "worker_failed"]
    assert [e["attempt"] for e in failed] == [1], failed
    cause = failed[0]["cause"]
    assert cause.startswith("RestoreDisagreement: rank 0 resumed from step 40"), cause
    assert "rank 1: CheckpointError: cannot read" in cause and "Input/output error" in cause, cause
    logs = tmp_path / "logs"
    rank1 = (logs / "attempt-1" / "workerlog.1").read_text()
    assert "paddlerun.checkpoint: resumed from" not in rank1, "rank 1 did not fall back to an older one"
    assert "rank 1 cannot load step 40 of the run's checkpoints" in rank1, rank1[-3000:]
    for rank in (0, 1):  # the restart: both ranks from the very same snapshot
        log = (logs / "attempt-2" / f"workerlog.{rank}").read_text()
        assert "step-00000040: step 40, epoch 0, batch 40" in log, log[-3000:]
    assert summary(tmp_path)["digest"] == reference



def start_script(run_dir, env=None) -> subprocess.Popen:
    """``paddlerun run --script`` of the Session example with 2 workers."""
    argv = [sys.executable, "-m", "paddlerun.launcher.cli", "run", "--script", str(EXAMPLE),
            "--nproc-per-node", "2", "--run-dir", str(run_dir)]
    for item in SUPERVISOR:
        argv += ["--set", item]
    return subprocess.Popen([*argv, "--", *SCRIPT_ARGS], cwd=run_dir.parent,
                            env={**clean_env(), **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_a_session_script_restores_through_the_same_agreement(tmp_path):
    """``Session`` (and the hapi callback) restore through the same Checkpointer.restore:
    the restart after a SIGKILL (attempt 1) has rank 1's reads fail and fails loudly; the
    next one resumes both ranks from one snapshot and ends like an uninterrupted run."""
    (tmp_path / "reference").mkdir()
    uninterrupted = start_script(tmp_path / "reference" / "run")
    reference = finish(uninterrupted, timeout=240)
    assert uninterrupted.returncode == 0, reference[-5000:]

    run_dir = tmp_path / "run"
    proc = start_script(run_dir, env={"PADDLERUN_TEST_RESTORE_READ_FAILS": "1:1"})
    with killed_on_error(proc):
        wait_for_snapshot(run_dir, proc, 10)
        os.kill(workers(run_dir)[1][0], signal.SIGKILL)
    out = finish(proc, timeout=240)
    assert proc.returncode == 0, out[-5000:]
    failures = summary(run_dir)["failures"]
    assert len(failures) == 2 and failures[0]["rank"] == 1, failures  # the SIGKILL, then ours
    for rank in (0, 1):  # a script writes no error file: its log has the traceback
        log = (run_dir / "logs" / "attempt-1" / f"workerlog.{rank}").read_text()
        assert "RestoreDisagreement: rank 0 resumed from step " in log \
            and "rank 1: CheckpointError: cannot read" in log, log[-3000:]
    assert digest_of(out) == digest_of(reference)
    assert_no_leftovers(run_dir)
