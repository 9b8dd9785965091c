"""SIGTERM while no worker has trained since the newest snapshot: exit 75 at once, not after the grace.

Start-up (before any heartbeat), a backoff between attempts, and a node whose rendezvous
waits for a peer that never comes: a snapshot would save nothing, so the supervisor stops
everything and exits with the requeue code. The grace period is 300 s here: only the fast
path can pass the (generous) 10 s bound. The measured times are printed; the goal (<= 2 s)
is for the report, not for an assertion on a shared machine.
"""
import os
import signal
import time

import pytest

from helpers import assert_no_leftovers, events, free_port, heartbeat, killed_on_error, start, wait, wait_for
from paddlerun.launcher.exit_codes import REQUEUE

pytestmark = pytest.mark.slow

GRACE = "supervisor.preempt_grace_s=300"
BOUND_S = 10.0


def event_seen(run_dir, name: str, **fields):
    return next((e for e in events(run_dir) if e["event"] == name
                 and all(e.get(k) == v for k, v in fields.items())), None)


def sigterm_and_time(proc, run_dir, what: str) -> float:
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out = wait(proc, timeout=120)
    took = time.monotonic() - sent
    print(f"\nSIGTERM during {what}: exit {proc.returncode} after {took:.2f} s")
    assert proc.returncode == REQUEUE, out[-5000:]
    preempted = event_seen(run_dir, "preempted")
    assert preempted is not None, out[-5000:]
    assert_no_leftovers(run_dir)
    return took


def test_sigterm_during_start_up_exits_75_at_once(tmp_path):
    proc = start(tmp_path, GRACE, "train.max_steps=40")
    with killed_on_error(proc):
        wait_for(lambda: event_seen(tmp_path, "started"), 60, "the first attempt to start")
        took = sigterm_and_time(proc, tmp_path, "start-up (before any heartbeat)")
    assert took < BOUND_S
    assert event_seen(tmp_path, "preempted")["how"].startswith("nothing to save")


def test_sigterm_during_backoff_exits_75_at_once(tmp_path):
    # A worker killed before its first step: the restart waits backoff_s (60 s here).
    proc = start(tmp_path, GRACE, "train.max_steps=40", "supervisor.backoff_s=60",
                 "supervisor.backoff_max_s=60")
    with killed_on_error(proc):
        hb = wait_for(lambda: heartbeat(tmp_path, 1), 120, "rank 1's heartbeat")
        os.kill(hb["pid"], signal.SIGKILL)
        wait_for(lambda: event_seen(tmp_path, "restarting"), 60, "the restart's backoff")
        took = sigterm_and_time(proc, tmp_path, "backoff")
    assert took < BOUND_S
    assert event_seen(tmp_path, "preempted", during="backoff")


def test_sigterm_while_a_rendezvous_waits_for_a_missing_peer_exits_75_at_once(tmp_path):
    """Node 0 of 2; node 1 never starts: paddle's launcher waits for it forever."""
    proc = start(tmp_path, GRACE, "train.max_steps=40", "launch.nnodes=2", "launch.node_rank=0",
                 f"launch.master=127.0.0.1:{free_port()}", "launch.nproc_per_node=1")
    with killed_on_error(proc):
        wait_for(lambda: event_seen(tmp_path, "started"), 60, "the first attempt to start")
        time.sleep(3)  # the launcher is in its rendezvous now
        took = sigterm_and_time(proc, tmp_path, "a 2-node rendezvous without its peer")
    assert took < BOUND_S
    assert event_seen(tmp_path, "preempted")["how"].startswith("nothing to save")
