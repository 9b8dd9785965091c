"""Plot the recovery bench: where the time goes from a SIGKILL to training again, per crash.

    python bench/plot_recovery.py                                   # bench/results/recovery_bench.json -> docs/recovery_timeline.png
    python bench/plot_recovery.py --json /tmp/recovery.json -o /tmp/recovery.png

One horizontal bar per crash of ``bench/recovery_bench.py``'s JSON, grouped by scenario,
split into its stages (all measured by that bench, seconds after the SIGKILL): detection
(SIGKILL -> ``worker_failed`` written), teardown (-> ``teardown``), backoff (-> next
``started``) and restart (-> first training step of the new attempt). Training time redone
(steps lost since the last snapshot x step time) is drawn hatched after it: with an
emergency snapshot it is 0. The dotted line is the median cold start of the same job.
Also prints the figures as a table. (Snapshot cost against size: bench/plot_snapshot_cost.py.)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
STAGES = [("detection_reported_s", "detection", "#d62728"), ("teardown_s", "teardown", "#ff7f0e"),
          ("backoff_s", "backoff", "#bcbd22"), ("restart_to_first_step_s", "restart to first step", "#1f77b4")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "recovery_bench.json"))
    parser.add_argument("-o", "--out", default=str(REPO / "docs" / "recovery_timeline.png"))
    args = parser.parse_args(argv)
    data = json.loads(Path(args.json).read_text())

    rows = [(name, r) for name, rounds in data["rounds"].items() for r in rounds]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.8), dpi=110)
    ticks, legend_redone = [], True
    for y, (name, r) in enumerate(rows):
        left = 0.0
        for key, label, color in STAGES:
            ax.barh(y, r[key], left=left, color=color, label=label if y == 0 else None)
            left += r[key]
        redone = r.get("time_redone_s") or 0.0
        if redone:
            ax.barh(y, redone, left=left, color="white", edgecolor="grey", hatch="///",
                    label="training time redone" if legend_redone else None)
            legend_redone = False
        ax.text(left + redone + 0.15, y, f"{left:.1f} s, {r['steps_redone']} steps redone",
                va="center", fontsize=8)
        ticks.append(f"{name}  kill @{r['killed_at_heartbeat_step']}")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(ticks, fontsize=8)
    ax.invert_yaxis()
    cold = statistics.median(r["cold_start_s"] for _, r in rows)
    ax.axvline(cold, color="black", linestyle=":", linewidth=1)
    ax.text(cold, len(rows) - 0.45, f" median cold start {cold:.1f} s", fontsize=8, va="top")
    ax.set_xlabel("seconds after SIGKILL")
    ax.set_title("paddlerun recovery: SIGKILL of a worker -> training again "
                 f"(LeNet/MNIST, 2 CPU workers, snapshot every {data['settings'][3].split('=')[1]} steps)",
                 fontsize=9)
    ax.set_xlim(0, max(sum(r[k] for k, _, _ in STAGES) + (r.get("time_redone_s") or 0) for _, r in rows) + 4)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(f"| scenario | kill step | {' | '.join(l for _, l, _ in STAGES)} | total | steps redone |")
    print("|---|---|" + "---|" * len(STAGES) + "---|---|")
    for name, r in rows:
        print(f"| {name} | {r['killed_at_heartbeat_step']} | "
              + " | ".join(f"{r[k]:.2f}" for k, _, _ in STAGES)
              + f" | {r['total_s']:.2f} | {r['steps_redone']} |")
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
