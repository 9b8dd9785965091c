"""Turn the config's names and import strings into model, data, optimizer, schedule and loss.

Every ``train.*`` factory key takes a built-in name or an import string
``package.module:callable``. The callable's signature (keyword arguments come from
the matching ``*_args`` mapping):

- ``model``:       ``build(**model_args) -> paddle.nn.Layer``
- ``dataset``:     ``build(split, **dataset_args) -> paddle.io.Dataset | None``;
  ``split`` is ``"train"`` or ``"eval"``; ``None`` for eval means no evaluation.
  Items are ``(input, label)``.
- ``optimizer``:   ``build(parameters, learning_rate, **optimizer_args) -> paddle.optimizer.Optimizer``
- ``lr_schedule``: ``build(lr, total_steps, **lr_schedule_args) -> float | paddle.optimizer.lr.LRScheduler``;
  the scheduler is stepped once per optimizer step.
- ``loss``:        ``build() -> callable(outputs, labels) -> scalar Tensor``
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Dict

import paddle

from paddlerun.trainer.rundir.errors import NotRetriable


class FactoryError(ImportError, NotRetriable):
    """An import string that does not resolve; names the config key and the string."""


def resolve(key: str, spec: str, builtins: Dict[str, Callable]) -> Callable:
    if spec in builtins:
        return builtins[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise FactoryError(f"{key}: {spec!r} is neither a built-in ({', '.join(sorted(builtins))}) "
                           f"nor an import string 'package.module:callable'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise FactoryError(f"{key}: cannot import module {module_name!r} from {spec!r}: {e}. "
                           f"Is it installed or on PYTHONPATH?") from e
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise FactoryError(f"{key}: module {module_name!r} has no attribute {attr!r} ({spec!r})")
        target = getattr(target, part)
    if not callable(target):
        raise FactoryError(f"{key}: {spec!r} is not callable")
    return target


def _model_builtins():
    from paddlerun.trainer import models
    return {"lenet": models.lenet}


def _dataset_builtins():
    from paddlerun.trainer import data
    return {"mnist": data.mnist}


def _optimizer(cls):
    return lambda parameters, learning_rate, **kw: cls(learning_rate=learning_rate,
                                                       parameters=parameters, **kw)


OPTIMIZERS = {
    "adam": _optimizer(paddle.optimizer.Adam),
    "adamw": _optimizer(paddle.optimizer.AdamW),
    "sgd": _optimizer(paddle.optimizer.SGD),
    "momentum": _optimizer(paddle.optimizer.Momentum),
}

LR_SCHEDULES = {
    "constant": lambda lr, total_steps: lr,
    "cosine": lambda lr, total_steps, **kw: paddle.optimizer.lr.CosineAnnealingDecay(
        lr, T_max=max(total_steps, 1), **kw),
    "step": lambda lr, total_steps, step_size, gamma=0.1: paddle.optimizer.lr.StepDecay(
        lr, step_size=step_size, gamma=gamma),
}

LOSSES = {"cross_entropy": paddle.nn.CrossEntropyLoss}


def build_model(train) -> paddle.nn.Layer:
    return resolve("train.model", train.model, _model_builtins())(**train.model_args)


def build_dataset(train, split: str):
    return resolve("train.dataset", train.dataset, _dataset_builtins())(split, **train.dataset_args)


def build_lr(train, total_steps: int):
    return resolve("train.lr_schedule", train.lr_schedule, LR_SCHEDULES)(
        train.lr, total_steps, **train.lr_schedule_args)


def build_optimizer(train, parameters, learning_rate):
    return resolve("train.optimizer", train.optimizer, OPTIMIZERS)(
        parameters, learning_rate, **train.optimizer_args)


def build_loss(train) -> Callable:
    return resolve("train.loss", train.loss, LOSSES)()
