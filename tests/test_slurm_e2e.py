"""2-node jobs (1 worker per node) on a real Slurm cluster of two slurmd on this machine
(tests/slurm_cluster.py), submitted with ``paddlerun slurm submit`` and ended early in
every way Slurm ends a job. Each ends with the digest of an uninterrupted run of the
same world size, the job COMPLETED and no process left on either node.

Skipped where Slurm is not installed or the tests do not run as root (the daemons do).
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import FAST, REPO, assert_no_leftovers, events, heartbeat, run, summary, wait_for
from slurm_cluster import SlurmCluster, missing_programs

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

if os.geteuid() != 0:
    pytestmark.append(pytest.mark.skip(reason="the Slurm tests start munged and slurmd: run as root"))
elif missing_programs():
    pytestmark.append(pytest.mark.skip(
        reason=f"Slurm is not installed ({', '.join(missing_programs())} missing): apt-get install "
               f"slurmctld slurmd slurm-client munge"))

STEPS = "train.max_steps=60"
ONE_PER_NODE = "launch.nproc_per_node=1"
JOB_TIMEOUT_S = 240


@pytest.fixture(scope="session")
def slurm():
    cluster = SlurmCluster.start(cred_expire_s=5)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def reference_digest(tmp_path_factory):
    """One node of two workers trains exactly like two nodes of one (test_multinode_e2e)."""
    run_dir = tmp_path_factory.mktemp("reference")
    assert run(run_dir, STEPS, "launch.nproc_per_node=2").returncode == 0
    return summary(run_dir)["digest"]


def submit(slurm, run_dir: Path, *sets: str, sbatch=(), env=None) -> str:
    argv = [sys.executable, "-m", "paddlerun.launcher.cli", "slurm", "submit", str(REPO / "configs" /
            "mnist_lenet.yaml"), "--nodes", "2", "--run-dir", str(run_dir)]
    for item in (*FAST, STEPS, ONE_PER_NODE, *sets):
        argv += ["--set", item]
    if sbatch:
        argv += ["--", *sbatch]
    out = subprocess.run(argv, env={**slurm.env, **(env or {})}, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()[-1]


def wait_gone(slurm, job: str, timeout=JOB_TIMEOUT_S) -> dict:
    wait_for(lambda: job not in slurm.jobs(), timeout, f"Slurm job {job} to end")
    return slurm.job(job)


def output(run_dir: Path, job: str) -> str:
    path = run_dir / f"slurm-{job}.out"
    return path.read_text(errors="replace") if path.exists() else "(no output)"


def step_of_rank(run_dir: Path, rank: int) -> int:
    return (heartbeat(run_dir, rank) or {}).get("step", 0)


def started(slurm, job: str, run_dir: Path, restart_count: int, min_step: int = 10) -> None:
    """Until start ``restart_count`` of ``job`` trains on both nodes past ``min_step``
    (each supervisor clears its ranks' heartbeats before its ``started`` event)."""
    def training():
        nodes = {e.get("node") for e in events(run_dir) if e.get("event") == "started"
                 and e.get("slurm_restart_count") == restart_count}
        return nodes == {0, 1} and slurm.job(job).get("JobState") == "RUNNING" and \
            all(step_of_rank(run_dir, r) >= min_step for r in (0, 1))
    wait_for(training, JOB_TIMEOUT_S, f"start {restart_count} of job {job} to pass step {min_step}",
             interval=0.1)


def assert_finished_like_reference(slurm, job: str, run_dir: Path, reference: str, restarts: int):
    info = wait_gone(slurm, job)
    log = output(run_dir, job)
    assert info.get("JobState") == "COMPLETED", (info, log[-4000:])
    assert info.get("Restarts") == str(restarts), (info, log[-4000:])
    assert summary(run_dir)["digest"] == reference, log[-4000:]
    assert summary(run_dir)["global_steps"] == 60
    assert slurm.job_processes() == []
    assert_no_leftovers(run_dir)


def stop_events(run_dir: Path, job: str):
    return [e for e in events(run_dir) if e.get("event") in ("preempt_requested", "preempted")
            and e.get("slurm_job_id") == int(job)]


def test_a_finished_job_completes_once_and_never_requeues(slurm, reference_digest, tmp_path):
    job = submit(slurm, tmp_path)
    assert_finished_like_reference(slurm, job, tmp_path, reference_digest, restarts=0)
    assert "requeue job" not in output(tmp_path, job)
    ended = [(e["srun_exit"], e["requeue"]) for e in events(tmp_path) if e["event"] == "slurm_ended"]
    assert ended == [(0, "no")]
    # One run directory: both nodes' supervisors wrote into it, each its own files.
    assert (tmp_path / "logs" / "attempt-0" / "workerlog.0").is_file()
    assert (tmp_path / "nodes" / "node-1" / "logs" / "attempt-0" / "workerlog.0").is_file()
    assert json.loads((tmp_path / "nodes" / "node-1" / "summary.json").read_text())["status"] == "succeeded"
    final = [(e.get("node"), e["event"]) for e in events(tmp_path) if e["event"] == "succeeded"]
    assert sorted(final) == [(0, "succeeded"), (1, "succeeded")]
    status = subprocess.run([sys.executable, "-m", "paddlerun.launcher.cli", "status", str(tmp_path),
                             "--json"], env=slurm.env, capture_output=True, text=True, timeout=60)
    record = json.loads(status.stdout)["slurm"]
    assert record == {**record, "job_id": int(job), "state": "COMPLETED", "restart_count": 0}


def test_scancel_ends_the_job_for_good(slurm, tmp_path):
    """``scancel`` SIGTERMs the batch shell like a preemption does, but the job is already
    COMPLETING: the script must not requeue it (``scontrol requeue`` would succeed)."""
    job = submit(slurm, tmp_path)
    started(slurm, job, tmp_path, restart_count=0, min_step=5)
    slurm.run("scancel", job)
    info = wait_gone(slurm, job)
    assert (info.get("JobState"), info.get("Restarts")) == ("CANCELLED", "0"), info
    time.sleep(slurm.cred_expire_s + 2)  # a requeued job would be back by now
    assert slurm.job(job).get("JobState") == "CANCELLED" and job not in slurm.jobs()
    # The script, when it lives to decide (KillWait may SIGKILL it first), did not requeue.
    ended = [(e["requeue"], e["why"]) for e in events(tmp_path) if e["event"] == "slurm_ended"]
    assert all(requeue == "no" and "COMPLETING" in why for requeue, why in ended), ended
    assert slurm.job_processes() == []
    assert_no_leftovers(tmp_path)


def test_hard_requeue_then_the_time_limit_warning_resume_from_snapshots(slurm, reference_digest, tmp_path):
    """``scontrol requeue`` (no warning: the job's processes are killed) and then Slurm's
    warning signal to the batch shell (``scancel --batch --signal=USR1``): a snapshot, exit
    75, ``scontrol requeue`` by the script. The third start finishes."""
    job = submit(slurm, tmp_path)
    started(slurm, job, tmp_path, restart_count=0)
    slurm.run("scontrol", "requeue", job)
    started(slurm, job, tmp_path, restart_count=1)
    slurm.run("scancel", "--batch", "--signal=USR1", job)
    assert_finished_like_reference(slurm, job, tmp_path, reference_digest, restarts=2)
    warned = stop_events(tmp_path, job)
    assert {(e.get("node"), e["event"], e["cause"], e["slurm_restart_count"]) for e in warned
            if e["cause"] == "time_limit"} == {(n, ev, "time_limit", 1) for n in (0, 1)
                                               for ev in ("preempt_requested", "preempted")}
    clean = [e for e in warned if e["event"] == "preempted" and e["slurm_restart_count"] == 1]
    assert all(e["clean"] for e in clean), clean
    # srun's own exit may be 143: node 0 exits first, and --kill-on-bad-exit SIGTERMs node 1.
    assert "(asked to stop: time_limit)" in output(tmp_path, job)
    # (A hard requeue SIGTERMs the batch shell too: start 0 looks like a preemption from inside.)
    ended = [(e["slurm_restart_count"], e["cause"], e["requeue"]) for e in events(tmp_path)
             if e["event"] == "slurm_ended" and e["slurm_restart_count"] > 0]
    assert ended == [(1, "time_limit", "yes"), (2, "none", "no")], ended
    # The third start resumed from the snapshot the warning made.
    last_attempt = max((tmp_path / "logs").glob("attempt-*"), key=lambda p: int(p.name.split("-")[1]))
    resumed = [line for line in (last_attempt / "workerlog.0").read_text().splitlines()
               if "resumed from" in line]
    snapshot_steps = [e["step"] for e in events(tmp_path) if e["event"] == "snapshot_committed"
                      and e.get("reason") == "preempted"]
    assert len(resumed) == 1 and snapshot_steps and f"step-{snapshot_steps[-1]:08d}" in resumed[0], \
        (resumed, snapshot_steps)


def test_preemption_term_to_the_steps_then_to_the_whole_job(slurm, reference_digest, tmp_path):
    """First SIGTERM to the job's steps only (``scancel --signal=TERM``: what slurmctld sends
    when it preempts a job with a GraceTime). Every process of the steps gets it: the
    supervisors, Paddle's launchers (which pass one of their own on to their workers) and
    the workers. The supervisors snapshot and exit 75, the script requeues. Then, on the
    next start, ``scancel --full --signal=TERM``: the batch shell and srun get it too, and
    srun answers its own SIGTERM by killing the step at once, so that start ends hard; the
    script requeues and the third start resumes from the newest snapshot."""
    job = submit(slurm, tmp_path)
    started(slurm, job, tmp_path, restart_count=0)
    slurm.run("scancel", "--signal=TERM", job)
    started(slurm, job, tmp_path, restart_count=1, min_step=0)
    snapshots = [e["step"] for e in events(tmp_path) if e["event"] == "snapshot_committed"
                 and e.get("reason") == "preempted"]
    assert len(snapshots) == 1, snapshots
    wait_for(lambda: all(step_of_rank(tmp_path, r) > snapshots[0] + 5 for r in (0, 1)), JOB_TIMEOUT_S,
             "start 1 to train on")
    resumed = [line for line in (tmp_path / "logs" / "attempt-1" / "workerlog.0").read_text().splitlines()
               if "resumed from" in line]
    assert len(resumed) == 1 and f"step-{snapshots[0]:08d}" in resumed[0], (resumed, snapshots)
    slurm.run("scancel", "--full", "--signal=TERM", job)
    assert_finished_like_reference(slurm, job, tmp_path, reference_digest, restarts=2)
    first = {(e.get("node"), e["event"], e["cause"], e.get("clean", True)) for e in stop_events(tmp_path, job)
             if e["slurm_restart_count"] == 0}
    assert first == {(n, ev, "preemption", True) for n in (0, 1) for ev in ("preempt_requested", "preempted")}
    # On the second start the supervisors may be killed before they write a word; the
    # batch shell is not.
    told = [(e["event"], e["cause"], e["slurm_restart_count"]) for e in events(tmp_path)
            if e["event"] in ("slurm_signal", "slurm_ended") and e.get("slurm_job_id") == int(job)]
    assert told == [("slurm_ended", "preemption", 0), ("slurm_signal", "preemption", 1),
                    ("slurm_ended", "preemption", 1), ("slurm_ended", "none", 2)], told
    assert "asked to stop: preemption" in output(tmp_path, job)


def test_a_real_time_limit_warning_requeues_and_resumes(slurm, reference_digest, tmp_path):
    """``--time=1`` and ``--signal=B:USR1@30``: Slurm itself warns the batch shell 30-60 s
    before the limit, that is at its first time-limit check after the start: slurmctld
    checks every 30 s from its own start. The job is submitted 3-8 s before a check, so
    that the warning comes while it starts (the supervisors see the notice at once and the
    workers stop at their first step of agreement): on an idle machine the whole job takes
    ~20 s, and a warning 15-25 s after the start came too late (seen). Once the first start
    has stopped, the test lifts the limit so that the second start (which keeps --time=1)
    is not warned in turn."""
    wait_for(lambda: 22 <= (time.time() - slurm.ctld_started) % 30 <= 27, 31,
             "3-8 s before slurmctld's next time-limit check", interval=0.2)
    job = submit(slurm, tmp_path, sbatch=["--time=1"])
    assert "#SBATCH --signal=B:USR1@30" in (tmp_path / "slurm-job.sh").read_text()

    def warned_and_stopped():
        return any(e["event"] == "preempted" and e.get("node") == 0 for e in stop_events(tmp_path, job))
    wait_for(warned_and_stopped, 120, "the time-limit warning to stop node 0", interval=0.2)
    slurm.run("scontrol", "update", f"JobId={job}", "TimeLimit=10")
    assert_finished_like_reference(slurm, job, tmp_path, reference_digest, restarts=1)
    told = [(e["cause"], e["signal"]) for e in events(tmp_path) if e["event"] == "slurm_signal"]
    assert told == [("time_limit", "SIGUSR1")]
    first = [e for e in stop_events(tmp_path, job) if e["slurm_restart_count"] == 0]
    assert {(e.get("node"), e["event"], e["cause"], e["signal"]) for e in first} == \
        {(n, ev, "time_limit", "SIGUSR1") for n in (0, 1) for ev in ("preempt_requested", "preempted")}


def test_workers_that_always_fail_stop_the_job_without_requeue(slurm, tmp_path):
    """The supervisors spend the restart budget and give up: the script does not requeue,
    and the job ends FAILED after one start. (A start that finds the budget spent by
    earlier ones gives up at once: test_slurm_parts.)"""
    job = submit(slurm, tmp_path, "train.dataset=broken_factories:unreachable_dataset",
                 "supervisor.max_restarts=1", env={"PYTHONPATH": str(REPO / "tests")})
    info = wait_gone(slurm, job)
    log = output(tmp_path, job)
    assert info.get("JobState") == "FAILED" and info.get("Restarts") == "0", (info, log[-4000:])
    assert "requeue job" not in log, log[-3000:]
    # The first node to give up has srun SIGTERM the other: the script goes by the events.
    assert [e.get("node") for e in events(tmp_path) if e["event"] == "gave_up"]
    ended = [(e["requeue"], e["why"]) for e in events(tmp_path) if e["event"] == "slurm_ended"]
    assert ended == [("no", "a supervisor gave up")]
    assert slurm.job_processes() == []
    assert_no_leftovers(tmp_path)
