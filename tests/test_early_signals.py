"""A preemption signal while paddlerun starts up is a clean exit 75, never a death by it."""
import os
import signal
import subprocess
import sys
import time

from helpers import assert_no_leftovers, events, killed_on_error, start, wait, wait_for
from paddlerun.trainer.rundir.process_identity import ProcessIdentity


def test_sigterm_while_leftovers_are_stopped_exits_75(tmp_path):
    # A leftover of a dead supervisor that ignores SIGTERM holds the new supervisor in its
    # start-up for 5 s (SIGTERM, then SIGKILL): the scheduler's SIGTERM lands there.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    dead = ProcessIdentity.of(gone.pid)
    gone.wait(timeout=30)
    env = {**os.environ, "PADDLERUN_RUN_DIR": str(tmp_path), "PADDLERUN_SUPERVISOR": str(dead)}
    leftover = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', "
                                 "flush=True); time.sleep(60)"], env=env, stdout=subprocess.PIPE,
                                text=True)
    try:
        assert leftover.stdout.readline().strip() == "ready"
        proc = start(tmp_path, "train.max_steps=5")
        with killed_on_error(proc):
            # supervisor.json is written just before the leftovers are stopped; the stop
            # lasts 5 s here (the leftover ignores SIGTERM and waits for its SIGKILL).
            wait_for(lambda: (tmp_path / "supervisor.json").exists(), 60, "the run directory")
            time.sleep(1.0)
            assert leftover.poll() is None
            proc.send_signal(signal.SIGTERM)
            out = wait(proc, 60)
    finally:
        leftover.kill()
        leftover.wait(timeout=30)
    assert proc.returncode == 75, out[-3000:]
    preempted = [e for e in events(tmp_path) if e["event"] == "preempted"]
    assert preempted and preempted[0]["clean"], preempted
    assert not any(e["event"] == "started" for e in events(tmp_path)), "no attempt was started"
    assert_no_leftovers(tmp_path)
