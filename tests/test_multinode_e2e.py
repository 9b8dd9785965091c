"""Two "nodes" on one machine: two supervisors, each with its own launcher (--nnodes 2)."""
import os
import signal

import pytest

from helpers import (assert_no_leftovers, events, free_port, heartbeat, kill_node, killed_on_error, run,
                     start, summary, wait, wait_all, wait_for, worker_digests)

pytestmark = pytest.mark.slow


def start_nodes(tmp_path, *sets):
    port = free_port()
    return [start(tmp_path / f"node{rank}", *sets, "launch.nnodes=2", f"launch.node_rank={rank}",
                  f"launch.master=127.0.0.1:{port}", "launch.nproc_per_node=1",
                  f"checkpoint.dir={tmp_path / 'shared-ckpt'}")
            for rank in (0, 1)]


def node_dir(tmp_path, rank):
    """Node 0's files are where a one-node run has them; node K's in RUN_DIR/nodes/node-K."""
    run_dir = tmp_path / f"node{rank}"
    return run_dir if rank == 0 else run_dir / "nodes" / f"node-{rank}"


def final_digest(run_dir):
    """The digest the node's one worker logged in the last attempt that logged one."""
    attempts = sorted(int(p.name.split("-")[1]) for p in (run_dir / "logs").glob("attempt-*"))
    for attempt in reversed(attempts):
        digest = worker_digests(run_dir, attempt=attempt).get(0)
        if digest is not None:
            return digest
    return None


def test_two_nodes_of_one_worker_train_like_one_node_of_two(tmp_path):
    single = tmp_path / "single"
    assert run(single, "train.max_steps=24").returncode == 0
    nodes = start_nodes(tmp_path, "train.max_steps=24")
    outs = wait_all(nodes)
    assert [p.returncode for p in nodes] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    # Each node logs its one worker as workerlog.0 (the launcher numbers them per node);
    # node K > 0 keeps its own files in RUN_DIR/nodes/node-K (the run dir may be shared).
    # The attempt that finished: once in a full-suite run Paddle's own TCP store aborted at
    # start-up (a libuv assertion, SIGABRT) and paddlerun restarted both nodes, as it should.
    digests = [final_digest(node_dir(tmp_path, rank)) for rank in (0, 1)]
    assert digests == [summary(single)["digest"]] * 2
    # Global rank 0 (on node 0) wrote the snapshots into the shared directory.
    assert (tmp_path / "shared-ckpt" / "step-00000024" / "manifest.json").is_file()
    for rank in (0, 1):
        assert_no_leftovers(tmp_path / f"node{rank}")


def test_a_worker_killed_on_node_1_restarts_both_nodes_which_end_identical(tmp_path):
    """Node 1's supervisor restarts its worker; node 0's worker fails through its next
    collective (Paddle's master does not tell it), writes the emergency snapshot, and its
    supervisor restarts it too. Both resume from the same snapshot."""
    total = "train.max_steps=150"
    single = tmp_path / "single"
    assert run(single, total).returncode == 0
    nodes = start_nodes(tmp_path, total)
    with killed_on_error(nodes[0]), killed_on_error(nodes[1]):
        pid = wait_for(lambda: (heartbeat(tmp_path / "node1", 1) or {}).get("step", 0) >= 60
                       and heartbeat(tmp_path / "node1", 1)["pid"], 120, "rank 1 to pass step 60")
        done_before_kill = heartbeat(tmp_path / "node1", 1)["step"]
        os.kill(pid, signal.SIGKILL)
    outs = wait_all(nodes)
    assert [p.returncode for p in nodes] == [0, 0], outs[0][-4000:] + outs[1][-4000:]
    # Both resumed from one snapshot, and lost no step done before the kill: node 0's
    # emergency snapshot (or a scheduled one of that very step).
    resumed = [[int(line.rsplit("step-", 1)[1][:8]) for line in
                (node_dir(tmp_path, rank) / "logs" / "attempt-1" / "workerlog.0").read_text().splitlines()
                if "resumed from" in line] for rank in (0, 1)]
    assert resumed[0] == resumed[1] and len(resumed[0]) == 1 and resumed[0][0] >= done_before_kill, \
        (resumed, done_before_kill)
    for rank in (0, 1):
        names = [e["event"] for e in events(tmp_path / f"node{rank}")]
        assert "worker_failed" in names and "restarting" in names and names[-1] == "succeeded", (rank, names)
    restarted = [summary(node_dir(tmp_path, rank))["restarts"] for rank in (0, 1)]
    assert restarted == [1, 1]
    reference = summary(single)["digest"]
    assert summary(tmp_path / "node0")["digest"] == reference
    assert worker_digests(node_dir(tmp_path, 1), attempt=1) == {0: reference}
    for rank in (0, 1):
        assert_no_leftovers(tmp_path / f"node{rank}")


def test_waiting_for_a_late_node_keeps_the_http_polling_off_the_console(tmp_path):
    # Node 0's launcher polls Paddle's HTTP master for its peer twice a second, and httpx
    # logs each request; they belong in the launch log only.
    port = free_port()
    sets = ["train.max_steps=6", "launch.nnodes=2", f"launch.master=127.0.0.1:{port}",
            "launch.nproc_per_node=1", f"checkpoint.dir={tmp_path / 'shared-ckpt'}"]
    node0 = start(tmp_path / "node0", *sets, "launch.node_rank=0")
    with killed_on_error(node0):
        launch_log = tmp_path / "node0" / "logs" / "attempt-0" / "launch.log"
        wait_for(lambda: launch_log.is_file() and launch_log.read_text().count("HTTP Request:") >= 4,
                 120, "node 0's launcher to poll the master a few times")
        node1 = start(tmp_path / "node1", *sets, "launch.node_rank=1")
    outs = wait_all([node0, node1])
    assert [p.returncode for p in (node0, node1)] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    for out in outs:
        assert "HTTP Request:" not in out, out[-3000:]
    assert "HTTP Request: GET http://" in launch_log.read_text()  # the log keeps them
    for rank in (0, 1):
        assert_no_leftovers(tmp_path / f"node{rank}")


def peer_missing_failures(run_dir):
    return [e for e in events(run_dir) if e["event"] == "worker_failed" and e["kind"] == "peer_missing"]


def test_a_node_lost_whole_ends_the_job_once_naming_it(tmp_path):
    """Node 1 killed whole: node 0's worker fails through its next collective and restarts;
    its launcher then waits for node 1 in Paddle's rendezvous, which has no timeout of its
    own. After supervisor.start_timeout_s node 0 gives up, once, naming node 1."""
    nodes = start_nodes(tmp_path, "train.max_steps=2000", "supervisor.start_timeout_s=15")
    with killed_on_error(nodes[0]), killed_on_error(nodes[1]):
        wait_for(lambda: (heartbeat(tmp_path / "node1", 1) or {}).get("step", 0) >= 20, 120,
                 "rank 1 to pass step 20")
        kill_node(tmp_path / "node1")
        out = wait(nodes[0], 120)
        nodes[1].communicate(timeout=30)
    assert nodes[0].returncode == 1, out[-4000:]
    assert "root cause: node 1 of 2 never joined" in out, out[-4000:]
    assert "launch.rendezvous" in out and "did not answer" not in out, out[-4000:]
    node0 = events(tmp_path / "node0")
    assert len(peer_missing_failures(tmp_path / "node0")) == 1, node0
    # The worker's failure through the lost peer, then the wait for it: two attempts, no more.
    assert [e["event"] for e in node0].count("started") == 2, node0
    assert summary(tmp_path / "node0")["root_cause"]["kind"] == "peer_missing"
    for rank in (0, 1):
        assert_no_leftovers(tmp_path / f"node{rank}")


def test_a_node_that_never_starts_is_named_after_the_start_timeout(tmp_path):
    # Node 1 alone: on 127.0.0.1 its launcher runs the master itself and registers there,
    # so the master's answer names node 0 as the one missing.
    port = free_port()
    node1 = start(tmp_path / "node1", "train.max_steps=6", "supervisor.start_timeout_s=15",
                  "launch.nnodes=2", "launch.node_rank=1", f"launch.master=127.0.0.1:{port}",
                  "launch.nproc_per_node=1", f"checkpoint.dir={tmp_path / 'shared-ckpt'}")
    with killed_on_error(node1):
        out = wait(node1, 120)
    assert node1.returncode == 1, out[-4000:]
    assert f"root cause: node 0 of 2 never joined: node 1 waited for it at the master 127.0.0.1:{port}" \
        in out and "did not answer" not in out, out[-4000:]
    assert [e["event"] for e in events(tmp_path / "node1")].count("worker_failed") == 1
    assert len(peer_missing_failures(tmp_path / "node1")) == 1
    assert summary(node_dir(tmp_path, 1))["root_cause"]["kind"] == "peer_missing"
    assert_no_leftovers(tmp_path / "node1")
