"""``paddlerun``: the command line (docs/architecture.md#the-command-line is the contract).

Exit codes: 0 success, 2 bad usage or bad config (never retried), 1 anything else,
130 interrupted (Ctrl-C), :data:`REQUEUE_EXIT_CODE` preempted (run the same command
again, or let the scheduler requeue, to resume).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

from paddlerun.cluster import k8s_cmd, k8s_env, slurm_cmd
from paddlerun.launcher import doctor_cmd, early_signals, preflight
from paddlerun.launcher.exit_codes import BAD_CONFIG, FAILED
from paddlerun.launcher.usage import UsageError
from paddlerun.trainer.rundir.config import Config, ConfigError, load_config

log = logging.getLogger("paddlerun")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    script_args: List[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, script_args = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    if args.command == "run":
        early_signals.hold()  # until the supervisor watches them (launcher/early_signals.py)
    logging.basicConfig(level=logging.INFO, format="paddlerun %(levelname)s: %(message)s",
                        stream=sys.stderr)
    try:
        return args.handler(args, script_args)
    except ConfigError as e:
        print(f"paddlerun: bad config: {e}", file=sys.stderr)
        return BAD_CONFIG
    except UsageError as e:
        print(f"paddlerun: {e}", file=sys.stderr)
        return BAD_CONFIG


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paddlerun", description="Fault-tolerant launcher for "
                                     "data-parallel PaddlePaddle training.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="supervise a training job",
                         usage="paddlerun run CONFIG [--run-dir DIR] [--set KEY=VALUE ...]\n"
                               "       paddlerun run --script train.py [launch options] -- ARGS")
    run.add_argument("config", nargs="?", help="a YAML file, or the name of a shipped config "
                     "(e.g. mnist_lenet)")
    run.add_argument("--run-dir", help="default: job.run_dir, else runs/<job.name>")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set train.max_steps=40 (repeatable)")
    run.add_argument("--script", help="supervise your own training script instead")
    run.add_argument("--nproc-per-node", help="script mode: workers per node (int or auto)")
    run.add_argument("--nnodes", type=int, help="script mode: number of nodes")
    run.add_argument("--node-rank", type=int, help="script mode: this node's rank")
    run.add_argument("--master", help="script mode: host:port of the rendezvous master")
    run.set_defaults(handler=cmd_run)
    add_inspect_commands(sub)
    k8s_cmd.add_parser(sub)
    doctor_cmd.add_parser(sub)
    slurm_cmd.add_parser(sub)
    return parser


# ---------------------------------------------------------------- status, ckpt, plot

PATH_HELP = ("a snapshot dir (step-XXXXXXXX), a checkpoints dir or a run dir "
             "(meaning RUN_DIR/checkpoints)")


def add_inspect_commands(sub) -> None:
    """The commands that look at a run or its snapshots. None of them imports paddle."""
    status = sub.add_parser(
        "status", help="attempts, workers, last snapshot and metrics of a run",
        description="What a run is doing: its state (from events.jsonl) and whether its "
                    "supervisor is alive (on this host), attempts and restarts, every rank's "
                    "pid / step / phase / heartbeat age, the newest complete snapshot, the last "
                    "metrics line and summary.json's status. Exit 0, or 2 if RUN_DIR is not a "
                    "run dir.")
    status.add_argument("run_dir", metavar="RUN_DIR")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(handler=cmd_status)

    plot = sub.add_parser(
        "plot", help="plot loss and eval accuracy with failures and restarts marked",
        description="Loss (and eval accuracy, right axis) over global steps from metrics.jsonl, "
                    "every attempt, with a line at each failure and at the step each restart "
                    "resumed from. Needs matplotlib: pip install 'paddlerun[plot]'.")
    plot.add_argument("run_dir", metavar="RUN_DIR")
    plot.add_argument("-o", "--output", metavar="FILE.png", help="default: RUN_DIR/plot.png")
    plot.set_defaults(handler=cmd_plot)

    ckpt = sub.add_parser("ckpt", help="list, verify, digest or export snapshots",
                          description=f"Look into snapshots. PATH is {PATH_HELP}.")
    commands = ckpt.add_subparsers(dest="ckpt_command", required=True,
                                   metavar="{list,verify,digest,export}")
    listing = commands.add_parser(
        "list", help="snapshots with step, epoch, time, size and state",
        description="Every snapshot (step-* directory) with step, epoch, creation time, size, "
                    "files, why it was taken, its state (complete / corrupt / incomplete) and, "
                    "for a bad one, the problem naming the bad file. States come from the "
                    "manifest and file sizes; --verify also checks every sha256.")
    listing.add_argument("path", metavar="PATH", help=PATH_HELP)
    listing.add_argument("--json", action="store_true", help="print a JSON list")
    listing.add_argument("--verify", action="store_true",
                         help="also check every file's sha256 (reads every byte)")
    verify = commands.add_parser(
        "verify", help="exit 0 only if the snapshot is intact",
        description="Check every file of a snapshot against its manifest (size and sha256; JSON "
                    "parses; safetensors headers fit their data). Exit 0 with one OK line only "
                    "if intact; otherwise exit 1 naming the bad file and the reason. Given a "
                    "checkpoints or run dir, verifies the NEWEST snapshot, complete or not "
                    "(not the newest complete one), and when it is bad says which older "
                    "complete snapshot a restart would resume from, if any.")
    verify.add_argument("path", metavar="PATH", help=PATH_HELP)
    digest = commands.add_parser(
        "digest", help="sha256 of the model parameters",
        description="Print the parameter digest of a snapshot's model (the value summary.json's "
                    "\"digest\" holds for the final model). Given a checkpoints or run dir: "
                    "its newest complete snapshot.")
    digest.add_argument("path", metavar="PATH", help=PATH_HELP)
    export = commands.add_parser(
        "export", help=".pdparams/.pdopt for paddle.Model.load",
        description="Write OUT_PREFIX.pdparams (model state dict) and OUT_PREFIX.pdopt "
                    "(optimizer state, with LR_Scheduler) from a snapshot, in paddle.save's "
                    "format, for paddle.Model(net).load(OUT_PREFIX) or paddle.load. Given a "
                    "checkpoints or run dir: its newest complete snapshot. Optimizer state is "
                    "keyed by paddle's parameter names (e.g. linear_0.w_0_moment1_0): load it "
                    "into a model built the same way, as with any .pdopt.")
    export.add_argument("path", metavar="PATH", help=PATH_HELP)
    export.add_argument("out_prefix", metavar="OUT_PREFIX", help="e.g. exported/lenet")
    ckpt.set_defaults(handler=cmd_ckpt)


def no_script_args(command: str, script_args: List[str]) -> None:
    if script_args:
        raise UsageError(f"'--' passes arguments to a training script; "
                         f"`paddlerun {command}` takes none")


def cmd_status(args, script_args: List[str]) -> int:
    no_script_args("status", script_args)
    from paddlerun.launcher import status_cmd
    return printing(status_cmd.run, args)


def cmd_plot(args, script_args: List[str]) -> int:
    no_script_args("plot", script_args)
    from paddlerun.launcher import plot_cmd
    return printing(plot_cmd.run, args)


def cmd_ckpt(args, script_args: List[str]) -> int:
    no_script_args("ckpt", script_args)
    from paddlerun.launcher import ckpt_cmd
    return printing(ckpt_cmd.run, args)


def printing(command, args) -> int:
    """Run a command whose output may go to a pipe that closes early (``| head``)."""
    try:
        return command(args)
    except BrokenPipeError:
        # As the Python docs advise: point stdout at devnull so that the flush at exit
        # does not raise again, and exit non-zero without a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return FAILED


# ---------------------------------------------------------------- run

def cmd_run(args, script_args: List[str]) -> int:
    from paddlerun.launcher.supervisor import Supervisor
    from paddlerun.launcher.launch import LaunchSpec

    config = resolve_run_config(args)
    run_dir = Path(args.run_dir or config.job.run_dir or Path("runs") / config.job.name).resolve()
    script = None
    if args.script:
        script = Path(args.script).resolve()
        if not script.is_file():
            raise UsageError(f"--script {args.script}: no such file")
    elif script_args:
        raise UsageError("arguments after '--' are for --script mode only")
    from paddlerun.cluster.slurm_job import inside_slurm  # finds its place from SLURM_*
    config, scheduler = inside_slurm(config, run_dir)
    check_paddle_installed(config)
    spec = LaunchSpec(config=config, run_dir=run_dir, script=script, script_args=tuple(script_args))
    preflight.check(config, nproc_per_node=spec.nproc_per_node,
                    script_mode=script is not None)
    return Supervisor(spec, scheduler=scheduler).run()


def resolve_run_config(args) -> Config:
    # In a pod of `paddlerun k8s render`'s job: its place, before the user's own --set.
    overrides = k8s_env.launch_overrides() + list(args.set)
    launch_flags = {"nproc_per_node": args.nproc_per_node, "nnodes": args.nnodes,
                    "node_rank": args.node_rank, "master": args.master}
    given = {k: v for k, v in launch_flags.items() if v is not None}
    if given and not args.script:
        raise UsageError(f"--{next(iter(given)).replace('_', '-')} is a script-mode option; "
                         f"with a config use --set launch.<key>=VALUE")
    overrides += [f"launch.{k}={v}" for k, v in given.items()]
    if args.config:
        return load_config(find_config(args.config), overrides)
    if not args.script:
        raise UsageError("give a CONFIG (e.g. paddlerun run mnist_lenet) or --script train.py")
    return load_config_from_overrides(Path(args.script).stem, overrides)


def load_config_from_overrides(name: str, overrides: List[str]) -> Config:
    """Script mode without a config file: the defaults plus ``--set`` overrides."""
    import tempfile
    import yaml
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump({"job": {"name": name}}, f)
    try:
        return load_config(f.name, overrides)
    finally:
        Path(f.name).unlink()


def find_config(name: str) -> Path:
    """A path to a YAML file, or the bare name of a config shipped with the package."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = shipped_configs()
    if "/" not in name and path.stem in shipped:
        return shipped[path.stem]
    raise ConfigError(f"config file not found: {name} (shipped configs, usable by name: "
                      f"{', '.join(sorted(shipped)) or 'none'})")


def shipped_configs() -> dict:
    import paddlerun.configs
    folder = Path(paddlerun.configs.__file__).parent
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def check_paddle_installed(config: Config) -> None:
    """The supervisor never imports paddle, but it can say at once that it is missing."""
    import importlib.util
    if config.launch.python is None and importlib.util.find_spec("paddle") is None:
        raise UsageError("Paddle is not installed in this Python. Install the extra that fits "
                         "this machine: pip install 'paddlerun[cpu]' (CPU) or "
                         "pip install 'paddlerun[gpu]' (CUDA).")


if __name__ == "__main__":
    sys.exit(main())
