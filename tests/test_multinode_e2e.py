"""Two "nodes" on one machine: two supervisors, each with its own launcher (--nnodes 2)."""
import socket

import pytest

from helpers import assert_no_leftovers, kill_session, run, start, summary, wait, worker_digests

pytestmark = pytest.mark.slow


def test_two_nodes_of_one_worker_train_like_one_node_of_two(tmp_path):
    single = tmp_path / "single"
    assert run(single, "train.max_steps=24").returncode == 0
    with socket.socket() as probe:  # a free port for the launchers' rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    nodes = [start(tmp_path / f"node{rank}", "train.max_steps=24", "launch.nnodes=2",
                   f"launch.node_rank={rank}", f"launch.master=127.0.0.1:{port}",
                   "launch.nproc_per_node=1", f"checkpoint.dir={tmp_path / 'shared-ckpt'}")
             for rank in (0, 1)]
    try:
        outs = [wait(p, 300) for p in nodes]
    finally:
        for p in nodes:  # a node whose peer failed would wait for it forever
            if p.poll() is None:
                kill_session(p)
                p.communicate(timeout=30)
    assert [p.returncode for p in nodes] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    # Each node logs its one worker as workerlog.0 (the launcher numbers them per node).
    digests = [worker_digests(tmp_path / f"node{rank}").get(0) for rank in (0, 1)]
    assert digests == [summary(single)["digest"]] * 2
    # Global rank 0 (on node 0) wrote the snapshots into the shared directory.
    assert (tmp_path / "shared-ckpt" / "step-00000024" / "manifest.json").is_file()
    for rank in (0, 1):
        assert_no_leftovers(tmp_path / f"node{rank}")
