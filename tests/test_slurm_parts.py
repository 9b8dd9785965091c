"""The Slurm pieces that need no cluster: the place from SLURM_*, the batch script, the
stop notice and the restart budget counted over requeues (cluster/)."""
import json
import subprocess
import sys

import pytest

from paddlerun.cluster.slurm import PORT_BASE, PORT_SPAN, SlurmError, place_from_environ
from paddlerun.cluster.slurm_end import decide
from paddlerun.cluster.slurm_job import NOTICE_FILE, SlurmJob
from paddlerun.cluster.slurm_script import BatchJob, render, warning_seconds
from paddlerun.launcher.restart_policy import RestartPolicy
from paddlerun.trainer.rundir.config import SupervisorConfig

from helpers import CONFIG, REPO


def test_a_step_task_finds_its_node_rank_and_node_count():
    env = {"SLURM_JOB_ID": "41", "SLURM_NODEID": "1", "SLURM_STEP_NUM_NODES": "2",
           "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_RESTART_COUNT": "2"}
    place = place_from_environ(env)
    assert (place.job_id, place.node_rank, place.nnodes, place.nodelist, place.restart_count) == \
        (41, 1, 2, "n[1-2]", 2)
    assert PORT_BASE <= place.master_port < PORT_BASE + PORT_SPAN
    # Every node computes the same port; a requeued start gets another one.
    assert place_from_environ({**env, "SLURM_NODEID": "0"}).master_port == place.master_port
    assert place_from_environ({**env, "SLURM_RESTART_COUNT": "3"}).master_port != place.master_port


def test_outside_a_step_a_run_is_one_node_and_outside_a_job_there_is_no_place():
    # An salloc or batch shell: SLURM_JOB_ID but no step variables; SLURM_RESTART_COUNT unset
    # on a first start.
    place = place_from_environ({"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NODEID": "0"})
    assert (place.nnodes, place.node_rank, place.restart_count) == (1, 0, 0)
    assert place_from_environ({"HOME": "/root"}) is None
    with pytest.raises(SlurmError, match="not a number"):
        place_from_environ({"SLURM_JOB_ID": "abc"})


def job(tmp_path, restart_count=1, node_rank=0, multi_node=True):
    place = place_from_environ({"SLURM_JOB_ID": "5", "SLURM_RESTART_COUNT": str(restart_count),
                                "SLURM_NODEID": str(node_rank), "SLURM_STEP_NUM_NODES": "2",
                                "SLURM_STEP_NODELIST": "n[1-2]"})
    return SlurmJob(place, tmp_path, node_rank, multi_node, grace_s=1)


def event(name, count, node=0, job_id=5, **details):
    return {"event": name, "time": 1.0, "attempt": 0, "slurm_job_id": job_id,
            "slurm_restart_count": count, "node": node, **details}


def test_the_restart_budget_counts_failures_and_lost_starts_of_earlier_starts(tmp_path):
    failed = dict(kind="worker_exit", cause="exit code 1", retriable=True, progressed=True)
    history = [
        event("started", 0), event("worker_failed", 0, **failed), event("restarting", 0),
        event("started", 0), event("preempt_requested", 0), event("preempted", 0),  # a snapshot: free
        event("started", 1),                                                         # lost: counts
        event("started", 2), event("worker_failed", 2, node=1, **failed),            # another node
        event("started", 2, job_id=6), event("worker_failed", 2, job_id=6, **failed),  # another job
        event("started", 3),                                                          # this start
    ]
    failures = job(tmp_path, restart_count=3).earlier_failures(history)
    assert [f.kind for f in failures] == ["worker_exit", "job_lost", "job_lost"]
    # A start the batch shell was told to stop (preemption, time limit) is no failure, even
    # when srun killed the step before the supervisor could write its last word.
    told = {"event": "slurm_signal", "time": 1.0, "attempt": None, "slurm_job_id": 5,
            "slurm_restart_count": 1, "cause": "preemption"}
    assert [f.kind for f in job(tmp_path, restart_count=3).earlier_failures([*history, told])] == \
        ["worker_exit", "job_lost"]
    assert "start 1 of Slurm job 5" in failures[1].cause
    # With max_restarts=2, the next failure of this start spends the budget.
    policy = RestartPolicy(SupervisorConfig(max_restarts=2, max_failures_in_window=99))
    assert not policy.decide([*failures, failures[0]], now=2.0).restart
    assert job(tmp_path, restart_count=0).earlier_failures(history) == []


def test_the_notice_of_another_job_or_start_is_ignored(tmp_path):
    path = tmp_path / NOTICE_FILE
    path.parent.mkdir()
    slurm_job = job(tmp_path, restart_count=1)
    assert slurm_job.notice() is None
    for stale in ({"job_id": 5, "restart_count": 0}, {"job_id": 4, "restart_count": 1}):
        path.write_text(json.dumps({"cause": "time_limit", "signal": "SIGUSR1", **stale}))
        assert slurm_job.notice() is None
    path.write_text(json.dumps({"cause": "time_limit", "signal": "SIGUSR1", "job_id": 5, "restart_count": 1}))
    notice = slurm_job.notice()
    assert (notice.cause, notice.signal) == ("time_limit", "SIGUSR1")
    assert slurm_job.cause_of("SIGTERM") == "preemption" and slurm_job.cause_of("SIGUSR1") == "time_limit"


def test_the_warning_covers_the_grace_or_the_measured_snapshot():
    assert warning_seconds(30, None) == 30
    assert warning_seconds(5, None) == 30          # never inside Slurm's 30 s check period
    assert warning_seconds(60, 12.5) == 60
    assert warning_seconds(30, 95.2) == 106        # slowest snapshot + margin


def test_the_batch_script_is_valid_bash_with_every_directive(tmp_path):
    text = render(BatchJob(config=tmp_path / "c.yaml", run_dir=tmp_path / "run dir", nodes=3,
                           python=sys.executable, job_name="j", warning_s=45, gpus_per_node=8,
                           time="04:00:00", partition="gpu", sets=("train.lr=0.1",),
                           extra_sbatch=("--account=a",)))
    for directive in ("--nodes=3", "--ntasks-per-node=1", "--requeue", "--signal=B:USR1@45",
                      "--open-mode=append", "--time=04:00:00", "--partition=gpu",
                      "--gpus-per-node=8", "--account=a", f"--output={tmp_path}/run dir/slurm-%j.out"):
        assert f"#SBATCH {directive}\n" in text
    assert "srun --kill-on-bad-exit=1 --ntasks-per-node=1" in text
    assert f"--run-dir '{tmp_path}/run dir'" in text and "--set train.lr=0.1" in text
    script = tmp_path / "job.sh"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


def test_script_refuses_a_config_with_its_own_node_count(tmp_path):
    out = subprocess.run([sys.executable, "-m", "paddlerun.launcher.cli", "slurm", "script", CONFIG,
                          "--nodes", "2", "--set", "launch.nnodes=2", "--set", "launch.master=h:1"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "launch.nnodes=2" in out.stderr, out.stderr
    out = subprocess.run([sys.executable, "-m", "paddlerun.launcher.cli", "slurm", "script", CONFIG,
                          "--nodes", "2", "--set", "train.nope=1"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "train.nope" in out.stderr, out.stderr


WORKER_SIGNALS = """
import os, signal, sys, time
from paddlerun.trainer import signals
signals.install_stop_handler()
print("ready", flush=True)
sys.stdin.readline()
print("stop" if signals.stop_signalled() else "no stop", flush=True)
sys.stdin.readline()
"""


def test_a_relayed_sigterm_does_not_kill_a_worker_but_a_later_second_one_does():
    """Slurm signals every process of a step and Paddle's launcher relays its own SIGTERM:
    two within milliseconds are one notice. A second one seconds later still ends it."""
    import signal
    import time
    from paddlerun.trainer.signals import REPEAT_WINDOW_S
    proc = subprocess.Popen([sys.executable, "-c", WORKER_SIGNALS], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "stop"
        assert proc.poll() is None
        time.sleep(REPEAT_WINDOW_S + 0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_the_script_requeues_unless_the_events_say_done_or_given_up():
    def ev(name, node, count=1):
        return {"event": name, "node": node, "slurm_job_id": 5, "slurm_restart_count": count}
    started = [ev("started", 0), ev("started", 1)]
    # One node gave up and srun SIGTERMed the other, which took it for a preemption (75).
    assert decide([*started, ev("gave_up", 0), ev("preempted", 1)], 5, 1, 75) == \
        decide([*started, ev("gave_up", 0)], 5, 1, 143)
    assert not decide([*started, ev("gave_up", 0)], 5, 1, 143).requeue
    assert decide([*started, ev("gave_up", 0)], 5, 1, 143).exit_code == 1
    # Finished on every node: never requeued, whatever srun says.
    assert not decide([*started, ev("succeeded", 0), ev("succeeded", 1)], 5, 1, 143).requeue
    # Events of another start or job do not count.
    assert decide([*started, ev("gave_up", 0, count=0)], 5, 1, 75).requeue
    assert decide([*started], 5, 1, 137).requeue and decide([], 5, 1, 75).requeue
    assert (decide([], 5, 1, 0).requeue, decide([], 5, 1, 2).exit_code) == (False, 2)
    # scancel: the job is COMPLETING when the batch shell gets its SIGTERM; a requeue then
    # would undo the cancel.
    assert not decide([*started], 5, 1, 143, job_state="COMPLETING").requeue
    assert decide([*started], 5, 1, 143, job_state="RUNNING").requeue
