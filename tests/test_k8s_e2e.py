"""The pods of a rendered Indexed Job, run on this machine with the manifest's own environment.

tests/k8s_pod.py starts a pod's command as Kubernetes would (env, index, volumes, $(VAR)
expansion); the cluster DNS is the one stand-in: pod 0's name through the Service is
rewritten to ``localhost`` in the pods' environment -- still a name, which resolves to
127.0.0.1 here as the Service's name resolves to pod 0's IP in a cluster (Paddle's
launcher treats a name differently from 127.0.0.1: cluster/k8s_env.py).
``JobController`` plays the Job controller: a pod that exits 75 is replaced by a new pod
of the same index (the manifest's podFailurePolicy ignores that exit code); any other
failure fails the test.
"""
import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from helpers import (CONFIG, FAST, assert_no_leftovers, events, heartbeat, kill_session, run, summary,
                     wait_for, worker_digests)
from k8s_pod import LocalPods, objects
from helpers import free_port

from paddlerun.cluster import k8s_env
from paddlerun.launcher.cli import main as paddlerun
from paddlerun.launcher.exit_codes import REQUEUE

pytestmark = pytest.mark.slow

NODES = 2
#: Under one epoch (63 steps): no epoch-end evaluation to wait for.
STEPS = 60
#: Replacements per index before the test calls it a loop.
MAX_REPLACEMENTS = 3


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The digest of one node of two workers that was never interrupted."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    out = run(run_dir, f"train.max_steps={STEPS}")
    assert out.returncode == 0, out.stdout[-3000:]
    return summary(run_dir)["digest"]


def render(tmp_path: Path, *sets: str) -> str:
    path = tmp_path / "job.yaml"
    argv = ["k8s", "render", CONFIG, "--nodes", str(NODES), "--image", "paddlerun:test",
            "--pvc", "shared", "--master-port", str(free_port()), "-o", str(path)]
    for item in (*FAST, "launch.nproc_per_node=1", f"train.max_steps={STEPS}", *sets):
        argv += ["--set", item]
    assert paddlerun(argv) == 0
    return path.read_text()


def local_pods(manifest: str, tmp_path: Path) -> LocalPods:
    """The pods, with pod 0's DNS name (as the manifest gives it) standing for this machine."""
    env = {e["name"]: e["value"] for e in
           objects(manifest)["Job"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    host = env[k8s_env.MASTER].rpartition(":")[0]
    assert host == "test-0.test"  # <job>-<index 0>.<headless Service>
    return LocalPods(manifest, tmp_path, dns={host: "localhost"})


def node_dir(run_dir: Path) -> Path:
    """Where a pod's supervisor keeps its logs: its run directory, or ``nodes/node-K``
    inside it where one run directory may be shared by the nodes of a job."""
    found = [logs.parent for logs in run_dir.glob("**/logs")]
    assert len(found) == 1, found
    return found[0]


class JobController:
    """Keeps one pod per index until it exits 0; replaces a pod that exits 75."""

    def __init__(self, pods: LocalPods, logs: Path):
        self.pods, self.logs = pods, logs
        self.running = {}
        self.exits = {index: [] for index in range(NODES)}  # index -> [(code, when)]

    def __enter__(self):
        for index in range(NODES):
            self._start(index)
        return self

    def __exit__(self, *exc):
        for proc in self.running.values():  # a failed test leaves nothing running
            kill_session(proc)
            proc.wait(30)

    def _start(self, index: int) -> None:
        log = self.logs / f"pod-{index}.{len(self.exits[index])}.log"
        self.running[index] = self.pods.start(index, log)

    def poll(self) -> bool:
        """True once every index has succeeded."""
        for index, proc in list(self.running.items()):
            code = proc.poll()
            if code is None:
                continue
            self.exits[index].append((code, time.time()))
            del self.running[index]
            log = (self.logs / f"pod-{index}.{len(self.exits[index]) - 1}.log").read_text()
            assert code in (0, REQUEUE), f"pod {index} exited {code}:\n{log[-4000:]}"
            if code == REQUEUE:
                assert len(self.exits[index]) <= MAX_REPLACEMENTS, self.exits
                self._start(index)
        return not self.running

    def wait(self, timeout: float) -> None:
        wait_for(self.poll, timeout, "every pod of the job to succeed", interval=0.2)

    def codes(self):
        return {index: [code for code, _ in exits] for index, exits in self.exits.items()}


def test_two_pods_find_their_place_and_train_like_one_node_of_two_workers(tmp_path, reference):
    manifest = render(tmp_path)
    with JobController(local_pods(manifest, tmp_path), tmp_path) as job:
        job.wait(300)
    assert job.codes() == {0: [0], 1: [0]}
    shared = tmp_path / "pvc" / "shared" / "test"
    port = job.pods.command(0)[1][k8s_env.MASTER].rpartition(":")[2]
    for index in range(NODES):  # each supervisor's resolved config: its place, from the environment
        launch = yaml.safe_load((shared / f"pod-{index}" / "config.yaml").read_text())["launch"]
        host = "127.0.0.1" if index == 0 else "localhost"  # pod 0 serves the rendezvous itself
        placed = (launch["nnodes"], launch["node_rank"], launch["master"])
        assert placed == (NODES, index, f"{host}:{port}")
    assert summary(shared / "pod-0")["digest"] == reference
    assert worker_digests(node_dir(shared / "pod-1")) == {0: reference}
    assert (shared / "checkpoints" / f"step-{STEPS:08d}" / "manifest.json").is_file()
    assert_no_leftovers(tmp_path)


@pytest.mark.parametrize("signalled", [(0, 1), (0,), (1,)],
                         ids=["all-pods", "pod-0", "pod-1"])
def test_preempted_pods_exit_75_within_the_grace_and_their_replacements_resume(tmp_path, reference,
                                                                               signalled):
    """SIGTERM to every pod (Kueue or the scheduler preempts the workload, its nodes are
    drained) or to one (one node drained or reclaimed): every pod snapshots and exits 75
    within terminationGracePeriodSeconds -- the job cannot go on without a node -- and the
    replacement pods (the same command again) resume to the uninterrupted digest."""
    manifest = render(tmp_path)
    grace = objects(manifest)["Job"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    shared = tmp_path / "pvc" / "shared" / "test"
    with JobController(local_pods(manifest, tmp_path), tmp_path) as job:
        def training():
            job.poll()
            steps = [(heartbeat(shared / f"pod-{i}", i) or {}).get("step", 0) for i in range(NODES)]
            return min(steps) >= 10
        wait_for(training, 240, "both pods to pass step 10")
        signalled_at = time.time()
        for index in signalled:  # the kubelet signals the container's PID 1
            os.kill(job.running[index].pid, signal.SIGTERM)
        job.wait(300)
    codes = job.codes()
    assert codes == {0: [REQUEUE, 0], 1: [REQUEUE, 0]}, codes
    for index in range(NODES):
        assert job.exits[index][0][1] - signalled_at < grace, (index, job.exits[index])
        names = [e["event"] for e in events(shared / f"pod-{index}")]
        assert "preempted" in names and names[-1] == "succeeded", names
    # The replacements resumed from the snapshot the preempted pods took, not from step 0.
    (stopped_at,) = [e["step"] for e in events(shared / "pod-0")
                     if e["event"] == "snapshot_committed" and e["reason"] == "preempted"]
    assert 10 <= stopped_at < STEPS
    for index in range(NODES):
        log = (node_dir(shared / f"pod-{index}") / "logs" / "attempt-1" / "workerlog.0").read_text()
        assert f"resumed from {shared / 'checkpoints' / f'step-{stopped_at:08d}'}" in log, log[-3000:]
    assert summary(shared / "pod-0")["digest"] == reference
    assert worker_digests(node_dir(shared / "pod-1"), attempt=1) == {0: reference}
    assert_no_leftovers(tmp_path)
