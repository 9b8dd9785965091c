"""The supervisor's watch on the cloud's preemption notice, and when to act on it.

A thread asks the metadata service every ``supervisor.spot_poll_s`` (GCP: a long poll)
and keeps the first notice. The supervisor's loop asks :meth:`SpotWatch.stop_at`:
not "at once", but the deadline less what stopping is measured to take, so that a
two-minute AWS notice costs a few seconds of training, not two minutes:

    stop_at = deadline - margin - 2 x (the last snapshot's capture + persist) - one agreement period

The workers see a stop request only at their agreement points, every
``train.log_every_steps`` steps (script mode: every 10); the time a step takes comes
from rank 0's last two ``metrics.jsonl`` lines. A notice whose deadline is already that close
stops the job at once. A SIGTERM that comes first still wins: it is handled before.

A metadata service that cannot be reached or answers out of protocol is a warning,
once; polling goes on (an endpoint that is wrong stays wrong, a busy one recovers).
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Optional

from paddlerun.cluster import spot_notice
from paddlerun.cluster.spot_notice import MetadataError, Notice
from paddlerun.trainer.rundir.config import SupervisorConfig
from paddlerun.trainer.rundir.events import read_events
from paddlerun.trainer.rundir.metrics import read_metrics

log = logging.getLogger("paddlerun.supervisor")


def resolve_provider(cfg: SupervisorConfig, dmi_dir: Path = Path("/sys/class/dmi/id")) -> Optional[str]:
    """The provider to watch, or None: ``none``, or ``auto`` off a cloud."""
    if cfg.spot_notice == "none":
        return None
    if cfg.spot_notice == "auto":
        return spot_notice.detect_provider(dmi_dir)
    return cfg.spot_notice


class SpotWatch:
    """One provider's notices, polled on a daemon thread; supervisor only."""

    def __init__(self, provider: str, cfg: SupervisorConfig):
        self.provider = provider
        self.client = spot_notice.client(provider, cfg.spot_endpoint)
        self.poll_s = cfg.spot_poll_s
        self.margin_s = cfg.spot_margin_s
        self.notice: Optional[Notice] = None
        self.seen_at: Optional[float] = None
        self._warned = False
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="paddlerun-spot-watch", daemon=True)

    def start(self) -> "SpotWatch":
        self._thread.start()
        return self

    def close(self) -> None:
        """Stops polling; a long poll in flight is left to its daemon thread."""
        self._closed.set()

    def _run(self) -> None:
        while not self._closed.is_set() and self.notice is None:
            began = time.monotonic()
            try:
                notice = self.client.poll(wait_s=self.poll_s)
            except MetadataError as e:
                notice = None
                if not self._warned:
                    self._warned = True
                    log.warning("cannot read the %s preemption notice (%s); training goes on, "
                                "and paddlerun keeps asking every %g s (supervisor.spot_notice: "
                                "none turns this off)", self.provider, e, self.poll_s)
            if notice is not None:
                self.seen_at = time.time()
                self.notice = notice
                return
            self._closed.wait(max(self.poll_s - (time.monotonic() - began), 0))

    def stop_at(self, run_dir: Path, agreement_steps: int) -> float:
        """When to ask the workers for their snapshot (unix time); call once a notice is seen."""
        return self.notice.deadline - self.lead_s(run_dir, agreement_steps)

    def lead_s(self, run_dir: Path, agreement_steps: int) -> float:
        """How long before the deadline to ask: the margin, twice the last snapshot's cost,
        and one agreement period (measured from this run's files)."""
        snapshot_s = 0.0
        for event in reversed(read_events(run_dir / "events.jsonl")):
            if event.get("event") == "snapshot_committed":
                snapshot_s = float(event.get("capture_s", 0)) + float(event.get("persist_s", 0))
                break
        step_s = 0.0
        last = read_metrics(run_dir / "metrics.jsonl")[-2:]
        try:
            (t0, s0), (t1, s1) = [(float(m["time"]), int(m["step"])) for m in last]
            step_s = max(t1 - t0, 0.0) / (s1 - s0) if s1 > s0 else 0.0
        except (KeyError, TypeError, ValueError):
            pass  # fewer than two lines, or not paddlerun's: no agreement period counted
        return self.margin_s + 2 * snapshot_s + step_s * agreement_steps

    def acknowledge(self) -> None:
        """After a clean stop (the snapshot is durable): Azure may take the VM now."""
        if self.notice is None or self.notice.event_id is None:
            return
        try:
            self.client.acknowledge(self.notice)
            log.info("acknowledged the %s preemption event %s", self.provider, self.notice.event_id)
        except MetadataError as e:
            log.warning("could not acknowledge the %s preemption event %s: %s", self.provider,
                        self.notice.event_id, e)
