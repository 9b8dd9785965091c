"""``paddlerun plot RUN_DIR [-o FILE.png]``: the loss curve of a run, failures and restarts marked.

:func:`timeline` turns ``metrics.jsonl`` and ``events.jsonl`` into what is drawn (pure,
tested on its own); :func:`draw` draws it with matplotlib's Agg canvas.

- loss over global steps, one line per attempt (a restart rewinds to its snapshot, so
  the attempts overlap where work was redone); eval accuracy on a second axis;
- a red dashed line per failed attempt (``worker_failed`` / ``hang_detected``), at the
  last step that attempt logged before the failure;
- a green dotted line per restart (every ``started`` event but the first) at the step it
  resumed from: its ``resumed`` event's, else the newest ``snapshot_committed`` before it
  started (0 if none); its label says when the number of workers changed there.

matplotlib is an optional extra (``pip install 'paddlerun[plot]'``), imported only here.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from paddlerun.launcher.usage import UsageError
from paddlerun.launcher.exit_codes import FAILED, SUCCESS
from paddlerun.trainer.rundir.atomic_file import atomic_write
from paddlerun.trainer.rundir.events import read_events
from paddlerun.trainer.rundir.metrics import read_metrics

INSTALL_HINT = "pip install 'paddlerun[plot]'"


@dataclass(frozen=True)
class Marker:
    step: int
    attempt: Optional[int]
    label: str


@dataclass
class Timeline:
    #: attempt -> [(step, loss)] in file order
    loss: Dict[Optional[int], List[Tuple[int, float]]] = field(default_factory=dict)
    #: [(step, eval accuracy)]
    eval_acc: List[Tuple[int, float]] = field(default_factory=list)
    failures: List[Marker] = field(default_factory=list)
    resumes: List[Marker] = field(default_factory=list)


def run(args: argparse.Namespace) -> int:
    from paddlerun.launcher.status_cmd import check_run_dir

    run_dir = check_run_dir(Path(args.run_dir))
    canvas = _matplotlib()  # before any work: a missing extra is a usage problem (exit 2)
    output = Path(args.output) if args.output else run_dir / "plot.png"
    formats = canvas.get_supported_filetypes()
    if _format(output) not in formats:
        raise UsageError(f"-o {output}: cannot write {_format(output)!r} files; end the name with "
                         f"one of {', '.join('.' + f for f in sorted(formats))}")
    metrics = [m for m in read_metrics(run_dir / "metrics.jsonl") if isinstance(m, dict)]
    line = timeline(metrics, read_events(run_dir / "events.jsonl"))
    if not line.loss and not line.eval_acc:
        print(f"paddlerun plot: no metrics yet in {run_dir / 'metrics.jsonl'}; rank 0 writes a "
              f"line every train.log_every_steps steps", file=sys.stderr)
        return FAILED
    draw(line, output, title=str(run_dir), canvas=canvas)
    print(f"wrote {output}: {sum(len(v) for v in line.loss.values())} loss points over "
          f"{len(line.loss)} attempt(s), {len(line.failures)} failure(s), {len(line.resumes)} restart(s)")
    return SUCCESS


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        raise UsageError(f"paddlerun plot needs matplotlib, which is not installed: {INSTALL_HINT}") \
            from None
    return FigureCanvasAgg


def timeline(metrics: List[dict], events: List[dict]) -> Timeline:
    line = Timeline()
    for m in metrics:
        step = m.get("step")
        if not isinstance(step, int):
            continue
        if _number(m.get("loss")):
            line.loss.setdefault(m.get("attempt"), []).append((step, float(m["loss"])))
        if _number(m.get("eval_acc")):
            line.eval_acc.append((step, float(m["eval_acc"])))

    committed = [(e["time"], e["step"]) for e in events
                 if e.get("event") == "snapshot_committed" and _number(e.get("time"))
                 and isinstance(e.get("step"), int)]
    starts = [e for e in events if e.get("event") == "started"]
    resumed = {e.get("attempt"): e for e in events if e.get("event") == "resumed"}
    for start in starts[1:]:
        attempt = start.get("attempt")
        before = [step for t, step in committed if t <= start.get("time", math.inf)]
        step = max(before, default=0)
        label = f"attempt {attempt} resumed from step {step}"
        r = resumed.get(attempt)
        if r is not None and isinstance(r.get("step"), int):
            step, label = r["step"], f"attempt {attempt} resumed from step {r['step']}"
            if r.get("from_world_size") != r.get("to_world_size"):
                label += f" on {r.get('to_world_size')} workers (was {r.get('from_world_size')})"
        line.resumes.append(Marker(step, attempt, label))

    failed: Dict[Optional[int], dict] = {}
    for e in events:
        if e.get("event") in ("worker_failed", "hang_detected"):
            # One marker per failed attempt; a hang is reported as hang_detected, then worker_failed.
            kept = failed.setdefault(e.get("attempt"), e)
            if e.get("event") == "hang_detected":
                failed[e.get("attempt")] = {**kept, "kind": "hang"}
    for attempt, e in failed.items():
        step = _failure_step(e, line.loss.get(attempt, []), metrics, line.resumes)
        line.failures.append(Marker(step, attempt, f"attempt {attempt} failed: {e.get('kind', e['event'])}"))
    return line


def _failure_step(event: dict, losses: List[Tuple[int, float]], metrics: List[dict],
                  resumes: List[Marker]) -> int:
    """The last step the failed attempt logged before the failure (or the step it resumed from)."""
    if isinstance(event.get("step"), int):
        return event["step"]
    attempt, when = event.get("attempt"), event.get("time", math.inf)
    logged = [m["step"] for m in metrics if m.get("attempt") == attempt and isinstance(m.get("step"), int)
              and m.get("time", -math.inf) <= when]
    if logged:
        return max(logged)
    resumed = [r.step for r in resumes if r.attempt == attempt]
    return resumed[-1] if resumed else 0


def _format(output: Path) -> str:
    return output.suffix[1:].lower() or "png"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def draw(line: Timeline, output: Path, title: str, canvas=None) -> None:
    """Render ``line`` to ``output`` (format from its suffix, default PNG), atomically."""
    canvas = canvas or _matplotlib()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 5), dpi=100)
    canvas(fig)
    ax = fig.add_subplot(1, 1, 1)
    handles = []
    for i, (attempt, points) in enumerate(sorted(line.loss.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))):
        steps, values = zip(*points)
        label = "loss" if len(line.loss) == 1 else f"loss, attempt {attempt}"
        handles += ax.plot(steps, values, color=f"C{i % 10}", lw=1.5, label=label)
    ax.set_xlabel("global step")
    ax.set_ylabel("train loss")
    if line.eval_acc:
        ax2 = ax.twinx()
        steps, values = zip(*line.eval_acc)
        handles += ax2.plot(steps, values, "ko", ms=5, label="eval accuracy")
        ax2.set_ylabel("eval accuracy")
        ax2.set_ylim(0, 1.05)
    for marker in line.failures:
        ax.axvline(marker.step, color="red", ls="--", lw=1)
        ax.annotate(marker.label, (marker.step, 1), xycoords=("data", "axes fraction"), rotation=90,
                    va="top", ha="right", fontsize=8, color="red")
    for marker in line.resumes:
        ax.axvline(marker.step, color="green", ls=":", lw=1.5)
        ax.annotate(marker.label, (marker.step, 0), xycoords=("data", "axes fraction"), rotation=90,
                    va="bottom", ha="left", fontsize=8, color="green")
    if line.failures:
        handles.append(ax.axvline(math.nan, color="red", ls="--", lw=1, label="failure"))
    if line.resumes:
        handles.append(ax.axvline(math.nan, color="green", ls=":", lw=1.5, label="restart: resumed from"))
    # Below the plot: inside it, the legend would hide the markers' labels.
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.12),
              ncol=min(len(handles), 5), fontsize=8, frameon=False)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fmt = _format(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(output, durable=False) as f:  # a picture: redrawn at will
        fig.savefig(f, format=fmt)
