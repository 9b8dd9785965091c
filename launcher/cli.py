"""``paddlerun``: the command line (DESIGN.md "The command line" is the contract).

Exit codes: 0 success, 2 bad usage or bad config (never retried), 1 anything else,
130 interrupted (Ctrl-C), :data:`REQUEUE_EXIT_CODE` preempted (run the same command
again, or let the scheduler requeue, to resume).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

from paddlerun.launcher.exit_codes import BAD_CONFIG, FAILED
from paddlerun.trainer.config import Config, ConfigError, config_from_dict, load_config

log = logging.getLogger("paddlerun")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    script_args: List[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, script_args = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
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


class UsageError(Exception):
    """Bad command line; exit 2."""


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
    return parser


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
    check_paddle_installed(config)
    spec = LaunchSpec(config=config, run_dir=run_dir, script=script, script_args=tuple(script_args))
    return Supervisor(spec).run()


def resolve_run_config(args) -> Config:
    overrides = list(args.set)
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
