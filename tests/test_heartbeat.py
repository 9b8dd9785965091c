"""Heartbeats with real files, real writer processes and real SIGSTOP/SIGCONT."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from paddlerun.trainer.rundir.heartbeat import (
    SUPERVISOR_GONE_EXIT_CODE,
    Heartbeat,
    HeartbeatWriter,
    clear_heartbeats,
    heartbeat_path,
    lowest_live_rank,
    read_heartbeats,
    stale_ranks,
)
from paddlerun.trainer.rundir.process_identity import ProcessIdentity

INTERVAL = 0.1
HANG = 1.0

# A worker's heartbeat use: modes "loop" (a step every 20 ms), "block" (one step,
# then the main thread blocks -- like a collective waiting for a dead peer -- while
# the thread keeps beating), "slow:P" (a step every P seconds).
WRITER = r"""
import sys, time
from paddlerun.trainer.rundir.heartbeat import HeartbeatWriter
directory, mode, interval = sys.argv[1], sys.argv[2], float(sys.argv[3])
hb = HeartbeatWriter(directory, rank=0, interval_s=interval, attempt=1).start()
deadline = time.monotonic() + 30   # never outlive a broken test by much
step = 0
if mode == "block":
    hb.beat(5)
    time.sleep(30)
while time.monotonic() < deadline:
    step += 1
    hb.beat(step)
    time.sleep(float(mode.split(":")[1]) if mode.startswith("slow:") else 0.02)
"""


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.01):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def check(directory, hang_timeout_s=HANG):
    """What the supervisor does each tick: ``now`` first, then read, then decide."""
    now = time.time()
    beats = read_heartbeats(directory)
    return beats, stale_ranks(beats, now, hang_timeout_s)


@pytest.fixture
def writer_process(tmp_path):
    procs = []

    def start(mode: str, interval_s: float = INTERVAL):
        directory = tmp_path / "heartbeats"
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(directory), mode,
                                 str(interval_s)])
        procs.append(proc)
        wait_for(lambda: 0 in read_heartbeats(directory), 10.0, "the first heartbeat")
        return proc, directory

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait(timeout=5)
    assert not psutil.Process().children(recursive=True)


def test_sigstopped_writer_goes_stale_and_sigcont_revives_it(writer_process):
    proc, directory = writer_process("loop")
    wait_for(lambda: read_heartbeats(directory)[0].step >= 3, 5.0, "a few steps")
    beats, stale = check(directory)
    assert stale == {}
    assert beats[0].pid == proc.pid and beats[0].attempt == 1 and beats[0].phase == "train"
    assert beats[0].identity == ProcessIdentity.of(proc.pid)

    proc.send_signal(signal.SIGSTOP)
    t_stop = time.time()
    # The last write happened before t_stop: by t_stop + HANG + 2 intervals it is stale.
    time.sleep(HANG + 2 * INTERVAL)
    beats, stale = check(directory)
    assert list(stale) == [0], (beats, stale)
    assert stale[0].startswith("no heartbeat for ")
    assert f"(pid {proc.pid} on " in stale[0]
    assert beats[0].time <= t_stop

    proc.send_signal(signal.SIGCONT)
    t_cont = time.time()
    wait_for(lambda: check(directory)[1] == {}, 2 * INTERVAL + 2.0, "fresh after SIGCONT")
    assert time.time() - t_cont < 2 * INTERVAL + 2.0


def test_blocked_main_thread_goes_stale_by_progress(writer_process):
    proc, directory = writer_process("block")
    first = wait_for(lambda: read_heartbeats(directory)[0].phase == "train"
                     and read_heartbeats(directory)[0], 5.0, "the step-5 heartbeat")
    assert first.step == 5
    # Wait until the main thread has been stuck for longer than the timeout.
    time.sleep(max(0.0, first.step_time + HANG + 2 * INTERVAL - time.time()))
    beats, stale = check(directory)
    assert list(stale) == [0], (beats, stale)
    assert stale[0].startswith("no progress for ")
    assert "at step 5, phase train" in stale[0]
    # The thread is still beating: the file itself is fresh.
    assert time.time() - beats[0].time < HANG


def test_slow_but_progressing_loop_never_goes_stale(writer_process):
    # Steps 4x the heartbeat interval apart, and 5x inside the hang timeout (a step late by
    # more than 1.6 s on a loaded machine would be needed to fail it); watched for 2.5 hang
    # timeouts, so a rule that ignored the progress would call it stale.
    hang, step = 2.0, 0.4
    proc, directory = writer_process(f"slow:{step}")
    steps = set()
    deadline = time.monotonic() + 2.5 * hang
    while time.monotonic() < deadline:
        beats, stale = check(directory, hang_timeout_s=hang)
        assert stale == {}, stale
        steps.add(beats[0].step)
        time.sleep(0.03)
    assert len(steps) >= 5  # it did progress, slowly: ~12 steps


def test_concurrent_reader_never_sees_a_partial_file(writer_process):
    proc, directory = writer_process("loop", interval_s=0.0005)
    path = heartbeat_path(directory, 0)
    times = set()
    for _ in range(500):
        with open(path, "rb") as f:  # the path always exists: os.replace, never unlink
            data = json.loads(f.read())
        Heartbeat.from_dict(data)
        times.add(data["time"])
        assert 0 in read_heartbeats(directory)
    assert len(times) > 20  # the file really was being replaced while we read
    leftovers = [p.name for p in directory.iterdir() if p.name != "rank-0.json"]
    assert all(name.startswith(".rank-0.json.") for name in leftovers)


def test_writer_in_process_lifecycle(tmp_path):
    directory = tmp_path / "hb"
    writer = HeartbeatWriter(directory, rank=3, interval_s=0.05, attempt=2)
    with writer:
        first = read_heartbeats(directory)[3]  # written by start(), before any interval
        assert (first.rank, first.attempt, first.phase, first.step) == (3, 2, "init", 0)
        assert first.pid == os.getpid()
        writer.beat(7)
        writer.set_phase("checkpoint")
        wait_for(lambda: read_heartbeats(directory)[3].phase == "checkpoint", 2.0, "phase")
        assert read_heartbeats(directory)[3].step == 7
        with pytest.raises(ValueError, match="'bogus'"):
            writer.beat(8, "bogus")
        with pytest.raises(ValueError, match="'bogus'"):
            writer.set_phase("bogus")
        # The directory vanishing under a running writer does not kill its thread.
        shutil.rmtree(directory)
        wait_for(lambda: 3 in read_heartbeats(directory), 2.0, "heartbeat rewritten")
    assert not writer._thread.is_alive()
    last = read_heartbeats(directory)[3]
    assert last.phase == "done" and last.step == 7
    # A finished rank is never stale, however old its file.
    assert stale_ranks({3: last}, last.time + 1000.0, HANG) == {}
    time.sleep(0.15)
    assert read_heartbeats(directory)[3] == last  # nothing writes after stop()


def test_read_heartbeats_skips_invalid_files(tmp_path):
    directory = tmp_path / "hb"
    assert read_heartbeats(directory) == {}  # no directory yet
    HeartbeatWriter(directory, rank=0, interval_s=1.0, attempt=4).start().stop()
    good = json.loads(heartbeat_path(directory, 0).read_text())
    (directory / "rank-1.json").write_text('{"rank": 1, "pid": 12')          # torn
    (directory / "rank-2.json").write_text(json.dumps({"rank": 2}))          # fields missing
    (directory / "rank-3.json").write_text(json.dumps({**good, "rank": 7}))  # wrong file
    (directory / "rank-5.json").write_text(json.dumps({**good, "rank": 5, "phase": "nap"}))
    (directory / "rank-6.json").write_text(json.dumps({**good, "rank": 6, "step": "six"}))
    (directory / "rank-8.json").write_text(json.dumps([1, 2, 3]))
    (directory / "rank-9.json").write_bytes(b"\xff\xfe")
    (directory / "rank-x.json").write_text(json.dumps(good))
    (directory / "rank-4.json").mkdir()
    (directory / ".rank-0.json.999.tmp").write_text(json.dumps(good))
    (directory / "notes.txt").write_text("keep me")
    (directory / "rank-10.json").write_text(json.dumps({**good, "rank": 10, "attempt": 3}))

    assert sorted(read_heartbeats(directory)) == [0, 10]
    assert sorted(read_heartbeats(directory, attempt=4)) == [0]

    clear_heartbeats(directory)
    assert sorted(p.name for p in directory.iterdir()) == ["notes.txt", "rank-4.json"]
    assert read_heartbeats(directory) == {}
    clear_heartbeats(tmp_path / "new")  # creates the directory
    assert (tmp_path / "new").is_dir()


def _hb(**kw) -> Heartbeat:
    fields = dict(rank=0, pid=123, start_ticks=1, step=40, time=1000.0, step_time=1000.0,
                  attempt=0, host="node1", phase="train")
    fields.update(kw)
    return Heartbeat(**fields)


def test_stale_rule():
    beats = {
        0: _hb(),                                            # fresh
        1: _hb(rank=1, pid=201, time=987.7, step_time=987.7),  # file old: dead/stopped
        2: _hb(rank=2, pid=202, step_time=939.0),             # thread beats, no progress
        3: _hb(rank=3, phase="init", step=0, step_time=900.0),
        4: _hb(rank=4, phase="done", time=10.0, step_time=10.0),
        5: _hb(rank=5, time=1005.0, step_time=1005.0),        # clock ahead: not stale
    }
    stale = stale_ranks(beats, now=1000.0, hang_timeout_s=10.0)
    assert sorted(stale) == [1, 2, 3]
    assert stale[1].startswith("no heartbeat for 12.3 s at step 40, phase train "
                               "(pid 201 on node1)")
    assert stale[2].startswith("no progress for 61.0 s at step 40, phase train "
                               "(pid 202 on node1)")
    assert stale[3].startswith("no progress for 100.0 s at step 0, phase init")
    # A longer timeout for one phase only.
    relaxed = stale_ranks(beats, now=1000.0, hang_timeout_s=10.0,
                          phase_timeouts={"init": 300.0})
    assert sorted(relaxed) == [1, 2]


def test_lowest_live_rank(tmp_path):
    directory = tmp_path / "hb"
    HeartbeatWriter(directory, rank=2, interval_s=1.0, attempt=1).start().stop("train")
    me = read_heartbeats(directory)[2]
    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        peer_ticks = ProcessIdentity.of(peer.pid).start_ticks

        def put(rank, **kw):
            fields = {**me.__dict__, "rank": rank, **kw}
            heartbeat_path(directory, rank).write_text(json.dumps(fields))

        assert lowest_live_rank(directory, 2) == 2
        put(1, pid=peer.pid, start_ticks=peer_ticks)          # a live peer on this host
        assert lowest_live_rank(directory, 2) == 1
        put(0, pid=peer.pid, start_ticks=peer_ticks + 3)      # pid reused: not rank 0's
        assert lowest_live_rank(directory, 2) == 1
        put(0, pid=peer.pid, start_ticks=peer_ticks, phase="done")
        assert lowest_live_rank(directory, 2) == 1
        put(0, pid=peer.pid, start_ticks=peer_ticks, attempt=0)  # an older attempt's file
        assert lowest_live_rank(directory, 2) == 1
        put(0, host="elsewhere", time=time.time())           # remote: fresh file counts
        assert lowest_live_rank(directory, 2) == 0
        put(0, host="elsewhere", time=time.time() - 60)
        assert lowest_live_rank(directory, 2) == 1
        peer.kill()
        peer.wait(timeout=5)                                 # rank 1 died
        assert lowest_live_rank(directory, 2) == 2
        assert lowest_live_rank(tmp_path / "missing", 3) == 3
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait(timeout=5)


def test_writer_rejects_bad_interval(tmp_path):
    with pytest.raises(ValueError, match="interval_s"):
        HeartbeatWriter(tmp_path, rank=0, interval_s=0)


def test_a_writer_whose_supervisor_is_gone_exits_its_process(tmp_path):
    """The worker side of a SIGKILLed supervisor: its heartbeat thread ends the process."""
    supervisor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    identity = ProcessIdentity.of(supervisor.pid)
    worker = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from paddlerun.trainer.rundir.heartbeat import HeartbeatWriter\n"
         "from paddlerun.trainer.rundir.process_identity import ProcessIdentity\n"
         f"HeartbeatWriter(sys.argv[1], 0, 0.1, supervisor=ProcessIdentity.parse({str(identity)!r})).start()\n"
         "print('training', flush=True)\n"
         "while True: time.sleep(0.01)  # the main thread never looks\n",
         str(tmp_path / "hb")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "training"
        time.sleep(0.5)
        assert worker.poll() is None, "its supervisor lives: it trains on"
        supervisor.kill()
        supervisor.wait(timeout=10)
        assert worker.wait(timeout=10) == SUPERVISOR_GONE_EXIT_CODE
        assert f"its supervisor, pid {supervisor.pid}, is gone" in worker.stderr.read()
    finally:
        for proc in (worker, supervisor):
            proc.kill()
            proc.wait(timeout=10)
