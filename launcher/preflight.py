"""Checks the supervisor can make before any worker starts, without importing paddle.

Every failure here is a ConfigError or a UsageError: exit 2, never retried.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from paddlerun.launcher.usage import UsageError
from paddlerun.trainer.rundir import paddle_build
from paddlerun.trainer.rundir.config import BUILTIN_FACTORIES, Config, ConfigError


def check(config: Config, nproc_per_node: int, script_mode: bool = False) -> None:
    """``nproc_per_node``: the resolved workers per node."""
    check_paddle_version(config)
    check_factories(config)
    check_dataset_paths(config)
    check_elastic(config)
    if not script_mode:  # a script splits its batches itself
        low, high = config.launch.node_range
        for nodes in range(low, high + 1):  # every world size the job may run at
            check_batch_split(config, nproc_per_node, nodes)


def check_batch_split(config: Config, nproc_per_node: int, nodes: int) -> None:
    """Every worker takes the same share of a global batch (trainer/sampler.py)."""
    batch = config.train.global_batch_size
    workers = nproc_per_node * nodes
    if batch % workers:
        lower, higher = batch - batch % workers, batch - batch % workers + workers
        launch = config.launch
        on = f"on {nodes} of launch.nnodes={launch.nnodes}" if isinstance(launch.nnodes, str) \
            else f"x launch.nnodes={launch.nnodes}"
        raise ConfigError(
            f"train.global_batch_size={batch} is not divisible by the {workers} workers "
            f"(launch.nproc_per_node={launch.nproc_per_node} -> {nproc_per_node} per node "
            f"{on}); set train.global_batch_size to a multiple of "
            f"{workers} ({', '.join(str(b) for b in (lower, higher) if b > 0)}) or change the "
            f"worker count")


def check_elastic(config: Config) -> None:
    """With launch.rendezvous, several nodes share snapshots: they need one directory."""
    launch = config.launch
    if launch.rendezvous is None:
        return
    if launch.node_range[1] > 1 and config.checkpoint.dir is None:
        raise ConfigError(
            f"launch.rendezvous with launch.nnodes={launch.nnodes} needs checkpoint.dir: one "
            f"directory every node reads and writes (shared storage), since a node may resume "
            f"from another node's snapshot; each node keeps its own run directory")
    try:
        import etcd3gw  # noqa: F401  (the etcd client; an optional dependency)
    except ImportError:
        raise UsageError("launch.rendezvous needs the etcd client: pip install 'paddlerun[elastic]' "
                         "(etcd3gw)") from None


def check_paddle_version(config: Config) -> None:
    """Refuse a Paddle older than paddle_build.MINIMUM in one line, before any worker starts,
    instead of a traceback at the first step. Reads the installed files (the interpreter of
    ``launch.python`` when set), never imports paddle."""
    try:
        build = paddle_build.read(config.launch.python)
    except paddle_build.PaddleNotSupported as e:
        raise UsageError(str(e)) from None
    if build is None:
        if config.launch.python is not None:
            raise UsageError(f"launch.python {config.launch.python} has no Paddle: install "
                             f"paddlepaddle>={paddle_build.MINIMUM} there (docs/install.md)")
        return  # the CLI's own check says so for the supervisor's interpreter
    reason = build.unsupported_reason()
    if reason is not None:
        raise UsageError(reason)
    sharding = build.sharding_problem() if config.train.sharded_optimizer else None
    if sharding is not None:
        raise UsageError(f"train.sharded_optimizer: {sharding}")


def check_factories(config: Config) -> None:
    """An import string's top-level package must exist. Finding it runs none of its code
    (the worker imports the rest, and reports anything deeper)."""
    for key, builtins in BUILTIN_FACTORIES.items():
        spec = getattr(config.train, key)
        if spec in builtins:
            continue
        module, sep, attr = spec.partition(":")
        if not sep or not module or not attr:
            raise ConfigError(f"train.{key}: {spec!r} is neither a built-in ({', '.join(builtins)}) "
                              f"nor an import string 'package.module:callable'")
        top = module.split(".")[0]
        if importlib.util.find_spec(top) is None:
            raise ConfigError(f"train.{key}: cannot import {top!r} (from {spec!r}): no such module "
                              f"here; install it or add its folder to PYTHONPATH")


def check_dataset_paths(config: Config) -> None:
    for key, value in config.train.dataset_args.items():
        if key.endswith("_path") and isinstance(value, str) and not Path(value).exists():
            raise ConfigError(f"train.dataset_args.{key}: file not found: {value}")
    resume = config.checkpoint.resume_from
    if resume and not Path(resume).exists():
        raise ConfigError(f"checkpoint.resume_from: not found: {resume}")
