"""What a supervisor stops before its first attempt: processes of its run directory whose
supervisor is gone -- never a live tree of another node sharing the run directory."""
import os
import subprocess
import sys

from paddlerun.launcher.leftovers import find_leftovers, stop_leftovers
from paddlerun.trainer.rundir.process_identity import ProcessIdentity


def sleeper(run_dir, supervisor):
    env = {**os.environ, "PADDLERUN_RUN_DIR": str(run_dir), "PADDLERUN_SUPERVISOR": str(supervisor)}
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)


def test_only_processes_of_a_dead_supervisor_are_leftovers(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    dead = ProcessIdentity.of(gone.pid)
    gone.wait(timeout=30)
    live_tree = sleeper(tmp_path, ProcessIdentity.me())  # another node's, its supervisor alive
    orphan = sleeper(tmp_path, dead)
    elsewhere = sleeper(tmp_path / "other-run", dead)
    try:
        found = find_leftovers(tmp_path)
        assert [i.pid for i in found] == [orphan.pid]
        assert stop_leftovers(found, term_timeout_s=10) == []
        assert orphan.wait(timeout=10) == -15
        assert live_tree.poll() is None and elsewhere.poll() is None
    finally:
        for p in (live_tree, orphan, elsewhere):
            p.kill()
            p.wait(timeout=30)
