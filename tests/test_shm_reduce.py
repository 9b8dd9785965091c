"""The shared-memory gradient sum with real processes: sums, a dead peer, a stopped peer,
a round interrupted or skipped, ranks out of step, and a stress test of random sums.

Rank 0 runs in the test process, the others in ``shm_peer.py`` subprocesses. The sum with
gloo in real training (bit for bit against DataParallel) is in test_run_e2e.
"""
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import wait_for
from paddlerun.launcher.process_tree import ProcessTree
from paddlerun.trainer import shm_reduce
from paddlerun.trainer.rundir.errors import is_peer_failure
from paddlerun.trainer.shm_reduce import SharedMemorySum

pytestmark = pytest.mark.skipif(shm_reduce.unsupported_reason(3) is not None,
                                reason=str(shm_reduce.unsupported_reason(3)))

from shm_peer import Plan, arrays, run_plan  # tests/ is on sys.path (conftest.py)

PEER = Path(__file__).resolve().parent / "shm_peer.py"
#: A dead peer is seen "at once": well before the 30 s timeout (within POLL_S when idle).
AT_ONCE_S = shm_reduce.TIMEOUT_S / 3


class Job:
    """Rank 0 here, ranks 1.. as subprocesses; every process is reaped on exit."""

    def __init__(self, world: int, out: Path, plan=()):
        """``plan``: (kind, seed, calls) of a shm_peer.Plan the peers sum, else arrays(rank)."""
        self.host_sum = SharedMemorySum.create(world)
        self.peers = [subprocess.Popen(
            [sys.executable, str(PEER), self.host_sum.path, str(rank), str(world),
             self.host_sum.token.hex(), str(out), *map(str, plan)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for rank in range(1, world)]

    def __enter__(self):
        try:
            for peer in self.peers:
                assert said(peer) == "attached"
            self.host_sum.release_path()
            self.host_sum.watch_peers()
            for peer in self.peers:
                peer.stdin.write("go\n")
                peer.stdin.flush()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for peer in self.peers:
            if peer.poll() is None:
                peer.kill()
            peer.wait(timeout=10)
            peer.stdin.close()
            peer.stdout.close()
        self.host_sum.close()


def said(peer: subprocess.Popen, timeout: float = 30) -> str:
    """The peer's next line, or an error after ``timeout``."""
    ready, _, _ = select.select([peer.stdout], [], [], timeout)
    assert ready, f"peer {peer.pid} said nothing for {timeout} s"
    return peer.stdout.readline().strip()


def test_every_rank_gets_the_rank_order_sum_to_the_bit(tmp_path):
    with Job(3, tmp_path) as job:
        mine = arrays(0)
        for array in mine:
            job.host_sum.all_reduce(array)
        for peer in job.peers:
            assert said(peer) == "done"
    inputs = [arrays(rank) for rank in range(3)]
    for i, result in enumerate(mine):
        expected = (inputs[0][i] + inputs[1][i]) + inputs[2][i]
        assert result.dtype == expected.dtype
        assert result.tobytes() == expected.tobytes(), f"array {i}"
        for rank in (1, 2):
            assert np.load(tmp_path / f"rank-{rank}-{i}.npy").tobytes() == expected.tobytes()


def mapped_segments() -> int:
    """How many mappings of a gradient-sum memfd this process has."""
    return Path("/proc/self/maps").read_text().count(f"/memfd:{shm_reduce._MEMFD_NAME}")


def test_the_segment_has_no_name_and_goes_with_its_last_mapping(tmp_path):
    before = mapped_segments()
    with Job(2, tmp_path) as job:
        assert job.host_sum.path.startswith(f"/proc/{os.getpid()}/fd/")
        # rank 0 closed its memfd once every rank had mapped it (the number may be reused)
        assert not os.readlink(job.host_sum.path).startswith("/memfd:") \
            if os.path.exists(job.host_sum.path) else True
        assert mapped_segments() == before + 1  # only the mapping holds it now
        job.host_sum.all_reduce(arrays(0)[0])  # and it still works
    assert mapped_segments() == before, "close() unmaps it: no file, fd or mapping is left"


def test_a_dead_peer_is_raised_at_once_as_a_peer_failure(tmp_path):
    with Job(2, tmp_path) as job:
        peer = job.peers[0]
        job.host_sum.all_reduce(arrays(0)[0])  # the peer's first sum: it is in
        peer.kill()
        peer.wait(timeout=10)
        started = time.monotonic()
        with pytest.raises(RuntimeError, match=r"peer died: rank 1 \(pid \d+\)") as caught:
            for array in arrays(0)[1:]:  # it may have put in one more round before it died
                job.host_sum.all_reduce(array)
        assert time.monotonic() - started < AT_ONCE_S
        assert is_peer_failure(caught.value)


def test_signals_faster_than_the_poll_do_not_hide_a_dead_peer(tmp_path):
    # Every futex wait ends early with EINTR (a Python handler runs every 4 ms).
    previous = signal.signal(signal.SIGALRM, lambda *_: None)
    with Job(2, tmp_path) as job:
        peer = job.peers[0]
        job.host_sum.all_reduce(arrays(0)[0])
        peer.kill()
        peer.wait(timeout=10)
        signal.setitimer(signal.ITIMER_REAL, 0.004, 0.004)
        try:
            started = time.monotonic()
            with pytest.raises(RuntimeError, match="peer died"):
                for array in arrays(0)[1:]:  # it may have put in one more round before it died
                    job.host_sum.all_reduce(array)
            assert time.monotonic() - started < AT_ONCE_S
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def test_ranks_summing_different_arrays_are_told(tmp_path):
    with Job(2, tmp_path) as job:
        # the peer sums arrays(1)[0] first: 2 rounds and 123 floats; this rank a smaller one
        with pytest.raises(RuntimeError, match="called all_reduce with different arrays"):
            job.host_sum.all_reduce(np.ones(1000, dtype=np.float32))


def test_a_stopped_peer_times_out_as_a_peer_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(shm_reduce, "TIMEOUT_S", 0.5)
    with Job(2, tmp_path) as job:
        peer = job.peers[0]
        job.host_sum.all_reduce(arrays(0)[0])
        os.kill(peer.pid, signal.SIGSTOP)
        try:
            time.sleep(0.2)  # let it finish the sum it was in, if any, before stopping
            started = time.monotonic()
            with pytest.raises(RuntimeError, match="Timed out after") as caught:
                for array in arrays(0)[1:]:  # the peer, stopped, may have summed the first
                    job.host_sum.all_reduce(array)
            assert 0.4 < time.monotonic() - started < 5
            assert is_peer_failure(caught.value)
        finally:
            os.kill(peer.pid, signal.SIGCONT)


def test_another_jobs_segment_is_refused():
    host_sum = SharedMemorySum.create(2)
    try:
        with pytest.raises(RuntimeError, match="is not this job's segment"):
            SharedMemorySum.attach(host_sum.path, 1, 2, bytes(16))
        with pytest.raises(RuntimeError, match="is not this job's segment"):
            SharedMemorySum.attach(host_sum.path, 1, 3, host_sum.token)  # another world size
    finally:
        host_sum.close()
    with pytest.raises((FileNotFoundError, RuntimeError)):  # closed, or its number reused
        SharedMemorySum.attach(host_sum.path, 1, 2, host_sum.token)
    with pytest.raises(RuntimeError, match="is not this job's segment"):  # another file, unopened
        SharedMemorySum.attach(f"/proc/{os.getpid()}/fd/0", 1, 2, host_sum.token)


def test_a_strided_array_is_refused():
    host_sum = SharedMemorySum.create(1)
    try:
        with pytest.raises(ValueError, match="contiguous"):
            host_sum.all_reduce(np.ones((4, 4), dtype=np.float32)[:, 0])
    finally:
        host_sum.close()


@pytest.mark.parametrize("mode, shared", [("share", True), ("refuse", False)])
def test_ranks_agree_on_shared_memory_or_all_keep_gloo(tmp_path, mode, shared):
    job = Path(__file__).resolve().parent / "shm_connect_job.py"
    # The launcher starts its workers with setsid: a ProcessTree finds and stops them all.
    tree = ProcessTree([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
                        "--log_dir", str(tmp_path), str(job), mode], env=dict(os.environ),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tree.start()
    try:
        code = tree.wait(120)
    finally:
        tree.close()
    lines = [line for rank in (0, 1)
             for line in (tmp_path / f"workerlog.{rank}").read_text().splitlines()
             if line.startswith(("RESULT", "HOW"))]
    assert code == 0, lines
    assert sorted(line for line in lines if line.startswith("RESULT")) == \
        [f"RESULT 0 {shared} True", f"RESULT 1 {shared} True"]
    if not shared:
        assert "HOW 0 gloo (another rank could not map the shared-memory segment)" in lines
        assert "HOW 1 gloo (told to refuse)" in lines


# ---------------------------------------------------------------- rounds, headers, broken objects


class FailingOnce:
    """Stands in for the slots: the next round's first touch raises ``error`` (as a
    KeyboardInterrupt or MemoryError could, after the round began and before its slot
    was published); later touches go through."""

    def __init__(self, slots, error: BaseException):
        self.slots, self.error = slots, error

    def __getitem__(self, parity):
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        return self.slots[parity]


@pytest.mark.parametrize("error", [KeyboardInterrupt(), MemoryError("injected")])
def test_a_sum_interrupted_mid_round_breaks_the_object_and_no_peer_sums_stale_data(tmp_path, error):
    with Job(2, tmp_path, plan=("same", 5, 20)) as job:
        plan = Plan("same", 5, 2)
        for _ in range(5):  # both sets of slots hold earlier rounds of the same size
            inputs, expected = plan.next_call()
            job.host_sum.all_reduce(inputs[0])
            assert inputs[0].tobytes() == expected.tobytes()
        inputs, _ = plan.next_call()
        job.host_sum._slots = FailingOnce(job.host_sum._slots, error)
        with pytest.raises(type(error)):
            job.host_sum.all_reduce(inputs[0])
        # Used again (a caller that caught the error): refused, never a round out of step.
        with pytest.raises(shm_reduce.SumBroken, match=rf"rank 0's .* cannot be used again: "
                                                       rf"its sum raised {type(error).__name__}"):
            job.host_sum.all_reduce(inputs[0])
        # The peer, waiting in that round, is told at once rather than after TIMEOUT_S.
        answer = said(job.peers[0], timeout=10)
        # A PeerFailure (trainer/rundir/errors.py): for the peer a consequence, not a root cause.
        assert answer.startswith("error PeerFailure: peer gave up: rank 0"), answer


def test_a_skipped_round_is_raised_by_the_peer_not_summed(tmp_path):
    # The state an interrupted round used to leave: this rank's round counted one ahead
    # of what it published. The peer must refuse the slot, whose header names an old round.
    with Job(2, tmp_path, plan=("same", 6, 20)) as job:
        plan = Plan("same", 6, 2)
        for _ in range(5):
            job.host_sum.all_reduce(plan.next_call()[0][0])
        # once the peer is in the next round (it has read this rank's last slot)
        wait_for(lambda: job.host_sum._rounds[1] == 6, timeout=10, what="the peer's round 6")
        job.host_sum._round += 1
        with pytest.raises(RuntimeError, match="peer gave up: rank 1"):
            job.host_sum.all_reduce(plan.next_call()[0][0])
        answer = said(job.peers[0], timeout=10)
        assert answer == ("error RuntimeError: rank 0's slot holds round 4, not round 6: "
                          "rank 0 skipped a round of the shared-memory gradient sum"), answer


def test_ranks_summing_the_same_bytes_as_different_dtypes_are_told(tmp_path):
    with Job(2, tmp_path) as job:
        # the peer sums arrays(1)[0] (float32) first: the same bytes, read as int32 here
        with pytest.raises(RuntimeError, match=r"rank 1 summed 1048576 bytes of float32 in round "
                                               r"1, rank 0 1048576 bytes of int32: the ranks "
                                               r"called all_reduce with different arrays"):
            job.host_sum.all_reduce(arrays(0)[0].view(np.int32))


def test_a_closed_sum_is_refused():
    host_sum = SharedMemorySum.create(2)
    host_sum.close()
    with pytest.raises(shm_reduce.SumBroken, match="it was closed"):
        host_sum.all_reduce(np.ones(4, dtype=np.float32))


# 10,000 sums per world size, nearly all tiny, 0.2 % over a CHUNK (several rounds each).
# Each round needs every rank on a CPU: on a loaded machine the time goes to waiting for one.
STRESS_CALLS = {2: 10_000, 3: 10_000}


@pytest.mark.parametrize("world", sorted(STRESS_CALLS))
def test_stress_every_sum_of_random_sizes_dtypes_and_delays_is_numpys(tmp_path, world):
    calls, seed = STRESS_CALLS[world], 100 + world
    with Job(world, tmp_path, plan=("mixed", seed, calls)) as job:
        mine = run_plan(job.host_sum, "mixed", seed, calls)
        answers = [said(peer, timeout=120) for peer in job.peers]
    assert [mine, *answers] == [f"done {calls}"] * world
    assert job.host_sum._round > calls  # some sums took several rounds
