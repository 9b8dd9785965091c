"""Running the real ``paddlerun`` command in tests, and proving nothing is left behind."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

import psutil

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "configs" / "mnist_lenet.yaml")

#: Small and quick, yet several epochs' worth of real steps (63 steps per epoch).
FAST = ["job.name=test", "train.log_every_steps=5", "checkpoint.every_steps=10",
        "supervisor.heartbeat_interval_s=0.25", "supervisor.hang_timeout_s=15",
        "supervisor.backoff_s=0.2", "supervisor.preempt_grace_s=30"]


def command(run_dir: Path, *sets: str, config: str = CONFIG) -> List[str]:
    argv = [sys.executable, "-m", "paddlerun.launcher.cli", "run", config, "--run-dir", str(run_dir)]
    for item in (*FAST, *sets):
        argv += ["--set", item]
    return argv


def run(run_dir: Path, *sets: str, timeout: float = 300, env=None) -> subprocess.CompletedProcess:
    """Run to the end; on timeout kill the whole session and fail."""
    proc = start(run_dir, *sets, env=env)
    out = wait(proc, timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def wait(proc: subprocess.Popen, timeout: float = 300) -> str:
    """Wait for a started supervisor and return its output; on timeout kill its run and fail."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_run(proc)
        out, _ = proc.communicate(timeout=30)
        raise AssertionError(f"paddlerun did not finish in {timeout} s:\n{out[-5000:]}")
    return out


def start(run_dir: Path, *sets: str, env=None) -> subprocess.Popen:
    """The supervisor in its own session (so a test can signal it like a scheduler would)."""
    return subprocess.Popen(command(run_dir, *sets), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, **(env or {})})


def reference_digest(tmp_path_factory, *sets: str, env=None) -> str:
    """The final digest of an uninterrupted run with ``sets``: what a faulted run must end with."""
    run_dir = tmp_path_factory.mktemp("reference")
    result = run(run_dir, *sets, env=env)
    assert result.returncode == 0, result.stdout[-5000:]
    return summary(run_dir)["digest"]


def free_port() -> int:
    """A port the kernel says is free now (for a rendezvous master on 127.0.0.1)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_all(nodes: List[subprocess.Popen], timeout: float = 300) -> List[str]:
    """Every node's output; whatever happens, no node is left running (a node whose peer
    failed would wait for it in the rendezvous forever)."""
    try:
        return [wait(p, timeout) for p in nodes]
    except BaseException:
        # Every node's run, also of one whose supervisor is gone: its launcher may still
        # wait in the rendezvous for the node that failed.
        for p in nodes:
            kill_run(p)
            p.communicate(timeout=30)
        raise


def kill_session(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_dir_of(proc: subprocess.Popen) -> Optional[Path]:
    """The ``--run-dir`` of a ``paddlerun run`` command (None if it names none)."""
    args = [str(a) for a in proc.args]
    return Path(args[args.index("--run-dir") + 1]) if "--run-dir" in args[:-1] else None


def kill_run(proc: subprocess.Popen) -> None:
    """SIGKILL a supervisor's session and every process of its run directory: the launcher
    and the workers each have a session of their own (:func:`kill_node`)."""
    kill_session(proc)
    run_dir = run_dir_of(proc)
    if run_dir is not None:
        kill_node(run_dir)


@contextlib.contextmanager
def killed_on_error(proc: subprocess.Popen):
    """Any error inside (a failed wait or assertion, a timeout, Ctrl-C) kills the supervisor's
    whole run (:func:`kill_run`) and reaps it before the error goes on: a failing test leaves
    nothing running."""
    try:
        yield proc
    except BaseException:
        kill_run(proc)
        proc.communicate(timeout=30)
        raise


def processes_of(run_dir: Path) -> List[psutil.Process]:
    """Every live process whose command line names the run directory (supervisor, launch, workers)."""
    found = []
    needle = str(run_dir)
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any(needle in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def kill_node(run_dir: Path) -> None:
    """SIGKILL every process of a run directory at once (supervisor, launcher, workers, in
    sessions of their own): a node lost whole."""
    for proc in processes_of(run_dir):
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass


def assert_no_leftovers(run_dir: Path, timeout: float = 15) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        left = processes_of(run_dir)
        if not left:
            return
        time.sleep(0.2)
    details = [(p.pid, " ".join(p.cmdline())[:120]) for p in left]
    for p in left:  # do not leave them to the next test either
        try:
            p.kill()
        except psutil.Error:
            pass
    raise AssertionError(f"processes of {run_dir} still alive: {details}")


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def events(run_dir: Path) -> List[dict]:
    from paddlerun.trainer.rundir.events import read_events
    return read_events(run_dir / "events.jsonl")


def heartbeat(run_dir: Path, rank: int) -> Optional[dict]:
    try:
        return json.loads((run_dir / "heartbeats" / f"rank-{rank}.json").read_text())
    except (OSError, ValueError):
        return None


def worker_digests(run_dir: Path, attempt: int = 0) -> dict:
    """rank -> the digest each worker logged at its end."""
    digests = {}
    for log in sorted((run_dir / "logs" / f"attempt-{attempt}").glob("workerlog.*")):
        for line in log.read_text(errors="replace").splitlines():
            if "digest " in line and "steps, digest" in line:
                digests[int(log.name.split(".")[1])] = line.rsplit("digest ", 1)[1].strip()
    return digests
