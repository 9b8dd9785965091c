"""ProcessIdentity: one process for as long as it lives, whatever the wall clock does.

A stepped clock (an NTP or chrony step) is simulated with a copy of /proc whose
``/proc/stat`` says the machine booted an hour earlier or later -- which is exactly what
the kernel reports after such a step: ``btime`` is the wall clock minus the time since
boot. psutil's ``create_time()`` (btime + start ticks) moves with it; start ticks do not.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from paddlerun.launcher.exit_watch import ExitWatch
from paddlerun.launcher.process_tree import ProcessTree, signal_processes
from paddlerun.launcher.status_cmd import rank_status
from paddlerun.launcher.supervisor import dead_ranks
from paddlerun.trainer.rundir.heartbeat import HeartbeatWriter, heartbeat_path, lowest_live_rank, read_heartbeats
from paddlerun.trainer.rundir.process_identity import ProcessIdentity


def sleeper(seconds: float = 60) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])


@pytest.fixture
def stepped_clock(tmp_path, monkeypatch):
    """``step(seconds)``: from now on the machine's clock reads ``seconds`` later (or earlier).

    A copy of /proc for psutil (psutil.PROCFS_PATH): every entry links to the real one except
    ``stat``, whose ``btime`` is moved. ProcessIdentity reads the real /proc/PID/stat, which a
    clock step does not change either.
    """
    fake = tmp_path / "proc"
    fake.mkdir()
    for name in os.listdir("/proc"):
        if name != "stat":
            (fake / name).symlink_to(f"/proc/{name}")
    real = Path("/proc/stat").read_text()
    btime = int(re.search(r"^btime (\d+)$", real, re.M).group(1))

    def step(seconds: int) -> None:
        # New processes appear in the copy too: link them (the test's own children).
        for name in os.listdir("/proc"):
            if name.isdigit() and not (fake / name).is_symlink():
                (fake / name).symlink_to(f"/proc/{name}")
        (fake / "stat").write_text(re.sub(r"^btime \d+$", f"btime {btime + seconds}", real, flags=re.M))

    step(0)
    monkeypatch.setattr(psutil, "PROCFS_PATH", str(fake))
    return step


@pytest.mark.parametrize("seconds", [3600, -3600, 1])
def test_a_stepped_clock_leaves_every_process_the_same_one(tmp_path, stepped_clock, seconds):
    peer = sleeper()
    stepped_clock(0)  # link the new process into the copy of /proc
    try:
        hb_dir = tmp_path / "heartbeats"
        HeartbeatWriter(hb_dir, rank=0, interval_s=1.0, attempt=1).start().stop("train")
        me = read_heartbeats(hb_dir)[0]
        heartbeat_path(hb_dir, 1).write_text(heartbeat_path(hb_dir, 0).read_text().replace(
            f'"rank": 0, "pid": {me.pid}, "start_ticks": {me.start_ticks}',
            f'"rank": 1, "pid": {peer.pid}, "start_ticks": {ProcessIdentity.of(peer.pid).start_ticks}'))
        beats = read_heartbeats(hb_dir)
        assert sorted(beats) == [0, 1]
        created_before = psutil.Process(peer.pid).create_time()

        stepped_clock(seconds)

        # What made the old 10 ms create-time comparisons call every worker "pid reused":
        assert abs(psutil.Process(peer.pid).create_time() - created_before - seconds) < 0.01
        # ... and what each of those places says now.
        assert dead_ranks(beats) == {}, "the supervisor sees no dead worker"
        assert lowest_live_rank(hb_dir, my_rank=1) == 0, "a survivor counts rank 0 alive"
        assert rank_status(beats[1], time.time())["alive"] is True, "paddlerun status"
        assert beats[1].identity.alive() and ProcessIdentity.of(peer.pid) == beats[1].identity
    finally:
        peer.kill()
        peer.wait(timeout=10)


def test_a_stepped_clock_keeps_a_tree_s_members_and_exit_watch(tmp_path, stepped_clock):
    tree = ProcessTree([sys.executable, "-c", "import time; time.sleep(60)"], env=dict(os.environ))
    stray = sleeper()
    watch = ExitWatch(fallback_s=0.1)
    try:
        tree.start()
        stepped_clock(0)  # link the new processes into psutil's copy of /proc
        tree.add_known(ProcessIdentity.of(stray.pid))
        before = tree.members()
        assert [m.pid for m in before] == sorted([tree.pid, stray.pid], key=lambda p: (p != tree.pid, p))
        stepped_clock(-7200)
        assert tree.members() == before, "nobody looks like a reused pid after the step"
        watch.watch(ProcessIdentity.of(stray.pid))
        stray.kill()
        assert watch.sleep(30) is True, "the exit of a process watched after the step wakes it"
        assert tree.members() == before[:1], "a killed member is dead, even after the step"
        report = tree.close(term_timeout_s=2.0)
        assert [(r["pid"], r["how"]) for r in report] == [(tree.pid, "SIGTERM")]
    finally:
        watch.close()
        tree.close(term_timeout_s=0.5)
        stray.kill()
        stray.wait(timeout=10)


def test_identity_tells_a_zombie_and_a_reused_pid_from_the_process():
    proc = sleeper()
    me = ProcessIdentity.of(proc.pid)
    assert me.alive() and me.exists() and me.parent() == os.getpid()
    other = ProcessIdentity(proc.pid, me.start_ticks + 1)  # the same pid, another start: reused
    assert not other.alive() and not other.exists() and other.parent() is None
    assert other.send_signal(signal.SIGKILL) is False and proc.poll() is None, "never signalled"
    assert str(me) == f"{proc.pid}:{me.start_ticks}" and ProcessIdentity.parse(str(me)) == me
    assert me.send_signal(signal.SIGKILL) is True
    deadline = time.monotonic() + 10
    while me.alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not me.alive() and me.exists(), "a zombie until reaped: dead, still in the table"
    proc.wait(timeout=10)
    assert not me.exists() and ProcessIdentity.of(proc.pid) is None
    assert me.send_signal(signal.SIGTERM) is False


@pytest.mark.parametrize("text", ["", "12", "x:1", "0:5", "12:-1"])
def test_parse_refuses_what_is_not_an_identity(text):
    with pytest.raises(ValueError):
        ProcessIdentity.parse(text)


def test_a_held_handle_signals_its_process_or_none():
    """SIGTERM then SIGCONT through one pidfd: both reach the process that was meant."""
    proc = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\n"
                             "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\n"
                             "print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        os.kill(proc.pid, signal.SIGSTOP)
        signal_processes([ProcessIdentity.of(proc.pid)], signal.SIGTERM, signal.SIGCONT)
        assert proc.wait(timeout=10) == 7, "SIGCONT woke it to handle its SIGTERM"
    finally:
        proc.kill()
        proc.wait(timeout=10)
