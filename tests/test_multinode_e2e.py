"""Two "nodes" on one machine: two supervisors, each with its own launcher (--nnodes 2)."""
import subprocess

import pytest

from helpers import REPO, assert_no_leftovers, command, kill_session, run, summary, worker_digests

pytestmark = pytest.mark.slow


def test_two_nodes_of_one_worker_train_like_one_node_of_two(tmp_path):
    single = tmp_path / "single"
    assert run(single, "train.max_steps=24").returncode == 0
    nodes = []
    for rank in (0, 1):
        argv = command(tmp_path / f"node{rank}", "train.max_steps=24", "launch.nnodes=2",
                       f"launch.node_rank={rank}", "launch.master=127.0.0.1:29531",
                       "launch.nproc_per_node=1", f"checkpoint.dir={tmp_path / 'shared-ckpt'}")
        nodes.append(subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    try:
        outs = [p.communicate(timeout=300)[0] for p in nodes]
    finally:
        for p in nodes:
            kill_session(p)
    assert [p.returncode for p in nodes] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    # Each node logs its one worker as workerlog.0 (the launcher numbers them per node).
    digests = [worker_digests(tmp_path / f"node{rank}").get(0) for rank in (0, 1)]
    assert digests == [summary(single)["digest"]] * 2
    # Global rank 0 (on node 0) wrote the snapshots into the shared directory.
    assert (tmp_path / "shared-ckpt" / "step-00000024" / "manifest.json").is_file()
    for rank in (0, 1):
        assert_no_leftovers(tmp_path / f"node{rank}")
