"""Membership and generations over a real etcd, nodes as threads of this process."""
from __future__ import annotations

import threading
import time

import pytest

from etcd_server import EtcdServer, etcd_missing
from paddlerun.cluster.membership import Generation
from paddlerun.launcher.elastic import ElasticNode, TooFewNodes
from paddlerun.trainer.rundir.config import ConfigError, config_from_dict, load_config

pytestmark = [pytest.mark.etcd,
              pytest.mark.skipif(etcd_missing() is not None, reason=str(etcd_missing()))]


@pytest.fixture
def etcd(tmp_path):
    server = EtcdServer(tmp_path / "etcd").start()
    yield server
    server.stop()


def node(etcd, name, nnodes="1:2", **supervisor):
    sup = {"node_ttl_s": 2, "elastic_wait_s": 0.5, "scale_up_min_interval_s": 0, **supervisor}
    config = config_from_dict({"job": {"name": "t"}, "checkpoint": {"dir": "/tmp/unused"},
                               "launch": {"rendezvous": etcd.url, "nnodes": nnodes},
                               "supervisor": sup})
    return ElasticNode(config, 1, fence=lambda: 0, node_id=name)


def form_all(nodes, timeout=20):
    results = {}

    def form(n):
        results[n.node_id] = n.form(time.monotonic() + timeout, lambda: False)

    threads = [threading.Thread(target=form, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    return results


def join(*nodes):
    for n in nodes:
        assert n.join(time.monotonic() + 10, lambda: False)


def test_nodes_agree_on_one_generation_in_join_order(etcd):
    a, b = node(etcd, "a"), node(etcd, "b")
    try:
        join(a, b)
        gens = form_all([a, b])
        assert gens["a"] == gens["b"]
        gen = gens["a"]
        assert gen.number == 1 and gen.members == ("a", "b")
        assert gen.master.startswith(f"{a.addr}:")
    finally:
        a.finish(False), b.finish(False)


def test_a_killed_node_is_seen_lost_within_ttl_plus_one_second(etcd):
    a, b = node(etcd, "a"), node(etcd, "b")
    try:
        join(a, b)
        form_all([a, b])
        assert a.lost() == []
        b.membership._stop.set()  # b stops refreshing, as if killed: its key expires
        b.membership._thread.join(5)
        gone = time.monotonic()
        lost = a.lost()
        while not lost:
            assert time.monotonic() - gone < 2 + 1 + 0.5, "loss not seen in node_ttl_s + 1 s"
            time.sleep(0.05)
            lost = a.lost()
        seen = time.monotonic() - gone
        assert [n.node_id for n in lost] == ["b"] and lost[0].how == "lease expired"
        assert seen <= 2 + 1, seen
        assert a.lost() == [], "told once"
        # a goes on alone (MIN 1): the next generation has it only
        gen = a.form(time.monotonic() + 10, lambda: False)
        assert gen.number == 2 and gen.members == ("a",)
    finally:
        a.finish(False)


def test_a_leaving_node_is_seen_at_once(etcd):
    a, b = node(etcd, "a"), node(etcd, "b")
    try:
        join(a, b)
        form_all([a, b])
        b.finish(succeeded=False)  # revokes its lease
        t0 = time.monotonic()
        lost = a.lost()
        while not lost:
            assert time.monotonic() - t0 < 2
            time.sleep(0.05)
            lost = a.lost()
        assert lost[0].how == "left"
    finally:
        a.finish(False)


def test_a_finished_node_is_no_loss(etcd):
    a, b = node(etcd, "a"), node(etcd, "b")
    try:
        join(a, b)
        form_all([a, b])
        b.finish(succeeded=True)
        time.sleep(2 + 1.5)  # its key has expired by now
        assert "b" not in a.membership.view().members
        assert a.lost() == []
    finally:
        a.finish(False)


def test_a_joiner_is_taken_in_and_max_is_kept(etcd):
    a = node(etcd, "a", scale_up_min_interval_s=1)
    b, c = node(etcd, "b"), node(etcd, "c")
    try:
        join(a)
        assert form_all([a])["a"].members == ("a",)
        join(b, c)
        time.sleep(0.6)
        assert a.joiners() == [], "taken in before scale_up_min_interval_s"
        time.sleep(0.6)
        assert a.joiners() == ["b", "c"]
        # a's workers stopped for the scale-up: all form the next generation, at most MAX 2
        results = {}
        waiter = threading.Thread(target=lambda: results.update(
            c=_form_or_timeout(c, 4)))
        waiter.start()
        gens = form_all([a, b])
        waiter.join(10)
        assert gens["a"].members == ("a", "b") and gens["a"].number == 2
        assert results["c"] == "timed out", "a node beyond MAX waits"
    finally:
        for n in (a, b, c):
            n.finish(False)


def _form_or_timeout(n, seconds):
    try:
        return n.form(time.monotonic() + seconds, lambda: False)
    except TooFewNodes:
        return "timed out"


def test_two_proposals_for_the_same_revision_never_both_win(etcd):
    a, b = node(etcd, "a"), node(etcd, "b")
    try:
        join(a, b)
        rev = a.membership.view().generation_revision
        won = [n.membership.propose(Generation(1, (n.node_id,), "x:1", 0.0), rev) for n in (a, b)]
        assert won == [True, False]
    finally:
        a.finish(False), b.finish(False)


def test_members_survive_an_etcd_crash_and_restart(etcd):
    a, b = node(etcd, "a"), node(etcd, "b")
    try:
        join(a, b)
        form_all([a, b])
        etcd.kill()
        time.sleep(3)  # longer than the 2 s lease: etcd restores leases with a fresh TTL
        assert a.lost() == [], "no news is no loss"
        etcd.start()
        time.sleep(1.5)
        view = a.membership.view()
        assert set(view.members) == {"a", "b"} and a.lost() == []
    finally:
        a.finish(False), b.finish(False)


def test_too_few_nodes_is_reported_with_the_count(etcd):
    a = node(etcd, "a", nnodes="2:3")
    try:
        join(a)
        with pytest.raises(TooFewNodes, match="1 node.* present, MIN is 2"):
            a.form(time.monotonic() + 1.5, lambda: False)
    finally:
        a.finish(False)


def test_nnodes_min_max_in_yaml_and_set_is_not_base_60(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("launch:\n  rendezvous: etcd://127.0.0.1:2379\n  nnodes: 1:2\n"
                    "checkpoint:\n  dir: /shared/ckpt\n")
    assert load_config(path).launch.node_range == (1, 2)
    path.write_text("launch:\n  rendezvous: etcd://127.0.0.1:2379\n")
    assert load_config(path, ["launch.nnodes=1:2"]).launch.node_range == (1, 2)
    assert load_config(path, ["launch.nnodes=3"]).launch.node_range == (3, 3)


@pytest.mark.parametrize("launch, message", [
    ({"nnodes": "1:2"}, "MIN:MAX needs launch.rendezvous"),
    ({"nnodes": "2:1", "rendezvous": "etcd://h:1"}, "MIN <= MAX"),
    ({"nnodes": 62}, "must be set"),  # what base-60 1:2 would have been: a master is asked for
    ({"rendezvous": "http://h:2379"}, "must start with etcd://"),
    ({"rendezvous": "etcd://h1:2379,h2"}, "'h2' is not HOST:PORT"),
    ({"rendezvous": "etcd://h:1", "master": "h:2"}, "is chosen in each generation"),
    ({"rendezvous": "etcd://h:1", "job_id": "a/b"}, "job_id"),
])
def test_bad_elastic_config_names_the_key(launch, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"launch": launch})
