"""The cloud's preemption notice with the real launcher and 2 CPU workers: a fake metadata
service on 127.0.0.1 gives the notice mid-training; the run snapshots, exits 75, and the
rerun (the "replacement instance") ends with the uninterrupted run's digest."""
import subprocess
import sys
import time

import pytest

from helpers import (reference_digest, REPO, assert_no_leftovers, events, free_port, heartbeat, killed_on_error,
                     run, start, summary, wait, wait_all, wait_for)
from metadata_servers import MetadataServer
from paddlerun.trainer.checkpoint import CheckpointStore

pytestmark = pytest.mark.slow

TOTAL = "train.max_steps=150"


def notice_settings(server, margin_s=1.0):
    return [f"supervisor.spot_notice={server.provider}", f"supervisor.spot_endpoint={server.url}",
            "supervisor.spot_poll_s=0.1", f"supervisor.spot_margin_s={margin_s}"]


def step_of(run_dir, rank=0):
    return (heartbeat(run_dir, rank) or {}).get("step", 0)


def event(run_dir, name):
    return next(e for e in events(run_dir) if e["event"] == name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_digest(tmp_path_factory, TOTAL)


@pytest.mark.parametrize("provider", ["aws", "gcp", "azure"])
def test_a_notice_snapshots_exits_75_and_the_rerun_is_exact(tmp_path, reference, provider):
    with MetadataServer(provider) as server:
        # GCP's notice leaves ~30 s: a margin of 30 s makes every provider stop at once here.
        proc = start(tmp_path, TOTAL, *notice_settings(server, margin_s=30))
        with killed_on_error(proc):
            wait_for(lambda: step_of(tmp_path) >= 25, 120, "rank 0 to pass step 25")
            at_notice = step_of(tmp_path)
            server.give_notice(20)
            out = wait(proc, 120)
        assert proc.returncode == 75, out[-5000:]
        notice = event(tmp_path, "preempt_notice")
        assert notice["provider"] == provider
        preempted = event(tmp_path, "preempted")
        assert preempted["clean"] and preempted["reason"] == f"{provider} preemption notice", preempted
        snapshot = CheckpointStore(tmp_path / "checkpoints").newest_complete()
        assert snapshot.manifest["reason"] == "preempted" and snapshot.step >= at_notice
        if provider == "azure":  # acknowledged once the snapshot was durable
            assert server.acknowledged == [server.event_id]
        assert_no_leftovers(tmp_path)
        server.withdraw()  # the replacement instance has no notice
        again = run(tmp_path, TOTAL, *notice_settings(server))
    assert again.returncode == 0, again.stdout[-5000:]
    assert summary(tmp_path)["digest"] == reference
    assert_no_leftovers(tmp_path)


def test_a_notice_with_time_to_spare_trains_on_until_the_deadline_less_the_lead(tmp_path):
    """AWS gives two minutes: training goes on until the deadline less the margin, twice the
    measured snapshot time and one agreement period -- then the snapshot, before the deadline."""
    with MetadataServer("aws") as server:
        proc = start(tmp_path, "train.epochs=30", *notice_settings(server, margin_s=2))
        with killed_on_error(proc):
            wait_for(lambda: step_of(tmp_path) >= 25, 120, "rank 0 to pass step 25")
            deadline = server.give_notice(8)
            out = wait(proc, 120)
    assert proc.returncode == 75, out[-5000:]
    notice, requested = event(tmp_path, "preempt_notice"), event(tmp_path, "preempt_requested")
    lead = deadline - notice["stop_at"]
    assert 2 <= lead < 6, notice  # the margin, and a little measured on top
    assert requested["time"] >= notice["stop_at"] - 0.01, "trained on until stop_at"
    saved = [e for e in events(tmp_path) if e["event"] == "snapshot_committed"
             and e.get("reason") == "preempted"]
    assert saved and saved[0]["time"] < deadline, "the snapshot was durable before the deadline"
    assert_no_leftovers(tmp_path)


def test_one_nodes_notice_stops_a_two_node_job_cleanly_on_both(tmp_path, reference):
    """Each node watches its own instance. Node 1's notice: its workers ask, all ranks agree,
    both nodes snapshot-and-stop and exit 75; the rerun of both ends exact."""
    port = free_port()

    def node(rank, *sets):
        return start(tmp_path / f"node{rank}", TOTAL, *sets, "launch.nnodes=2",
                     f"launch.node_rank={rank}", f"launch.master=127.0.0.1:{port}",
                     "launch.nproc_per_node=1", f"checkpoint.dir={tmp_path / 'shared-ckpt'}")

    with MetadataServer("aws") as quiet, MetadataServer("aws") as noisy:
        nodes = [node(0, *notice_settings(quiet)), node(1, *notice_settings(noisy, margin_s=30))]
        with killed_on_error(nodes[0]), killed_on_error(nodes[1]):
            wait_for(lambda: step_of(tmp_path / "node1", 1) >= 25, 120, "rank 1 to pass step 25")
            noisy.give_notice(10)
        outs = wait_all(nodes, 120)
        assert [p.returncode for p in nodes] == [75, 75], outs[0][-3000:] + outs[1][-3000:]
        assert event(tmp_path / "node1", "preempt_notice")["provider"] == "aws"
        assert not [e for e in events(tmp_path / "node0") if e["event"] == "preempt_notice"]
        assert event(tmp_path / "node0", "preempted")["ranks"] == [0]
        noisy.withdraw()
        port = free_port()
        nodes = [node(0, *notice_settings(quiet)), node(1, *notice_settings(noisy))]
        outs = wait_all(nodes, 180)
    assert [p.returncode for p in nodes] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert summary(tmp_path / "node0")["digest"] == reference
    for rank in (0, 1):
        assert_no_leftovers(tmp_path / f"node{rank}")


def test_a_notice_stops_a_session_script_under_the_supervisor(tmp_path):
    """Script mode (examples/train_script.py, Session) gets the same stop request."""
    run_dir = tmp_path / "run"
    with MetadataServer("gcp") as server:
        argv = [sys.executable, "-m", "paddlerun.launcher.cli", "run", "--script",
                str(REPO / "examples" / "train_script.py"), "--nproc-per-node", "2",
                "--run-dir", str(run_dir)]
        for item in ["supervisor.heartbeat_interval_s=0.25", "supervisor.hang_timeout_s=30",
                     *notice_settings(server, margin_s=30)]:
            argv += ["--set", item]
        proc = subprocess.Popen([*argv, "--", "--max-steps", "2000", "--every-steps", "1000"],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        with killed_on_error(proc):
            wait_for(lambda: step_of(run_dir) >= 20, 120, "rank 0 to pass step 20")
            server.give_notice(30)
            started = time.time()
            out = wait(proc, 120)
    assert proc.returncode == 75, out[-5000:]
    assert time.time() - started < 60
    snapshot = CheckpointStore(run_dir / "checkpoints").newest_complete()
    assert snapshot.manifest["reason"] == "preempted" and snapshot.step >= 20
    assert_no_leftovers(run_dir)
