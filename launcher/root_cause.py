"""Find the root cause of a failed attempt and report it, root cause first.

Sources, most telling first: a worker's own error file (its traceback); what the
supervisor saw (a worker that vanished, a stale heartbeat); the launcher's report
(``Container rank K status failed ... code C``); the last lines of the worker's log.
A collective error in a survivor ("Connection reset by peer") is a consequence of
a peer's death, so it is the root cause only when nothing else explains the failure.
"""
from __future__ import annotations

import re
import signal
import socket
import time
from pathlib import Path
from typing import Dict, Mapping, Optional

from paddlerun.launcher.console_log import tail_lines
from paddlerun.launcher.process_tree import describe_exit
from paddlerun.launcher.restart_policy import Failure, FailureKind
from paddlerun.trainer.rundir.errors import ErrorRecord, peer_failure_in_log, read_errors
from paddlerun.trainer.rundir.heartbeat import NO_HEARTBEAT

_CONTAINER_FAILED = re.compile(r"Container rank (\d+) status failed .*? code (-?\d+)")
LOG_TAIL_LINES = 20


def diagnose(detected: FailureKind, run_dir: Path, attempt: int, log_dir: Path, beats: Mapping,
             returncode: Optional[int] = None, dead: Optional[Dict[int, Optional[int]]] = None,
             reasons: Optional[Dict[int, str]] = None, noticed_at: Optional[float] = None,
             first_rank: int = 0) -> Failure:
    """``detected``: what the supervisor saw (LAUNCH_EXIT, WORKER_DIED or HANG); the root
    cause may be another kind (a worker that died of an exception is an ERROR).
    ``dead``: rank -> return code (None if unknown) of workers seen dead.

    ``first_rank``: the global rank of this node's local rank 0. Paddle's launcher
    numbers its workers' logs and its reports per node (``workerlog.0`` is local rank 0).
    """
    detected = FailureKind(detected)
    now = noticed_at or time.time()
    dead = dead or {}
    progressed = any(hb.phase != "init" for hb in beats.values())
    errors = read_errors(run_dir, attempt)
    primary = sorted((e for e in errors.values() if not e.peer_failure), key=lambda e: e.time)
    secondary = sorted((e for e in errors.values() if e.peer_failure), key=lambda e: e.time)
    launcher_codes = {first_rank + r: code for r, code in launcher_reports(log_dir / "launch.log").items()}

    def worker_log(rank: int) -> Path:
        return log_dir / f"workerlog.{rank - first_rank}"

    def from_error(e: ErrorRecord) -> Failure:
        return Failure(attempt, now, FailureKind.ERROR, f"{e.type}: {e.message}", rank=e.rank,
                       pid=e.pid, host=e.host, detail=e.traceback, retriable=e.retriable,
                       progressed=progressed, error_type=e.type)

    def from_rank(kind: FailureKind, rank: int, cause: str, code: Optional[int] = None) -> Failure:
        hb = beats.get(rank)
        return Failure(attempt, now, kind, cause, rank=rank, pid=hb.pid if hb else None,
                       host=hb.host if hb else socket.gethostname(),
                       detail=log_tail(worker_log(rank)), progressed=progressed, exit_code=code)

    if primary:
        return from_error(primary[0])
    if detected is FailureKind.HANG and reasons:
        # A rank whose heartbeat stopped (dead, SIGSTOPped) over one merely waiting on it.
        rank = min(reasons, key=lambda r: (not reasons[r].startswith(NO_HEARTBEAT), r))
        return from_rank(FailureKind.HANG, rank, f"rank {rank} hung: {reasons[rank]}")
    killed = {r: code for r, code in launcher_codes.items() if code < 0}
    if dead or killed:
        candidates = {**killed, **{r: c if c is not None else killed.get(r) for r, c in dead.items()}}
        rank = min(candidates, key=lambda r: (died_of_peer(worker_log(r), candidates[r]), r))
        code = candidates[rank]
        how = describe_exit(code) if code is not None else "died (its exit status was not seen)"
        return from_rank(FailureKind.WORKER_DIED, rank, f"rank {rank} {how}", code)
    if launcher_codes:
        rank = min(launcher_codes)
        return from_rank(FailureKind.WORKER_EXIT, rank,
                         f"rank {rank} {describe_exit(launcher_codes[rank])}", launcher_codes[rank])
    if secondary:
        return from_error(secondary[0])
    what = describe_exit(returncode) if returncode is not None else "stopped"
    return Failure(attempt, now, FailureKind.LAUNCH_EXIT, f"the launch process {what}",
                   host=socket.gethostname(), detail=log_tail(log_dir / "launch.log"),
                   progressed=progressed, exit_code=returncode)


def peer_missing(attempt: int, missing, nnodes: int, node_rank: int, master: str,
                 waited_s: float) -> Failure:
    """A fixed-size job's node that never joined the rendezvous (:mod:`missing_nodes`): the
    nodes it names, and how to start them or to run without them."""
    several = len(missing.nodes) > 1
    nodes = f"node{'s' if several else ''} {', '.join(map(str, missing.nodes))}"
    cause = (f"{nodes} of {nnodes} never joined: node {node_rank} waited for "
             f"{'them' if several else 'it'} at the master {master} for {waited_s:.0f} s "
             f"(supervisor.start_timeout_s)")
    if not missing.master_answered:
        cause += " (the master did not answer: some of them may have started and wait too)"
    fix = (f"fix: start {nodes} with the same launch.master={master} and "
           f"launch.nnodes={nnodes} (a restart here would only wait for it again), or use "
           f"launch.rendezvous for nodes that may come and go (docs/elastic.md)")
    return Failure(attempt, time.time(), FailureKind.PEER_MISSING, cause, host=socket.gethostname(),
                   detail=fix, retriable=False, progressed=False)


def died_of_peer(worker_log: Path, code: Optional[int]) -> bool:
    """A worker that aborted because a collective lost its peer: gloo throws through C++
    (``gloo::TimeoutException``, SIGABRT). A consequence, not the root cause."""
    return code == -signal.SIGABRT or peer_failure_in_log(log_tail(worker_log, lines=40))


def launcher_reports(path: Path) -> Dict[int, int]:
    """rank -> exit code, from paddle.distributed.launch's 'Container ... failed' lines."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return {}
    return {int(m.group(1)): int(m.group(2)) for m in _CONTAINER_FAILED.finditer(text)}


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(tail_lines(path, 16384)[-lines:])


def report(f: Failure) -> str:
    """The root cause first: time, host, rank, pid, cause; then the traceback or log tail."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(f.time))
    who = ", ".join(x for x in (f"host {f.host}" if f.host else "",
                                f"rank {f.rank}" if f.rank is not None else "",
                                f"pid {f.pid}" if f.pid else "") if x)
    lines = [f"paddlerun: attempt {f.attempt} failed at {when}" + (f" ({who})" if who else ""),
             f"  root cause: {f.cause}"]
    if f.detail:
        lines.append("  " + "\n  ".join(f.detail.rstrip().splitlines()[-LOG_TAIL_LINES:]))
    return "\n".join(lines)
