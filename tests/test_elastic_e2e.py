"""Elastic jobs on a real etcd with the real launcher: nodes are supervisors on this machine,
each with its own run directory, sharing one checkpoints directory.

Every node trains one worker on ``tests/recording_dataset.py``, which records the samples
each rank reads and (``RECORDING_SAMPLE_DELAY_S``) slows the steps enough for the test to
act between them. Across generations of 2, 1 and 2 nodes the samples of every global step
must be those of an uninterrupted run: nothing repeated or skipped.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from etcd_server import EtcdServer, endpoints, etcd_missing
from helpers import (REPO, assert_no_leftovers, command, events, heartbeat, kill_node,
                     kill_session, run, start, summary, wait, wait_all, wait_for)
from netns import Netns, netns_missing
from paddlerun.cluster.etcd_client import Etcd

pytestmark = [pytest.mark.slow, pytest.mark.etcd,
              pytest.mark.skipif(etcd_missing() is not None, reason=str(etcd_missing()))]

GLOBAL_BATCH = 48
STEPS = 240
TTL = 2
RECORDING = ["train.dataset=recording_dataset:build", "train.num_workers=0",
             f"train.global_batch_size={GLOBAL_BATCH}", "checkpoint.every_steps=20",
             "launch.nproc_per_node=1", f"train.max_steps={STEPS}", "train.drop_last=true"]
ENV = {"PYTHONPATH": str(REPO / "tests"), "RECORDING_SAMPLE_DELAY_S": "0.002"}


@pytest.fixture
def etcd(tmp_path):
    server = EtcdServer(tmp_path / "etcd").start()
    yield server
    server.stop()


def elastic(etcd, ckpt: Path, nnodes="1:2", **supervisor):
    sup = {"node_ttl_s": TTL, "elastic_wait_s": 30, "scale_up_min_interval_s": 1, **supervisor}
    return [f"launch.rendezvous={etcd.url}", f"launch.nnodes={nnodes}", f"checkpoint.dir={ckpt}",
            *RECORDING, *(f"supervisor.{k}={v}" for k, v in sup.items())]


def generations(run_dir: Path):
    return [e for e in events(run_dir) if e["event"] == "generation"]


def step_of(*run_dirs: Path) -> int:
    """The newest step any worker of these nodes has said it reached."""
    steps = [-1]
    for run_dir in run_dirs:
        for path in (run_dir / "heartbeats").glob("*"):
            rank = path.stem.rsplit("-", 1)[-1]
            beat = heartbeat(run_dir, int(rank)) if rank.isdigit() else None
            steps.append(beat["step"] if beat else -1)
    return max(steps)


def samples_by_step(node_dirs, per_generation):
    """Global step -> sorted sample ids, the last generation that trained a step winning
    (a step trained after the last snapshot of a generation is trained again by the next)."""
    steps = {}
    for number in sorted(per_generation):
        parts = per_generation[number]  # [(run_dir, attempt, rank, world, start)]
        world = parts[0][3]
        per_rank = GLOBAL_BATCH // world
        chunks = []
        for run_dir, attempt, rank, _, start_step in parts:
            ids = [int(x) for x in (run_dir / "samples" / f"attempt-{attempt}-rank-{rank}.txt")
                   .read_text().split()]
            chunks.append([ids[i * per_rank:(i + 1) * per_rank] for i in range(len(ids) // per_rank)])
        start_step = parts[0][4]
        for i in range(min(len(c) for c in chunks)):
            steps[start_step + i + 1] = sorted(x for c in chunks for x in c[i])
    return steps


def generation_parts(node_dirs):
    per_generation = {}
    for run_dir in node_dirs:
        evs = events(run_dir)
        for gen in (e for e in evs if e["event"] == "generation"):
            resumed = [e for e in evs if e["event"] == "resumed" and e["attempt"] == gen["attempt"]]
            start_step = resumed[0]["step"] if resumed else 0
            rank = gen["members"].index(gen["node_id"])
            per_generation.setdefault(gen["number"], []).append(
                (run_dir, gen["attempt"], rank, gen["world_size"], start_step))
    for parts in per_generation.values():
        parts.sort(key=lambda p: p[2])
    return per_generation


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    result = run(run_dir, *RECORDING, timeout=300, env={"PYTHONPATH": str(REPO / "tests")})
    assert result.returncode == 0, result.stdout[-5000:]
    ids = [int(x) for x in (run_dir / "samples" / "attempt-0-rank-0.txt").read_text().split()]
    return {s + 1: sorted(ids[s * GLOBAL_BATCH:(s + 1) * GLOBAL_BATCH]) for s in range(STEPS)}, \
        summary(run_dir)


def test_a_lost_node_then_back_two_one_two_nodes_same_samples(tmp_path, etcd, reference):
    want, reference_summary = reference
    ckpt, n0_dir, n1_dir = tmp_path / "ckpt", tmp_path / "n0", tmp_path / "n1"
    sets = elastic(etcd, ckpt)
    n0 = start(n0_dir, *sets, env=ENV)
    n1 = start(n1_dir, *sets, env=ENV)
    nodes = [n0, n1]
    try:
        wait_for(lambda: generations(n0_dir) and step_of(n0_dir, n1_dir) >= 30, 120, "2-node training")
        assert len(generations(n0_dir)[0]["members"]) == 2
        kill_node(n1_dir)
        killed_at = time.time()
        n1.communicate(timeout=30)
        wait_for(lambda: [e for e in events(n0_dir) if e["event"] == "node_lost"], 30, "node_lost")
        lost = [e for e in events(n0_dir) if e["event"] == "node_lost"][0]
        wait_for(lambda: len(generations(n0_dir)) >= 2, 60, "a 1-node generation")
        alone = generations(n0_dir)[1]
        assert alone["members"] == [generations(n0_dir)[0]["node_id"]] and alone["world_size"] == 1
        first_alone = step_of(n0_dir)
        wait_for(lambda: step_of(n0_dir) >= max(first_alone, 0) + 20, 120, "training alone")

        n1 = start(n1_dir, *sets, env=ENV)  # the node comes back
        nodes.append(n1)
        outputs = wait_all([n0, n1], timeout=300)
    finally:
        for p in nodes:
            if p.poll() is None:
                kill_node(n0_dir), kill_node(n1_dir)
                p.communicate(timeout=30)
    assert n0.returncode == 0 and n1.returncode == 0, outputs[0][-4000:] + outputs[1][-4000:]
    assert lost["how"] == "lease expired" and lost["time"] - killed_at <= TTL + 1 + 2, lost
    gens = generations(n0_dir)
    assert [len(g["members"]) for g in gens] == [2, 1, 2], gens
    kinds = [e["event"] for e in events(n0_dir)]
    assert "scaled_down" in kinds and "scaled_up" in kinds

    got = samples_by_step([n0_dir, n1_dir], generation_parts([n0_dir, n1_dir]))
    assert sorted(got) == list(range(1, STEPS + 1)) or set(range(1, STEPS + 1)) <= set(got)
    assert {s: got[s] for s in range(1, STEPS + 1)} == want, "the same samples at every global step"
    accuracy = summary(n0_dir)["eval"]["eval_acc"]  # node 0 leads the last generation
    assert accuracy > 0.85 and abs(accuracy - reference_summary["eval"]["eval_acc"]) < 0.03, \
        (accuracy, reference_summary["eval"])
    status = subprocess.run([sys.executable, "-m", "paddlerun.launcher.cli", "status", str(n0_dir),
                             "--json"], capture_output=True, text=True, timeout=60)
    shown = json.loads(status.stdout)["generation"]
    assert (len(shown["members"]), shown["changes"], shown["nodes_lost"]) == (2, 2, 1), shown
    assert_no_leftovers(n0_dir), assert_no_leftovers(n1_dir)


def test_etcd_killed_and_restarted_mid_run_loses_nothing(tmp_path, etcd):
    ckpt, n0_dir, n1_dir = tmp_path / "ckpt", tmp_path / "n0", tmp_path / "n1"
    sets = [*elastic(etcd, ckpt, nnodes="2"), "train.max_steps=150"]
    n0, n1 = start(n0_dir, *sets, env=ENV), start(n1_dir, *sets, env=ENV)
    try:
        wait_for(lambda: generations(n0_dir) and step_of(n0_dir, n1_dir) >= 20, 120, "2-node training")
        etcd.kill()
        at = step_of(n0_dir, n1_dir)
        wait_for(lambda: step_of(n0_dir, n1_dir) >= at + 10, 60, "training on while etcd is away")
        time.sleep(TTL + 1)  # longer than a lease
        etcd.start()
        outputs = wait_all([n0, n1], timeout=300)
    finally:
        for p, d in ((n0, n0_dir), (n1, n1_dir)):
            if p.poll() is None:
                kill_node(d)
                p.communicate(timeout=30)
    assert n0.returncode == 0 and n1.returncode == 0, outputs[0][-4000:] + outputs[1][-4000:]
    for run_dir in (n0_dir, n1_dir):
        assert len(generations(run_dir)) == 1, generations(run_dir)
        assert not [e for e in events(run_dir) if e["event"] in ("node_lost", "worker_failed")]
        assert summary(run_dir)["restarts"] == 0
    assert_no_leftovers(n0_dir), assert_no_leftovers(n1_dir)


@pytest.mark.skipif(netns_missing() is not None, reason=str(netns_missing()))
def test_a_node_cut_off_the_network_is_seen_lost_within_ttl_plus_one_second(tmp_path):
    """Node 1 runs in a network namespace of its own; taking its link down is a silent loss."""
    ns = Netns().open()
    server = None
    n0_dir, n1_dir = tmp_path / "n0", tmp_path / "n1"
    procs = []
    try:
        server = EtcdServer(tmp_path / "etcd", hosts=[ns.outer_ip]).start()
        sets = [*elastic(server, tmp_path / "ckpt"), "train.max_steps=100"]
        n0 = start(n0_dir, *sets, env=ENV)
        procs.append(n0)
        etcd = Etcd(endpoints(server))
        wait_for(lambda: etcd.get_prefix("/paddlerun/test/nodes/"), 60, "node 0 to join")
        n1 = subprocess.Popen(ns.inside(command(n1_dir, *sets)), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True,
                              env={**os.environ, **ENV})
        procs.append(n1)
        wait_for(lambda: generations(n0_dir) and step_of(n0_dir, n1_dir) >= 20, 120, "2-node training")
        first = generations(n0_dir)[0]
        assert len(first["members"]) == 2 and first["master"].startswith(ns.outer_ip), first
        ns.cut()
        cut_at = time.time()
        wait_for(lambda: [e for e in events(n0_dir) if e["event"] == "node_lost"], 30, "node_lost")
        lost = [e for e in events(n0_dir) if e["event"] == "node_lost"][0]
        out0 = wait(n0, 300)  # node 0 goes on alone (MIN 1) and finishes
    finally:
        kill_node(n0_dir), kill_node(n1_dir)
        for p in procs:
            if p.poll() is None:
                kill_session(p)
            p.communicate(timeout=30)
        if server is not None:
            server.stop()
        ns.close()
    assert lost["how"] == "lease expired", lost
    assert lost["time"] - cut_at <= TTL + 1, f"seen {lost['time'] - cut_at:.2f} s after the cut"
    assert n0.returncode == 0, out0[-4000:]
    assert [len(g["members"]) for g in generations(n0_dir)] == [2, 1]
    assert_no_leftovers(n0_dir), assert_no_leftovers(n1_dir)


def test_too_few_nodes_fail_once_naming_the_count_and_the_fix(tmp_path, etcd):
    """MIN 2, one node ever comes: one failure at the start timeout, not one per restart."""
    run_dir = tmp_path / "n0"
    result = run(run_dir, *elastic(etcd, tmp_path / "ckpt", nnodes="2:2"), "supervisor.start_timeout_s=6",
                 "supervisor.elastic_wait_s=1", timeout=120, env=ENV)
    assert result.returncode == 1, result.stdout[-4000:]
    assert "1 node(s) present, MIN is 2" in result.stdout, result.stdout[-4000:]
    assert "launch.nnodes" in result.stdout, result.stdout[-4000:]
    failed = [e for e in events(run_dir) if e["event"] == "worker_failed"]
    assert [e["kind"] for e in failed] == ["too_few_nodes"], failed
    assert [e["event"] for e in events(run_dir)].count("gave_up") == 1
    assert summary(run_dir)["root_cause"]["kind"] == "too_few_nodes"
    assert_no_leftovers(run_dir)
