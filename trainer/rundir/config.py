"""The run config: a YAML file loaded into frozen, typed dataclasses.

Paddle-free: the supervisor validates a config before any worker starts, and
every worker loads the same resolved file (``RUN_DIR/config.yaml``).

Errors are :class:`ConfigError` and name the file, the dotted key and the fix,
because a bad config is never retried (exit code 2).
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
import signal
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from paddlerun.trainer.rundir.errors import NotRetriable


#: train.* keys that take a built-in name or an import string, and their built-ins
#: (implemented in trainer/factories.py, which checks it covers exactly these).
BUILTIN_FACTORIES = {
    "model": ("lenet",),
    "dataset": ("mnist",),
    "optimizer": ("adam", "adamw", "sgd", "momentum"),
    "lr_schedule": ("constant", "cosine", "step"),
    "loss": ("cross_entropy",),
}


class _ConfigLoader(yaml.SafeLoader):
    """YAML 1.1 without its base-60 numbers: ``nnodes: 1:2`` is the text ``1:2`` (MIN:MAX),
    not the number 62, and ``1:30`` is not 90."""


_INT = re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$")
_FLOAT = re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
                    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _NUMBER_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_ConfigLoader.add_implicit_resolver(_NUMBER_TAGS[0], _INT, list("-+0123456789"))
_ConfigLoader.add_implicit_resolver(_NUMBER_TAGS[1], _FLOAT, list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_ConfigLoader)


class ConfigError(ValueError, NotRetriable):
    """A config that cannot be used; the message names the key or path and the fix."""


@dataclass(frozen=True)
class JobConfig:
    """The run's name and where its files go."""

    #: The job's name: the default run directory and the name in reports.
    name: str = "job"
    #: Where events, logs, checkpoints and the summary go; default ``runs/<name>``.
    run_dir: Optional[str] = None


@dataclass(frozen=True)
class LaunchConfig:
    """How many workers, on which device, on how many nodes."""

    #: Workers per node: an int, or ``auto`` (the visible GPUs, else 2 CPU workers).
    nproc_per_node: Union[int, str] = "auto"
    #: ``auto``, ``cpu`` or ``gpu``; ``auto`` uses a GPU when Paddle is a CUDA build and one
    #: is visible.
    device: str = "auto"
    #: Number of nodes; every node runs ``paddlerun`` with the same config. With
    #: ``rendezvous``, ``"MIN:MAX"`` (quoted or not): the job runs on MIN to MAX nodes.
    nnodes: Union[int, str] = 1
    #: This node's rank among ``nnodes`` (multi-node without ``rendezvous`` only).
    node_rank: int = 0
    #: ``host:port`` of the rendezvous master; required when ``nnodes > 1`` without
    #: ``rendezvous`` (with it, the generation's first node is the master).
    master: Optional[str] = None
    #: ``etcd://HOST:PORT[,HOST:PORT...]``: the nodes find each other, notice a lost node
    #: and agree on each new membership in this etcd (docs/elastic.md). Absent: a fixed
    #: set of nodes started with ``node_rank`` and ``master``.
    rendezvous: Optional[str] = None
    #: The job's name in etcd (keys ``/paddlerun/<job_id>/``); default ``job.name``.
    job_id: Optional[str] = None
    #: The Python interpreter that runs the launch; default: the supervisor's own.
    python: Optional[str] = None
    #: Extra flags passed to ``paddle.distributed.launch`` before the script.
    extra_args: typing.List[str] = field(default_factory=list)

    @property
    def node_range(self) -> typing.Tuple[int, int]:
        """(MIN, MAX) nodes: ``nnodes: 4`` is (4, 4), ``nnodes: "1:2"`` is (1, 2)."""
        if isinstance(self.nnodes, int):
            return self.nnodes, self.nnodes
        low, _, high = self.nnodes.partition(":")
        return int(low), int(high)


@dataclass(frozen=True)
class SupervisorConfig:
    """When a failure is noticed, and how often and how soon to restart."""

    #: Restarts allowed in one invocation before giving up (exit 1).
    max_restarts: int = 3
    #: Wait before a restart; doubles after each further failure. The first failure of an
    #: attempt that trained restarts at once.
    backoff_s: float = 1.0
    #: The longest wait between restarts.
    backoff_max_s: float = 30.0
    #: Give up when ``max_failures_in_window`` failures happen within this many seconds.
    failure_window_s: float = 600.0
    #: Failures within ``failure_window_s`` that end the run (exit 1).
    max_failures_in_window: int = 5
    #: How often each worker writes its heartbeat file.
    heartbeat_interval_s: float = 1.0
    #: A training worker whose heartbeat or step has not changed for this long is hung: the
    #: attempt is torn down and restarted. At least twice ``heartbeat_interval_s``.
    hang_timeout_s: float = 60.0
    #: Like hang_timeout_s, for start-up (import paddle, rendezvous, data, restore), which is
    #: slow on a busy machine and waits for every node (a node of a fixed-size job that has
    #: not joined by then ends the job, docs/failures.md). The supervisor never gives start-up
    #: less than hang_timeout_s: a user who raises that one alone means start-up, too.
    start_timeout_s: float = 180.0
    #: After a preemption signal, how long the workers get to snapshot and stop before they
    #: are killed.
    preempt_grace_s: float = 60.0
    #: Signals to ``paddlerun`` that mean "snapshot, stop, exit 75" (SIGINT always does, exit 130).
    preempt_signals: typing.List[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    #: Act on the cloud's preemption notice: ``auto`` (the cloud found from the machine's
    #: firmware strings, nothing asked off a cloud), ``aws``, ``gcp``, ``azure`` or ``none``.
    spot_notice: str = "auto"
    #: Base URL of the instance metadata service instead of the provider's (proxies, tests).
    spot_endpoint: Optional[str] = None
    #: How often to ask for a notice (AWS recommends every 5 s; GCP waits in a long poll).
    spot_poll_s: float = 5.0
    #: Ask for the snapshot this long before the notice's deadline, on top of twice the
    #: last snapshot's measured time and one agreement period.
    spot_margin_s: float = 10.0
    #: With ``launch.rendezvous``: a node that stopped refreshing its membership in etcd
    #: for this long is lost, and the others go on without it.
    node_ttl_s: float = 5.0
    #: With ``launch.rendezvous``: at the job's start, once MIN nodes are present, how long
    #: to wait for more (up to MAX) before training starts.
    elastic_wait_s: float = 30.0
    #: With ``launch.rendezvous``: a node that joins a running job is taken in (a snapshot,
    #: then a restart with it) no sooner than this long after the last change of members.
    scale_up_min_interval_s: float = 60.0


@dataclass(frozen=True)
class TrainConfig:
    """What is trained and how (paddlerun's own training loop; not script mode)."""

    #: A built-in name (``lenet``) or an import string ``pkg.module:factory``.
    model: str = "lenet"
    #: Keyword arguments of the model factory.
    model_args: typing.Dict[str, Any] = field(default_factory=dict)
    #: A built-in name (``mnist``) or an import string ``pkg.module:factory``.
    dataset: str = "mnist"
    #: Keyword arguments of the dataset factory (``mnist``: ``image_path``, ``label_path``,
    #: ``test_image_path``, ``test_label_path`` of IDX ``.gz`` files).
    dataset_args: typing.Dict[str, Any] = field(default_factory=dict)
    #: A built-in name (``adam``, ``sgd``, ``momentum``, ``adamw``) or an import string.
    optimizer: str = "adam"
    #: Keyword arguments of the optimizer factory (e.g. ``weight_decay``).
    optimizer_args: typing.Dict[str, Any] = field(default_factory=dict)
    #: The (base) learning rate.
    lr: float = 0.001
    #: ``constant``, ``cosine``, ``step`` or an import string.
    lr_schedule: str = "constant"
    #: Keyword arguments of the schedule factory.
    lr_schedule_args: typing.Dict[str, Any] = field(default_factory=dict)
    #: A built-in name (``cross_entropy``) or an import string.
    loss: str = "cross_entropy"
    #: Passes over the training data. Raising it on a rerun extends training.
    epochs: int = 1
    #: Stop after this many global steps (``null``: run all epochs).
    max_steps: Optional[int] = None
    #: Samples per optimizer step over all workers; split evenly among them.
    global_batch_size: int = 64
    #: Drop the last, smaller global batch of an epoch.
    drop_last: bool = False
    #: Seeds Paddle, NumPy and Python, and the sample order of every epoch.
    seed: int = 2024
    #: DataLoader worker processes per worker (random augmentation in them is not replayed
    #: exactly on resume).
    num_workers: int = 0
    #: Log (console, ``metrics.jsonl``) every this many steps; ranks agree on stop and
    #: time-based snapshots at these steps.
    log_every_steps: int = 10
    #: Evaluate on the eval split every this many epochs.
    eval_every_epochs: int = 1
    #: Run the optimizer step with fleet sharding stage 1 (state split across ranks).
    sharded_optimizer: bool = False
    #: How gradients are averaged: ``python`` (after backward; a dead peer raises, so the
    #: survivor can save), ``dataparallel`` (paddle.DataParallel, overlapped with backward),
    #: ``auto``: dataparallel on GPU, python on CPU.
    grad_sync: str = "auto"
    #: How the ``python`` gradient sync sums over the ranks: ``auto`` through shared
    #: memory when every rank runs on this host (x86-64 Linux, CPU), else gloo; ``gloo``.
    grad_transport: str = "auto"


@dataclass(frozen=True)
class CheckpointConfig:
    """Where snapshots go, how often, and how many are kept."""

    #: The checkpoints directory; default ``RUN_DIR/checkpoints``. Several nodes need one
    #: they all see.
    dir: Optional[str] = None
    #: A snapshot every this many global steps (``null``: none by steps).
    every_steps: Optional[int] = 200
    #: A snapshot every this many seconds, decided by rank 0 (``null``: none by time).
    every_seconds: Optional[float] = None
    #: Keep the newest this many complete snapshots.
    keep_last: int = 3
    #: Also keep every snapshot whose step is a multiple of this.
    keep_every_steps: Optional[int] = None
    #: Persist in a background thread (the training thread only captures).
    async_save: bool = True
    #: A snapshot, checkpoints dir or run dir to start from instead of this run's own.
    resume_from: Optional[str] = None
    #: How long to wait for ``checkpoints/.lock`` before failing with a message naming it.
    lock_timeout_s: float = 60.0


@dataclass(frozen=True)
class Config:
    """A whole run config: one field per YAML section."""

    job: JobConfig = field(default_factory=JobConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """sha256 of the keys that shape the trained model (not paths, schedules or budgets)."""
        shaping = {k: v for k, v in self.to_dict()["train"].items()
                   if k not in ("max_steps", "epochs", "log_every_steps", "num_workers")}
        return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- loading

def load_config(path: Union[str, Path], overrides: typing.Sequence[str] = ()) -> Config:
    """Read ``path``, apply ``--set`` style ``overrides`` (``a.b=value``), validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 text (byte {e.start}); a config is a YAML "
                          f"text file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if raw is None:
        raise ConfigError(f"{path}: the file is empty; start from configs/mnist_lenet.yaml")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections "
                          f"({', '.join(f.name for f in fields(Config))}), got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    return config_from_dict(raw, source=str(path))


def config_from_dict(raw: dict, source: str = "<config>") -> Config:
    return _build(Config, raw, source, prefix="")


def dump_config(config: Config, path: Union[str, Path]) -> None:
    """Replaced in one rename: the supervisors of several nodes may write the same file
    while a worker reads it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    os.replace(tmp, path)


def _apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.max_steps=40")
    parts = key.split(".")
    cls: Any = Config
    for depth, part in enumerate(parts):
        known = {f.name: f for f in fields(cls)} if dataclasses.is_dataclass(cls) else None
        if known is None:
            break  # inside a free-form dict (e.g. train.model_args.width)
        if part not in known:
            part = _ALIASES.get((cls, part), part)
            if part not in known:
                raise ConfigError(_unknown_key_message("--set", ".".join(parts[:depth + 1]), known))
        cls = typing.get_type_hints(cls)[part]
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
    # YAML parsing gives 40 -> int, 1e-3 -> float, null -> None, [a, b] -> list.
    node[parts[-1]] = parse_yaml(text) if text.strip() else ""


def _build(cls, raw: Any, source: str, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'} must be a mapping, "
                          f"got {type(raw).__name__} {raw!r}")
    raw = {_ALIASES.get((cls, k), k): v for k, v in raw.items()}
    known = {f.name: f for f in fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(_unknown_key_message(source, prefix + str(key), known))
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value if value is not None else {}, source, f"{prefix}{name}.")
        else:
            values[name] = _check_type(value, hint, source, prefix + name)
    config = cls(**values)
    _validate(config, source, prefix)
    return config


def _is_node_range(nnodes: Union[int, str]) -> bool:
    if isinstance(nnodes, int):
        return nnodes >= 1
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", nnodes)
    return match is not None and 1 <= int(match[1]) <= int(match[2])


def etcd_endpoints(url: str) -> typing.List[typing.Tuple[str, int]]:
    """``etcd://h1:2379,h2:2379`` as ``[("h1", 2379), ("h2", 2379)]``; ValueError saying
    which part is wrong."""
    scheme = "etcd://"
    if not url.startswith(scheme):
        raise ValueError(f"must start with {scheme}")
    endpoints = []
    for part in url[len(scheme):].rstrip("/").split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{part.strip()!r} is not HOST:PORT")
        endpoints.append((host.strip("[]"), int(port)))
    return endpoints


def _unknown_key_message(source: str, dotted: str, known: dict) -> str:
    leaf = dotted.rsplit(".", 1)[-1]
    parent = dotted[: -len(leaf)]
    close = difflib.get_close_matches(leaf, list(known), n=1)
    hint = f"did you mean {parent + close[0]!r}?" if close else \
        f"valid keys here: {', '.join(sorted(known))}"
    return f"{source}: unknown key {dotted!r}; {hint}"


#: The flags paddlerun passes to ``paddle.distributed.launch`` (launcher/launch.py), and
#: the config key that sets each (None: paddlerun's own choice).
LAUNCH_FLAGS = {"--nproc_per_node": "launch.nproc_per_node", "--log_dir": None,
                "--nnodes": "launch.nnodes", "--master": "launch.master", "--rank": "launch.node_rank"}
_UNCATCHABLE_SIGNALS = ("SIGKILL", "SIGSTOP")


def _flag_paddlerun_sets(arg: str) -> Optional[str]:
    """The flag of :data:`LAUNCH_FLAGS` that ``arg`` gives (``--flag``, ``--flag=value``, or
    a prefix, which the launcher's argparse takes as that flag), else None."""
    name = arg.split("=", 1)[0]
    if not name.startswith("--") or len(name) < 3:
        return None
    return next((flag for flag in LAUNCH_FLAGS if flag.startswith(name)), None)


# YAML keys that are Python keywords: ``checkpoint.async`` is the field ``async_save``.
_ALIASES = {(CheckpointConfig, "async"): "async_save"}

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               list: "a list", dict: "a mapping"}


def _check_type(value: Any, hint: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, source, key)
            except ConfigError as e:
                errors.append(e)
        expected = " or ".join(_describe(a) for a in args)
        raise ConfigError(f"{source}: {key} must be {expected}, got {value!r}")
    base = origin or hint
    if base is Any:
        return value
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is float and isinstance(value, str):
        try:  # PyYAML reads 1e-3 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if base in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{source}: {key} must be {_describe(hint)}, got {value!r}")
    if base is list and isinstance(value, (list, tuple)):
        return [_check_type(v, args[0], source, f"{key}[{i}]") for i, v in enumerate(value)] \
            if args else list(value)
    if not isinstance(value, base):
        raise ConfigError(f"{source}: {key} must be {_describe(hint)}, got {value!r}")
    return value


def _describe(hint: Any) -> str:
    if hint is type(None):
        return "null"
    return _TYPE_NAMES.get(typing.get_origin(hint) or hint, str(hint))


def _validate(config: Any, source: str, prefix: str) -> None:
    """Range checks that types cannot express."""
    def need(ok: bool, key: str, what: str):
        if not ok:
            raise ConfigError(f"{source}: {prefix}{key} {what}, got {getattr(config, key)!r}")

    if isinstance(config, LaunchConfig):
        n = config.nproc_per_node
        need(n == "auto" or (isinstance(n, int) and n >= 1), "nproc_per_node",
             "must be a positive integer or 'auto'")
        need(config.device in ("auto", "cpu", "gpu"), "device", "must be auto, cpu or gpu")
        need(_is_node_range(config.nnodes), "nnodes",
             'must be a positive integer, or "MIN:MAX" with 1 <= MIN <= MAX')
        if config.rendezvous is None:
            need(isinstance(config.nnodes, int), "nnodes",
                 "MIN:MAX needs launch.rendezvous (etcd://HOST:PORT), where the nodes agree on "
                 "who is present; without it give the number of nodes")
            need(0 <= config.node_rank < config.nnodes, "node_rank", "must be in [0, nnodes)")
            need(config.nnodes == 1 or bool(config.master), "master",
                 "must be set (host:port) when nnodes > 1")
        else:
            try:
                etcd_endpoints(config.rendezvous)
            except ValueError as e:
                raise ConfigError(f"{source}: {prefix}rendezvous {config.rendezvous!r}: {e}; "
                                  f"e.g. etcd://10.0.0.5:2379 or etcd://h1:2379,h2:2379") from None
            need(config.master is None, "master", "is chosen in each generation with "
                 "launch.rendezvous (the first node's address); remove it")
        need(config.job_id is None or re.fullmatch(r"[A-Za-z0-9._-]+", config.job_id) is not None,
             "job_id", "must be letters, digits, '.', '_' or '-' (it names etcd keys)")
        for i, arg in enumerate(config.extra_args):
            flag = _flag_paddlerun_sets(arg)
            if flag is not None:
                key = LAUNCH_FLAGS[flag]
                fix = f"set {key} instead" if key else "paddlerun sets it for every attempt"
                raise ConfigError(f"{source}: {prefix}extra_args[{i}] {arg!r} repeats {flag}, which "
                                  f"paddlerun passes to paddle.distributed.launch itself; remove it "
                                  f"({fix})")
    elif isinstance(config, SupervisorConfig):
        need(config.max_restarts >= 0, "max_restarts", "must be >= 0")
        for key in ("backoff_s", "backoff_max_s", "failure_window_s"):
            need(getattr(config, key) >= 0, key, "must be >= 0")
        for key in ("heartbeat_interval_s", "hang_timeout_s", "start_timeout_s", "preempt_grace_s"):
            need(getattr(config, key) > 0, key, "must be > 0")
        need(config.spot_notice in ("auto", "none", "aws", "gcp", "azure"), "spot_notice",
             "must be auto, none, aws, gcp or azure")
        need(config.spot_poll_s > 0, "spot_poll_s", "must be > 0")
        need(config.spot_margin_s >= 0, "spot_margin_s", "must be >= 0")
        need(config.spot_endpoint is None or config.spot_endpoint.startswith(("http://", "https://")),
             "spot_endpoint", "must be an http:// or https:// URL")
        need(config.max_failures_in_window >= 1, "max_failures_in_window", "must be >= 1")
        need(config.node_ttl_s >= 2, "node_ttl_s", "must be >= 2 (etcd grants no shorter lease)")
        need(config.elastic_wait_s >= 0, "elastic_wait_s", "must be >= 0")
        need(config.scale_up_min_interval_s >= 0, "scale_up_min_interval_s", "must be >= 0")
        need(config.hang_timeout_s >= 2 * config.heartbeat_interval_s, "hang_timeout_s",
             "must be at least twice heartbeat_interval_s")
        for i, name in enumerate(config.preempt_signals):
            if name not in signal.Signals.__members__ or name in _UNCATCHABLE_SIGNALS:
                usable = name not in _UNCATCHABLE_SIGNALS
                raise ConfigError(
                    f"{source}: {prefix}preempt_signals[{i}] {name!r} is "
                    f"{'not a signal name' if usable else 'a signal no process can catch'}; "
                    f"use names such as SIGTERM, SIGUSR1, SIGUSR2 (the default is "
                    f"{SupervisorConfig().preempt_signals})")
    elif isinstance(config, TrainConfig):
        for key in ("epochs", "global_batch_size", "log_every_steps", "eval_every_epochs"):
            need(getattr(config, key) >= 1, key, "must be >= 1")
        need(config.max_steps is None or config.max_steps >= 1, "max_steps", "must be >= 1 or null")
        need(config.num_workers >= 0, "num_workers", "must be >= 0")
        need(config.lr > 0, "lr", "must be > 0")
        need(config.grad_sync in ("auto", "python", "dataparallel"), "grad_sync",
             "must be auto, python or dataparallel")
        need(config.grad_transport in ("auto", "gloo"), "grad_transport", "must be auto or gloo")
    elif isinstance(config, CheckpointConfig):
        need(config.every_steps is None or config.every_steps >= 1, "every_steps",
             "must be >= 1 or null")
        need(config.every_seconds is None or config.every_seconds > 0, "every_seconds",
             "must be > 0 or null")
        need(config.keep_last >= 1, "keep_last", "must be >= 1 (the newest snapshot is always kept)")
        need(config.keep_every_steps is None or config.keep_every_steps >= 1, "keep_every_steps",
             "must be >= 1 or null")
        need(config.lock_timeout_s > 0, "lock_timeout_s", "must be > 0")
