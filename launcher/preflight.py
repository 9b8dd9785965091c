"""Checks the supervisor can make before any worker starts, without importing paddle.

Every failure here is a ConfigError: exit 2, never retried.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from paddlerun.trainer.config import BUILTIN_FACTORIES, Config, ConfigError


def check(config: Config, workers: int, script_mode: bool = False) -> None:
    """``workers``: the job's resolved worker count (nproc_per_node x nnodes)."""
    check_factories(config)
    check_dataset_paths(config)
    if not script_mode:  # a script splits its batches itself
        check_batch_split(config, workers)


def check_batch_split(config: Config, workers: int) -> None:
    """Every worker takes the same share of a global batch (trainer/sampler.py)."""
    batch = config.train.global_batch_size
    if batch % workers:
        lower, higher = batch - batch % workers, batch - batch % workers + workers
        launch = config.launch
        raise ConfigError(
            f"train.global_batch_size={batch} is not divisible by the {workers} workers "
            f"(launch.nproc_per_node={launch.nproc_per_node} -> {workers // launch.nnodes} per node "
            f"x launch.nnodes={launch.nnodes}); set train.global_batch_size to a multiple of "
            f"{workers} ({', '.join(str(b) for b in (lower, higher) if b > 0)}) or change the "
            f"worker count")


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
