"""``paddlerun status RUN_DIR [--json]``: what a run is doing, from its files alone.

Everything comes from the run directory (docs/architecture.md#the-run-directory), read-only:

- the state: the last supervisor event in ``events.jsonl`` (:data:`STATE_AFTER`), and
  whether the supervisor named in ``supervisor.json`` is still alive. A run whose last
  state is not final but whose supervisor is gone was killed (SIGKILL, OOM, reboot):
  running the same command again resumes it;
- attempts and restarts: the ``started`` and ``restarting`` events (every session of
  this run directory, so a rerun after a preemption counts on);
- each rank's last heartbeat (``heartbeats/rank-K.json``): pid, step, phase, ages, alive;
- the newest complete snapshot (manifest and sizes checked, not every sha256: that is
  ``paddlerun ckpt verify``), and how many due snapshots were skipped because the
  previous persist was still running (``snapshot_skipped`` events);
- the last train and eval lines of ``metrics.jsonl`` and ``summary.json``'s status.

Liveness is judged only on this host (pid and process start time, so a reused pid is
not mistaken for the supervisor); on another host it is "unknown".
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from paddlerun.cluster.slurm_status import line as slurm_line, slurm_status
from paddlerun.launcher import render
from paddlerun.launcher.usage import UsageError
from paddlerun.launcher.exit_codes import SUCCESS
from paddlerun.trainer.rundir.events import read_events
from paddlerun.trainer.rundir.heartbeat import read_heartbeats
from paddlerun.trainer.rundir.process_identity import ProcessIdentity

#: The supervisor's state after each event it writes (launcher/supervisor.py); the other
#: events (``teardown``, the workers' ``snapshot_committed``) do not change it.
STATE_AFTER = {
    "started": "running",
    "hang_detected": "failed",
    "worker_failed": "failed",
    "restarting": "restarting",
    "succeeded": "succeeded",
    "gave_up": "gave_up",
    "preempt_requested": "preempting",
    "preempted": "preempted",
}
FINAL_STATES = frozenset({"succeeded", "gave_up", "preempted"})
_RUN_DIR_ENTRIES = ("events.jsonl", "supervisor.json", "config.yaml", "heartbeats",
                    "metrics.jsonl", "summary.json", "logs")
#: How much of the end of metrics.jsonl is read for its last lines.
_TAIL_BYTES = 256 << 10


def run(args: argparse.Namespace) -> int:
    run_dir = check_run_dir(Path(args.run_dir))
    status = collect(run_dir, time.time())
    print(render.dumps(status) if args.json else human(status))
    return SUCCESS


def check_run_dir(run_dir: Path) -> Path:
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir} {'is not a directory' if run_dir.exists() else 'does not exist'}; "
                         f"give the run directory of a `paddlerun run` (its --run-dir)")
    if any((run_dir / name).exists() for name in _RUN_DIR_ENTRIES):
        return run_dir
    if run_dir.name == "checkpoints" or any(p.name.startswith("step-") for p in run_dir.iterdir()):
        raise UsageError(f"{run_dir} looks like a checkpoints directory; `paddlerun status` takes "
                         f"the run directory ({run_dir.parent}?); for snapshots use "
                         f"`paddlerun ckpt list {run_dir}`")
    raise UsageError(f"{run_dir} is not a run directory: it has none of "
                     f"{', '.join(_RUN_DIR_ENTRIES)}; give the --run-dir of a `paddlerun run`")


# ------------------------------------------------------------------ collecting


def collect(run_dir: Path, now: float) -> Dict[str, Any]:
    """Everything ``status --json`` prints."""
    events = read_events(run_dir / "events.jsonl")
    supervisor = supervisor_record(run_dir)
    state, since = last_state(events)
    started = [e for e in events if e.get("event") == "started"]
    interrupted = state not in FINAL_STATES and state != "not started" and \
        supervisor is not None and supervisor["alive"] is False
    return {
        "run_dir": os.path.abspath(run_dir),
        "time": now,
        "state": state,
        "state_since": since,
        "interrupted": interrupted,
        "supervisor": supervisor,
        "attempt": events[-1].get("attempt") if events else None,
        "attempts": len(started),
        "restarts": sum(1 for e in events if e.get("event") == "restarting"),
        "last_failure": last_failure(events),
        "preempt_notice": pending_notice(events),
        "resumed": last_resume(events),
        "ranks": [rank_status(hb, now) for _, hb in sorted(read_heartbeats(run_dir / "heartbeats").items())],
        "snapshot": newest_snapshot(run_dir),
        "snapshot_cost": snapshot_cost(events),
        "snapshots_skipped": snapshots_skipped(events),
        "metrics": last_metrics(run_dir / "metrics.jsonl"),
        "summary": summary_status(run_dir / "summary.json"),
        "slurm": slurm_status(events),
        "generation": last_generation(events),
    }


def last_generation(events: List[dict]) -> Optional[Dict[str, Any]]:
    """Elastic jobs: the generation this node runs in, and the nodes lost since the start."""
    generations = [e for e in events if e.get("event") == "generation"]
    if not generations:
        return None
    last = generations[-1]
    return {"number": last.get("number"), "members": last.get("members"),
            "world_size": last.get("world_size"), "node_id": last.get("node_id"),
            "master": last.get("master"), "since": last.get("time"),
            "changes": len(generations) - 1,
            "nodes_lost": sum(1 for e in events if e.get("event") == "node_lost")}


def last_state(events: List[dict]) -> tuple:
    """(state, unix time it was entered) after the last supervisor event."""
    for event in reversed(events):
        state = STATE_AFTER.get(event.get("event"))
        if state is not None:
            return state, event.get("time")
    return "not started", None


def supervisor_record(run_dir: Path) -> Optional[Dict[str, Any]]:
    """``supervisor.json`` ({host, pid, start_ticks, started}) and whether that process still lives."""
    try:
        record = json.loads((run_dir / "supervisor.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    host, pid, started = record.get("host"), record.get("pid"), record.get("started")
    return {"host": host, "pid": pid, "started": started,
            "alive": process_alive(host, pid, record.get("start_ticks"))}


def process_alive(host: Any, pid: Any, start_ticks: Any) -> Optional[bool]:
    """True / False for a process on this host; None when it cannot be told (another
    host; a record without start ticks, from an older paddlerun, whose pid is in use)."""
    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if host != socket.gethostname() or not whole(pid) or pid == 0:
        return None
    if whole(start_ticks):
        return ProcessIdentity(pid, start_ticks).alive()
    current = ProcessIdentity.of(pid)
    return None if current is not None and current.alive() else False


def last_failure(events: List[dict]) -> Optional[Dict[str, Any]]:
    for event in reversed(events):
        if event.get("event") == "worker_failed":
            return {"attempt": event.get("attempt"), "time": event.get("time"),
                    "kind": event.get("kind"), "rank": event.get("rank"), "cause": event.get("cause")}
    return None


def last_resume(events: List[dict]) -> Optional[Dict[str, Any]]:
    """Where the newest attempt that restored a snapshot started: which one, at what world size."""
    for event in reversed(events):
        if event.get("event") == "resumed":
            return {key: event.get(key) for key in
                    ("attempt", "snapshot", "step", "from_world_size", "to_world_size")}
    return None


def pending_notice(events: List[dict]) -> Optional[Dict[str, Any]]:
    """The cloud's preemption notice of the current attempt that the run has not yet acted
    on to the end (no ``preempted`` after it); None without one."""
    for event in reversed(events):
        if event.get("event") in ("preempted", "started"):
            return None
        if event.get("event") == "preempt_notice":
            return {key: event.get(key) for key in ("provider", "action", "deadline", "stop_at", "time")}
    return None


def rank_status(hb, now: float) -> Dict[str, Any]:
    alive = hb.identity.alive() if hb.host == socket.gethostname() else None
    return {"rank": hb.rank, "pid": hb.pid, "host": hb.host, "attempt": hb.attempt, "step": hb.step,
            "phase": hb.phase, "heartbeat_age_s": hb.age(now), "progress_age_s": hb.progress_age(now),
            "alive": alive}


def newest_snapshot(run_dir: Path) -> Optional[Dict[str, Any]]:
    from paddlerun.launcher.ckpt_cmd import configured_checkpoint_dir, list_snapshots

    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        directory = configured_checkpoint_dir(run_dir) or directory
    infos = list_snapshots(directory, verify=False)
    complete = [i for i in infos if i.complete]
    result = {"directory": os.path.abspath(directory), "count": len(infos),
              "bad": [{"name": i.path.name, "state": i.state.value, "problem": i.problem}
                      for i in infos if not i.complete]}
    if complete:
        newest = complete[-1]
        created = (newest.manifest or {}).get("created_unix", newest.mtime)
        result.update({"name": newest.path.name, "path": os.path.abspath(newest.path),
                       "step": newest.step, "epoch": (newest.manifest or {}).get("epoch"),
                       "created_unix": created, "reason": (newest.manifest or {}).get("reason")})
    return result


def snapshot_cost(events: List[dict]) -> Optional[Dict[str, Any]]:
    """What snapshots cost the run so far, from the ``snapshot_committed`` events: the median
    time the training thread was blocked (capture) and the median background persist."""
    timed = [e for e in events if e.get("event") == "snapshot_committed"
             and isinstance(e.get("capture_s"), (int, float)) and isinstance(e.get("persist_s"), (int, float))]
    if not timed:
        return None
    return {"count": len(timed),
            "capture_s_median": statistics.median(e["capture_s"] for e in timed),
            "persist_s_median": statistics.median(e["persist_s"] for e in timed)}


def snapshots_skipped(events: List[dict]) -> Dict[str, Any]:
    """Due snapshots not taken because the previous persist was still running (the workers'
    ``snapshot_skipped`` events): how many, and the last one's step and reason."""
    skipped = [e for e in events if e.get("event") == "snapshot_skipped"]
    last = skipped[-1] if skipped else {}
    return {"count": len(skipped), "last_step": last.get("step"), "last_reason": last.get("reason"),
            "last_in_flight_step": last.get("in_flight_step")}


def last_metrics(path: Path) -> Dict[str, Any]:
    """The last train line (it has "loss") and the last eval line ("eval_acc")."""
    train = evaluation = None
    for record in reversed(tail_records(path)):
        if train is None and "loss" in record:
            train = record
        if evaluation is None and "eval_acc" in record:
            evaluation = record
        if train is not None and evaluation is not None:
            break
    return {"train": train, "eval": evaluation}


def tail_records(path: Path, max_bytes: int = _TAIL_BYTES) -> List[dict]:
    """The JSON lines in the last ``max_bytes`` of ``path``; a partial first or torn last
    line (a writer mid-line) is skipped."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(size - max_bytes, 0))
            data = f.read()
    except OSError:
        return []
    lines = data.split(b"\n")
    if size > max_bytes:
        lines = lines[1:]
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def summary_status(path: Path) -> Optional[Dict[str, Any]]:
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict):
        return None
    keys = ("status", "global_steps", "attempts", "restarts", "digest", "eval", "root_cause")
    return {k: summary[k] for k in keys if k in summary}


# ------------------------------------------------------------------ printing


def human(s: Dict[str, Any]) -> str:
    now = s["time"]
    lines = [f"run {s['run_dir']}"]

    def row(label: str, text: str) -> None:
        lines.append(f"  {label:<10}{text}")

    row("state", _state_line(s, now))
    if s.get("slurm"):
        row("slurm", slurm_line(s["slurm"]))
    gen = s.get("generation")
    if gen:
        members = ", ".join(f"{m} (this node)" if m == gen["node_id"] else m for m in gen["members"])
        row("nodes", f"generation {gen['number']} since {render.age(gen['since'], now)}: "
                     f"{len(gen['members'])} node(s), {gen['world_size']} workers: {members}; "
                     f"{gen['changes']} change(s), {gen['nodes_lost']} node(s) lost")
    if s["interrupted"]:
        row("", "its supervisor is gone (killed? OOM? reboot?): run the same `paddlerun run` "
                "command again to resume from the newest snapshot")
    if s["attempts"]:
        row("attempt", f"{s['attempt']} ({s['attempts']} started, {s['restarts']} restart(s))")
    failure = s["last_failure"]
    if failure:
        rank = f" rank {failure['rank']}" if failure.get("rank") is not None else ""
        row("failure", f"attempt {failure['attempt']}, {render.age(failure['time'], now)}: "
                       f"{failure['kind']}{rank}: {failure['cause']}")
    notice = s["preempt_notice"]
    if notice:
        row("notice", f"{notice['provider']} preemption ({notice['action']}) seen "
                      f"{render.age(notice['time'], now)}: the machine goes at "
                      f"{render.local_time(notice['deadline'])}; snapshot and stop at "
                      f"{render.local_time(notice['stop_at'])}")
    resumed = s["resumed"]
    if resumed:
        sizes = resumed["to_world_size"] if resumed["from_world_size"] == resumed["to_world_size"] \
            else f"{resumed['from_world_size']} -> {resumed['to_world_size']} workers"
        row("resumed", f"attempt {resumed['attempt']} from {resumed['snapshot']} (step "
                       f"{resumed['step']}), {sizes}" + ("" if isinstance(sizes, str) else " workers"))
    row("snapshot", _snapshot_line(s["snapshot"], now))
    cost = s["snapshot_cost"]
    if cost:
        row("", f"{cost['count']} committed; training blocked {cost['capture_s_median'] * 1e3:.1f} ms "
                f"and persist {cost['persist_s_median'] * 1e3:.0f} ms each (medians)")
    skipped = s["snapshots_skipped"]
    if skipped["count"]:
        row("", f"{skipped['count']} skipped: the previous persist was still running (the last "
                f"at step {skipped['last_step']}, while step {skipped['last_in_flight_step']} "
                f"persisted); slow storage? see events.jsonl")
    row("metrics", _metrics_line(s["metrics"], now))
    summary = s["summary"]
    if summary:
        facts = [f"{summary[key]} {word}" for key, word in
                 (("global_steps", "steps"), ("attempts", "attempt(s)"), ("restarts", "restart(s)"))
                 if key in summary]
        if isinstance(summary.get("digest"), str):
            facts.append(f"digest {summary['digest'][:16]}...")
        row("summary", f"{summary.get('status', '?')}: {', '.join(facts)}")
    if s["ranks"]:
        lines.append("")
        lines.append(render.table(
            ["RANK", "PID", "HOST", "ATTEMPT", "STEP", "PHASE", "HEARTBEAT", "PROGRESS", "ALIVE"],
            [[r["rank"], r["pid"], r["host"], r["attempt"], r["step"], r["phase"],
              render.duration(r["heartbeat_age_s"]) + " ago", render.duration(r["progress_age_s"]) + " ago",
              {True: "yes", False: "no", None: "?"}[r["alive"]]] for r in s["ranks"]]))
    else:
        lines.append("  (no worker heartbeats)")
    return "\n".join(lines)


def _state_line(s: Dict[str, Any], now: float) -> str:
    text = s["state"]
    if s["state_since"] is not None:
        text += f" since {render.local_time(s['state_since'])} ({render.age(s['state_since'], now)})"
    sup = s["supervisor"]
    if sup is not None:
        alive = {True: "alive", False: "not running", None: "liveness unknown"}[sup["alive"]]
        text += f"; supervisor pid {sup['pid']} on {sup['host']}: {alive}"
    return text


def _snapshot_line(snap: Optional[Dict[str, Any]], now: float) -> str:
    if snap is None or "step" not in snap:
        text = f"no complete snapshot in {snap['directory']}" if snap else "no snapshot"
    else:
        text = (f"{snap['name']}: step {snap['step']}, {render.age(snap['created_unix'], now)}"
                f" ({snap['count']} in {snap['directory']})")
    if snap and snap["bad"]:
        bad = snap["bad"][-1]
        text += f"; {len(snap['bad'])} bad, e.g. {bad['name']} {bad['state']}: {bad['problem']}"
    return text


def _metrics_line(metrics: Dict[str, Any], now: float) -> str:
    train, evaluation = metrics["train"], metrics["eval"]
    if train is None and evaluation is None:
        return "none yet"
    parts = []
    if train is not None:
        parts.append(f"step {train.get('step')}: loss {render.number(train.get('loss'))}"
                     + (f", acc {render.number(train.get('acc'))}" if "acc" in train else "")
                     + f" (attempt {train.get('attempt', '?')}, {render.age(train.get('time'), now)})")
    if evaluation is not None:
        parts.append(f"eval at step {evaluation.get('step')}: acc {render.number(evaluation.get('eval_acc'))}"
                     f", loss {render.number(evaluation.get('eval_loss'))}")
    return "; ".join(parts)
