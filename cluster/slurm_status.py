"""The Slurm part of ``paddlerun status``: the job a run directory belongs to, its state
and how often it was requeued, from the events' ``slurm_*`` fields and, where Slurm's
commands answer, from ``scontrol show job`` (a job Slurm has forgotten shows its last
state seen in the events only)."""
from __future__ import annotations

import subprocess
from typing import Any, Dict, List, Optional

SCONTROL_TIMEOUT_S = 5


def slurm_status(events: List[dict]) -> Optional[Dict[str, Any]]:
    """``{job_id, state, restart_count, reason}`` of the newest Slurm job in ``events``."""
    tagged = [e for e in events if isinstance(e.get("slurm_job_id"), int)]
    if not tagged:
        return None
    job_id = tagged[-1]["slurm_job_id"]
    restart_count = max(e.get("slurm_restart_count", 0) for e in tagged if e["slurm_job_id"] == job_id)
    record = {"job_id": job_id, "state": None, "restart_count": restart_count, "reason": None}
    info = show_job(job_id)
    if info:
        record["state"] = info.get("JobState")
        record["reason"] = info.get("Reason") if info.get("Reason") not in (None, "None") else None
        if info.get("Restarts", "").isdigit():
            record["restart_count"] = int(info["Restarts"])
    return record


def show_job(job_id: int) -> Dict[str, str]:
    """``scontrol show job -o`` as a dict; {} when Slurm cannot say (no client, job gone)."""
    try:
        proc = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True,
                              text=True, timeout=SCONTROL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if proc.returncode != 0:
        return {}
    return dict(item.split("=", 1) for item in proc.stdout.split() if "=" in item)


def line(record: Dict[str, Any]) -> str:
    state = record["state"] or "unknown to Slurm now"
    reason = f" ({record['reason']})" if record.get("reason") else ""
    return f"job {record['job_id']}: {state}{reason}, requeued {record['restart_count']} time(s)"
