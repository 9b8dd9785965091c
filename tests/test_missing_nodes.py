"""missing_nodes against a real Paddle rendezvous master (its KVServer, fed by its KVClient)
and launch logs as Paddle's launcher writes them."""
import contextlib

import pytest

from helpers import free_port
from paddlerun.launcher.missing_nodes import MissingNodes, missing_nodes, waiting_for_peers

CONFIG = """LAUNCH INFO 2026-12-05 07:26:42,702 -----------  Configuration  ----------------------
LAUNCH INFO 2026-12-05 07:26:42,702 job_id: {job}
LAUNCH INFO 2026-12-05 07:26:42,703 nnodes: 4
LAUNCH INFO 2026-12-05 07:26:42,703 --------------------------------------------------
LAUNCH INFO 2026-12-05 07:26:42,703 Job: {job}, mode collective, replicas 4[4:4], elastic False
"""
WAITING = "LAUNCH INFO 2026-12-05 07:26:42,704 Waiting peer start...\n"
STARTED = ("LAUNCH INFO 2026-12-05 07:26:32,592 Run Pod: alwjno, replicas 1, status ready\n"
           "LAUNCH INFO 2026-12-05 07:26:32,618 Watching Pod: alwjno, replicas 1, status running\n")


def launch_log(tmp_path, text, job="default"):
    path = tmp_path / "launch.log"
    path.write_text(CONFIG.format(job=job) + text)
    return path


@contextlib.contextmanager
def master(job, *node_ranks):
    """Paddle's own rendezvous master, with these nodes registered as their launchers do."""
    kv_server = pytest.importorskip("paddle.distributed.launch.utils.kv_server")
    from paddle.distributed.launch.utils.kv_client import KVClient
    port = free_port()
    server = kv_server.KVServer(port)
    server.start()
    try:
        client = KVClient(f"127.0.0.1:{port}")
        for rank in node_ranks:
            assert client.put(f"/{job}/info/pod{rank}/{rank}", '{"rank": %d}' % rank)
        yield f"127.0.0.1:{port}"
    finally:
        server.stop()


def test_a_launcher_is_waiting_until_it_logs_that_its_pod_runs(tmp_path):
    assert waiting_for_peers(launch_log(tmp_path, WAITING))
    assert not waiting_for_peers(launch_log(tmp_path, WAITING + STARTED))
    assert not waiting_for_peers(launch_log(tmp_path, ""))  # still importing
    assert not waiting_for_peers(tmp_path / "no-such-launch.log")


def test_the_master_names_the_nodes_that_have_not_registered(tmp_path):
    with master("lenet-7", 0, 2) as address:
        log = launch_log(tmp_path, WAITING, job="lenet-7")  # the launcher's --job_id
        assert missing_nodes(log, nnodes=4, node_rank=0, master=address) == MissingNodes([1, 3], True)
        # This node counts as present even before its own launcher has registered.
        assert missing_nodes(log, nnodes=4, node_rank=1, master=address) == MissingNodes([3], True)


def test_a_master_with_nothing_registered_yet_leaves_every_other_node_missing(tmp_path):
    with master("default") as address:  # answers 404 for an empty prefix
        log = launch_log(tmp_path, WAITING)
        assert missing_nodes(log, nnodes=3, node_rank=1, master=address) == MissingNodes([0, 2], True)


def test_a_master_that_does_not_answer_leaves_every_other_node_missing_and_says_so(tmp_path):
    log = launch_log(tmp_path, WAITING)
    nobody = f"127.0.0.1:{free_port()}"
    assert missing_nodes(log, nnodes=2, node_rank=1, master=nobody) == MissingNodes([0], False)


def test_nothing_is_missing_once_the_pod_runs(tmp_path):
    with master("default", 0) as address:
        log = launch_log(tmp_path, WAITING + STARTED)
        assert missing_nodes(log, nnodes=2, node_rank=0, master=address) is None
