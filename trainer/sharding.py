"""Optimizer state sharded across ranks: Paddle fleet's sharding stage 1 (ZeRO-1).

``train.sharded_optimizer: true`` with more than one worker. Each rank keeps the
optimizer state (Adam's moments, ...) of its own share of the parameters only.
Fleet does the data-parallel part itself: the optimizer step reduces each gradient
(averaged) to the rank that owns the parameter, that rank updates it, and then
broadcasts it to all the others, so every rank ends the step with the same
parameters. ``paddle.distributed.sharding.group_sharded_parallel`` refuses CPU; this
path runs on CPU/gloo too (docs/paddle-behaviour.md#sharded-optimizer-state-zero-stage-1).

Call order, on every rank: :func:`init` instead of ``dist.init_parallel_env()``,
then :func:`wrap_model` on the user's layer, then :func:`wrap_optimizer` on the
optimizer built over that layer's parameters.
"""
from __future__ import annotations

import paddle
from paddle.distributed import fleet


def enabled(sharded_optimizer: bool, world_size: int) -> bool:
    """Whether the optimizer state is really sharded: asked for, and more than one rank to
    share it (with one worker the plain optimizer holds all of it). The trainer and the
    checkpointer must agree on this."""
    return sharded_optimizer and world_size > 1


def init(world_size: int) -> None:
    """Initialize the process group with every rank in one sharding group."""
    strategy = fleet.DistributedStrategy()
    strategy.hybrid_configs = {"dp_degree": 1, "mp_degree": 1, "pp_degree": 1,
                               "sharding_degree": world_size}
    fleet.init(is_collective=True, strategy=strategy)


def wrap_model(layer: paddle.nn.Layer) -> paddle.nn.Layer:
    """Fleet's wrapper (broadcasts rank 0's parameters); the user's layer stays its ``_layers``."""
    return fleet.distributed_model(layer)


def wrap_optimizer(optimizer):
    """The sharded optimizer: ``state_dict()`` holds this rank's share of the state only, and
    ``set_state_dict()`` takes the entries of this rank's parameters, matched by name."""
    return fleet.distributed_optimizer(optimizer)
