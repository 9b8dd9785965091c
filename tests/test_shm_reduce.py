"""The shared-memory gradient sum with real processes: sums, a dead peer, a stopped peer.

Rank 0 runs in the test process, the others in ``shm_peer.py`` subprocesses. The sum with
gloo in real training (bit for bit against DataParallel) is in test_run_e2e.
"""
import contextlib
import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from paddlerun.trainer import shm_reduce
from paddlerun.trainer.errors import is_peer_failure
from paddlerun.trainer.shm_reduce import SharedMemorySum

pytestmark = pytest.mark.skipif(not shm_reduce.supported(), reason="x86-64 Linux only")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shm_peer import arrays  # noqa: E402

PEER = Path(__file__).resolve().parent / "shm_peer.py"


class Job:
    """Rank 0 here, ranks 1.. as subprocesses; every process is reaped on exit."""

    def __init__(self, world: int, out: Path):
        self.host_sum = SharedMemorySum.create(0, world)
        self.peers = [subprocess.Popen(
            [sys.executable, str(PEER), self.host_sum.path, str(rank), str(world),
             self.host_sum.token.hex(), str(out)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for rank in range(1, world)]

    def __enter__(self):
        try:
            for peer in self.peers:
                assert peer.stdout.readline().strip() == "attached"
            self.host_sum.unlink()
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


def test_every_rank_gets_the_rank_order_sum_to_the_bit(tmp_path):
    with Job(3, tmp_path) as job:
        mine = arrays(0)
        for array in mine:
            job.host_sum.all_reduce(array)
        for peer in job.peers:
            assert peer.stdout.readline().strip() == "done"
    inputs = [arrays(rank) for rank in range(3)]
    for i, result in enumerate(mine):
        expected = (inputs[0][i] + inputs[1][i]) + inputs[2][i]
        assert result.dtype == expected.dtype
        assert result.tobytes() == expected.tobytes(), f"array {i}"
        for rank in (1, 2):
            assert np.load(tmp_path / f"rank-{rank}-{i}.npy").tobytes() == expected.tobytes()


def test_the_segment_leaves_no_file_behind(tmp_path):
    with Job(2, tmp_path) as job:
        assert not os.path.exists(job.host_sum.path)
        job.host_sum.all_reduce(arrays(0)[0])  # still works once unlinked
    assert not glob.glob(f"/dev/shm/paddlerun-sum-{os.getpid()}-*")


def test_a_dead_peer_is_raised_at_once_as_a_peer_failure(tmp_path):
    with Job(2, tmp_path) as job:
        peer = job.peers[0]
        job.host_sum.all_reduce(np.ones(4, dtype=np.float32))  # the peer's first sum: it is in
        peer.kill()
        peer.wait(timeout=10)
        started = time.monotonic()
        with pytest.raises(RuntimeError, match=r"peer died: rank 1 \(pid \d+\)") as caught:
            for array in arrays(0)[1:]:
                job.host_sum.all_reduce(array)
        assert time.monotonic() - started < 1.0
        assert is_peer_failure(caught.value)


def test_a_stopped_peer_times_out_as_a_peer_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(shm_reduce, "TIMEOUT_S", 0.5)
    with Job(2, tmp_path) as job:
        peer = job.peers[0]
        job.host_sum.all_reduce(np.ones(4, dtype=np.float32))
        os.kill(peer.pid, signal.SIGSTOP)
        try:
            time.sleep(0.2)  # let it finish the sum it was in, if any, before stopping
            started = time.monotonic()
            with pytest.raises(RuntimeError, match="Timed out after") as caught:
                for array in arrays(0)[1:]:
                    job.host_sum.all_reduce(array)
            assert 0.4 < time.monotonic() - started < 5
            assert is_peer_failure(caught.value)
        finally:
            os.kill(peer.pid, signal.SIGCONT)


def test_another_jobs_segment_is_refused():
    host_sum = SharedMemorySum.create(0, 2)
    try:
        with pytest.raises(RuntimeError, match="is not this job's segment"):
            SharedMemorySum.attach(host_sum.path, 1, 2, bytes(16))
        with pytest.raises(RuntimeError, match="is not this job's segment"):
            SharedMemorySum.attach(host_sum.path, 1, 3, host_sum.token)  # another world size
    finally:
        host_sum.unlink()
        host_sum.close()
    with pytest.raises(FileNotFoundError):
        SharedMemorySum.attach(host_sum.path, 1, 2, host_sum.token)


def test_a_strided_array_is_refused():
    host_sum = SharedMemorySum.create(0, 1)
    try:
        with pytest.raises(ValueError, match="contiguous"):
            host_sum.all_reduce(np.ones((4, 4), dtype=np.float32)[:, 0])
    finally:
        host_sum.unlink()
        host_sum.close()


@pytest.mark.parametrize("mode, shared", [("share", True), ("refuse", False)])
def test_ranks_agree_on_shared_memory_or_all_keep_gloo(tmp_path, mode, shared):
    before = set(glob.glob("/dev/shm/paddlerun-sum-*"))
    job = Path(__file__).resolve().parent / "shm_connect_job.py"
    proc = subprocess.Popen(
        [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
         "--log_dir", str(tmp_path), str(job), mode],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        proc.wait(timeout=120)
    finally:  # the launcher and its workers, whatever happened
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    results = [line for rank in (0, 1)
               for line in (tmp_path / f"workerlog.{rank}").read_text().splitlines()
               if line.startswith("RESULT")]
    assert proc.returncode == 0, results
    assert sorted(results) == [f"RESULT 0 {shared} 3000", f"RESULT 1 {shared} 3000"]
    assert set(glob.glob("/dev/shm/paddlerun-sum-*")) <= before, "rank 0 removed its segment"
