"""Plot snapshot cost against the size of the state, from a multi-size checkpoint bench.

    python bench/checkpoint_bench.py --mb 10 100 1000 --json bench/results/checkpoint_scaling.json
    python bench/plot_snapshot_cost.py            # that JSON -> docs/snapshot_cost.png
    python bench/plot_snapshot_cost.py --json /tmp/ckpt.json -o /tmp/snapshot_cost.png

Log-log, one point per size (median over the bench's rounds, bars min to max): the time
the training thread is blocked by paddlerun's async save, paddlerun's whole persist
(write, fsync, sha256, manifest, rename) running behind it, a durable ``paddle.save``
(+ fsync) of the same state, and a raw sequential write + fsync of the same bytes. A
dotted line of slope 1 through each series' largest point shows how close to linear it
grows. Also prints the figures as a table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MB = 1e6
SERIES = [("async_blocked_s", "training thread blocked (async save)", "#d62728", "o"),
          ("persist_s", "paddlerun persist, in the background", "#1f77b4", "s"),
          ("paddle_save_fsync_s", "paddle.save + fsync (synchronous)", "#7f7f7f", "^"),
          ("raw_write_fsync_s", "raw write + fsync of the same bytes", "#2ca02c", "v")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "checkpoint_scaling.json"))
    parser.add_argument("-o", "--out", default=str(REPO / "docs" / "snapshot_cost.png"))
    args = parser.parse_args(argv)
    data = json.loads(Path(args.json).read_text())
    results = sorted(data["results"], key=lambda r: r["state_bytes"])
    if len(results) < 2:
        sys.exit(f"{args.json} holds {len(results)} size(s); run checkpoint_bench.py with several --mb")

    sizes = [r["state_bytes"] / MB for r in results]
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=110)
    for key, label, color, marker in SERIES:
        med = [r["median"][key] * 1e3 for r in results]
        low = [m - r["min"][key] * 1e3 for m, r in zip(med, results)]
        high = [r["max"][key] * 1e3 - m for m, r in zip(med, results)]
        ax.errorbar(sizes, med, yerr=[low, high], color=color, marker=marker, capsize=3, label=label)
        ax.plot([sizes[0], sizes[-1]], [med[-1] * sizes[0] / sizes[-1], med[-1]], color=color,
                linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("snapshot size: parameters + Adam moments (MB)")
    ax.set_ylabel("milliseconds")
    m = data["machine"]
    ax.set_title(f"Snapshot cost against size ({m['nproc']} CPUs, paddle {m['paddle']}; "
                 "dotted: linear)", fontsize=9)
    ax.grid(which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)

    print("| state MB | " + " | ".join(label for _, label, _, _ in SERIES) + " | blocked / paddle.save+fsync |")
    print("|---|" + "---|" * len(SERIES) + "---|")
    for size, r in zip(sizes, results):
        med = r["median"]
        print(f"| {size:.0f} | " + " | ".join(f"{med[k] * 1e3:.0f} ms" for k, _, _, _ in SERIES)
              + f" | {med['async_blocked_s'] / med['paddle_save_fsync_s']:.2f} |")
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
