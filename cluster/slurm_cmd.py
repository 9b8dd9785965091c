"""``paddlerun slurm submit|script CONFIG --nodes N ...``: a multi-node job on Slurm.

``script`` prints the batch script (cluster/slurm_script.py); ``submit`` also writes it
to ``RUN_DIR/slurm-job.sh``, runs ``sbatch`` on it and prints the job id last on its
line. The config is checked first (bad config or usage: exit 2, nothing submitted).
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import List

from paddlerun.launcher.exit_codes import FAILED, SUCCESS
from paddlerun.launcher.usage import UsageError

SCRIPT_NAME = "slurm-job.sh"
SBATCH_TIMEOUT_S = 60


def add_parser(sub) -> None:
    slurm = sub.add_parser("slurm", help="run a job on several nodes through Slurm",
                           description="Write (script) or submit (submit) an sbatch script that "
                                       "runs one supervisor per node and requeues the job after "
                                       "a time-limit warning, a preemption or a lost node. "
                                       "See docs/slurm.md.")
    commands = slurm.add_subparsers(dest="slurm_command", required=True, metavar="{submit,script}")
    for name, help_text in (("submit", "write the batch script into the run dir and sbatch it; "
                                       "prints the job id"),
                            ("script", "print the batch script without submitting it")):
        p = commands.add_parser(name, help=help_text,
                                usage=f"paddlerun slurm {name} CONFIG --nodes N [options] "
                                      f"[-- EXTRA_SBATCH_FLAGS]")
        p.add_argument("config", help="a YAML file or a shipped config's name")
        p.add_argument("--nodes", type=int, required=True, help="nodes (one supervisor each)")
        p.add_argument("--gpus-per-node", type=int, help="sbatch --gpus-per-node")
        p.add_argument("--time", help="sbatch --time (e.g. 04:00:00)")
        p.add_argument("--partition", help="sbatch --partition")
        p.add_argument("--run-dir", help="on a file system every node sees; default: "
                                         "job.run_dir, else runs/<job.name>")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key (repeatable)")
        p.set_defaults(handler=run)


def run(args, extra_sbatch: List[str]) -> int:
    from paddlerun.cluster.slurm_script import BatchJob, render, warning_seconds
    from paddlerun.launcher.cli import find_config
    from paddlerun.launcher.status_cmd import snapshot_cost
    from paddlerun.trainer.rundir.config import load_config
    from paddlerun.trainer.rundir.events import read_events

    if args.nodes < 1:
        raise UsageError(f"--nodes {args.nodes}: give at least 1")
    config_path = find_config(args.config).resolve()
    config = load_config(config_path, args.set)  # bad config: exit 2 before sbatch
    if config.launch.nnodes != 1:
        raise UsageError(f"launch.nnodes={config.launch.nnodes} in the config: under Slurm "
                         f"--nodes says how many, and each node finds its rank itself")
    run_dir = Path(args.run_dir or config.job.run_dir or Path("runs") / config.job.name).resolve()
    cost = snapshot_cost(read_events(run_dir / "events.jsonl"))
    snapshot_s = cost["capture_s_median"] + cost["persist_s_median"] if cost else None
    job = BatchJob(config=config_path, run_dir=run_dir, nodes=args.nodes, python=sys.executable,
                   job_name=config.job.name,
                   warning_s=warning_seconds(config.supervisor.preempt_grace_s, snapshot_s),
                   gpus_per_node=args.gpus_per_node, time=args.time, partition=args.partition,
                   sets=tuple(args.set), extra_sbatch=tuple(extra_sbatch))
    text = render(job)
    if args.slurm_command == "script":
        sys.stdout.write(text)
        return SUCCESS
    run_dir.mkdir(parents=True, exist_ok=True)
    script = run_dir / SCRIPT_NAME
    script.write_text(text)
    script.chmod(0o755)
    try:
        proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True,
                              text=True, timeout=SBATCH_TIMEOUT_S)
    except FileNotFoundError:
        raise UsageError("sbatch is not on PATH: submit from a node with Slurm's client "
                         f"commands, or submit {script} yourself") from None
    except subprocess.TimeoutExpired:
        print(f"paddlerun: sbatch did not answer in {SBATCH_TIMEOUT_S} s", file=sys.stderr)
        return FAILED
    if proc.returncode != 0:
        print(f"paddlerun: sbatch {script}: exit {proc.returncode}: {proc.stderr.strip()}",
              file=sys.stderr)
        return FAILED
    match = re.match(r"(\d+)", proc.stdout.strip())
    if not match:
        print(f"paddlerun: sbatch printed no job id: {proc.stdout.strip()!r}", file=sys.stderr)
        return FAILED
    print(f"paddlerun: submitted {script} ({args.nodes} nodes, run dir {run_dir}), "
          f"Slurm job {match.group(1)}")
    return SUCCESS
