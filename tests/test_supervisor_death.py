"""Only the supervisor dies (SIGKILL): nothing of its job trains on, and a rerun resumes bit-exact."""
import signal
import time

import pytest

from helpers import (assert_no_leftovers, events, free_port, heartbeat, kill_node, killed_on_error,
                     processes_of, run, start, summary, wait_for)
from paddlerun.trainer.rundir.process_identity import ProcessIdentity

pytestmark = pytest.mark.slow

TOTAL = 190  # three epochs: long enough to be killed in the middle


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    result = run(run_dir, f"train.max_steps={TOTAL}")
    assert result.returncode == 0, result.stdout[-5000:]
    return summary(run_dir)["digest"]


def kill_the_supervisor_mid_training(run_dir):
    """Start the job, SIGKILL its supervisor once rank 0 trains past step 30; returns the
    supervisor's pid and the identities of the rest of its job (launcher and workers)."""
    proc = start(run_dir, f"train.max_steps={TOTAL}")
    with killed_on_error(proc):
        wait_for(lambda: (hb := heartbeat(run_dir, 0)) and hb["phase"] == "train" and hb["step"] >= 30,
                 180, "rank 0 to train past step 30")
        job = [ProcessIdentity.of(p.pid) for p in processes_of(run_dir) if p.pid != proc.pid]
        assert len(job) >= 3, "the launch process and both workers"
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    return proc.pid, [i for i in job if i is not None]


def test_the_job_stops_within_seconds_and_a_rerun_resumes_bit_exact(tmp_path, reference):
    supervisor_pid, job = kill_the_supervisor_mid_training(tmp_path)
    killed_at = time.monotonic()
    wait_for(lambda: not any(i.alive() for i in job), 30, "the launcher and workers to exit")
    print(f"\nthe launcher and both workers were gone {time.monotonic() - killed_at:.1f} s "
          f"after the supervisor's SIGKILL")
    # The first rank to notice exits; its peer may then fail through the gradient sum first.
    logs = [(tmp_path / "logs" / "attempt-0" / f"workerlog.{rank}").read_text(errors="replace")
            for rank in (0, 1)]
    assert any(f"its supervisor, pid {supervisor_pid}, is gone" in log for log in logs), logs[0][-3000:]
    second = run(tmp_path, f"train.max_steps={TOTAL}")
    assert second.returncode == 0, second.stdout[-5000:]
    assert "resumed from" in second.stdout
    assert summary(tmp_path)["digest"] == reference
    assert_no_leftovers(tmp_path)


def test_a_rerun_stops_what_the_dead_supervisor_left_then_resumes_bit_exact(tmp_path, reference):
    """Leftovers that cannot stop by themselves (SIGSTOPped workers, like a frozen job) are
    found by the rerun through their environment and stopped before it starts its own
    workers. (The launcher, stopped too, is killed by the kernel with the supervisor.)"""
    proc = start(tmp_path, f"train.max_steps={TOTAL}")
    with killed_on_error(proc):
        wait_for(lambda: (hb := heartbeat(tmp_path, 0)) and hb["phase"] == "train" and hb["step"] >= 30,
                 180, "rank 0 to train past step 30")
        launcher = [ProcessIdentity.of(p.pid) for p in processes_of(tmp_path)
                    if p.pid != proc.pid and "paddle.distributed.launch" in p.cmdline()]
        workers = [ProcessIdentity.of(p.pid) for p in processes_of(tmp_path)
                   if p.pid != proc.pid and "paddle.distributed.launch" not in p.cmdline()]
        assert len(launcher) == 1 and len(workers) == 2
        for identity in launcher + workers:
            identity.send_signal(signal.SIGSTOP)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    try:
        wait_for(lambda: not launcher[0].alive(), 5, "the stopped launcher to die with its supervisor")
        time.sleep(2)
        assert all(i.alive() for i in workers), "stopped: they cannot notice anything"
        second = run(tmp_path, f"train.max_steps={TOTAL}")
    finally:
        for identity in launcher + workers:
            identity.send_signal(signal.SIGKILL)
    assert second.returncode == 0, second.stdout[-5000:]
    assert "still run (pids" in second.stdout and "stopping them first" in second.stdout
    stopped = [e for e in events(tmp_path) if e["event"] == "leftovers_stopped"]
    assert len(stopped) == 1 and sorted(stopped[0]["pids"]) == sorted(i.pid for i in workers)
    assert not any(i.alive() for i in workers)
    assert summary(tmp_path)["digest"] == reference
    assert_no_leftovers(tmp_path)


def test_a_launcher_waiting_for_its_peer_node_dies_with_the_supervisor(tmp_path):
    """Node 0 of a two-node job, started alone: its launcher waits in Paddle's rendezvous and
    has no worker yet to notice that the supervisor is gone. The kernel stops it instead
    (the launch process's parent-death signal)."""
    run_dir = tmp_path / "node0"
    proc = start(run_dir, "train.max_steps=6", "launch.nnodes=2", "launch.node_rank=0",
                 f"launch.master=127.0.0.1:{free_port()}", "launch.nproc_per_node=1")
    try:
        launch_log = run_dir / "logs" / "attempt-0" / "launch.log"
        wait_for(lambda: launch_log.is_file() and "Waiting peer start" in launch_log.read_text(),
                 120, "node 0's launcher to wait for its peer")
        launcher = [ProcessIdentity.of(p.pid) for p in processes_of(run_dir) if p.pid != proc.pid]
        launcher = [i for i in launcher if i is not None]
        assert launcher, "the launch process"
        proc.send_signal(signal.SIGKILL)  # the supervisor alone, not its session
        proc.communicate(timeout=30)
        killed_at = time.monotonic()
        wait_for(lambda: not any(i.alive() for i in launcher), 5, "the launcher to exit with its supervisor")
        print(f"\nthe waiting launcher was gone {time.monotonic() - killed_at:.2f} s after the "
              f"supervisor's SIGKILL")
        assert_no_leftovers(run_dir, timeout=5)
    finally:
        kill_node(run_dir)
        if proc.returncode is None:
            proc.kill()
            proc.communicate(timeout=30)
