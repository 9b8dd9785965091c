"""A user's own training script with paddlerun: what it owes the supervisor, and its snapshots.

Two front ends share this module, so that they behave the same: the hapi callback
(:mod:`paddlerun.trainer.hapi`) and :class:`~paddlerun.trainer.session.Session` for a
plain training loop. Under ``paddlerun run --script`` (``PADDLERUN_RUN_DIR`` set by the
supervisor) a :class:`SupervisorLink` writes, per rank:

* ``heartbeats/rank-K.json``, from the moment it is constructed (a daemon thread);
* rank 0 only: ``metrics.jsonl`` (one line per training step) and, through the
  Checkpointer, ``snapshot_committed`` events in ``events.jsonl``;

and :func:`script_agreement` answers the supervisor's stop request (``control/stop.json``,
written when the supervisor is signalled or the cloud gives notice; see
:mod:`paddlerun.trainer.rundir.control`): every rank reads its node's file and all ranks
agree (any rank asked: all stop) through one all-reduce, at every
:data:`STOP_CHECK_EVERY`-th step -- the protocol of :mod:`paddlerun.trainer.agreement`,
which paddlerun's own loop speaks too. ``Checkpointer.due_by_time`` is rank 0's opinion
only, and that is enough here: a plain data-parallel snapshot is written by rank 0 alone,
with no collective.

Outside script mode nothing is written and no stop is checked -- unless SIGTERM is
watched (``watch_sigterm``, which Session does): then a SIGTERM to any rank (a scheduler
signalling every process) stops all of them at the next check.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import paddle
import paddle.distributed as dist

from paddlerun.trainer import signals
from paddlerun.trainer.agreement import Position, StepAgreement
from paddlerun.trainer.rundir.config import Config, TrainConfig, config_from_dict
from paddlerun.trainer.rundir.env import CHECKPOINT_DIR, WorkerEnv
from paddlerun.trainer.rundir.events import EventLog
from paddlerun.trainer.rundir.heartbeat import HeartbeatWriter
from paddlerun.trainer.rundir.metrics import MetricsLog

__all__ = ["DEFAULT_SEED", "STOP_CHECK_EVERY", "CheckpointTarget", "SupervisorLink",
           "checkpoint_config", "checkpoint_directory", "script_agreement", "script_env"]

#: Steps between checks of the stop request (an all-reduce when world > 1).
STOP_CHECK_EVERY = 10
#: The resumable sampler's default seed: paddlerun's ``train.seed`` default. It must not
#: change between restarts, so it is never drawn at random.
DEFAULT_SEED = TrainConfig.seed


def script_env() -> WorkerEnv:
    """This process's :class:`WorkerEnv`, with rank and world size as ``paddle.distributed``
    sees them (the PADDLE_* variables of ``paddle.distributed.launch``)."""
    return dataclasses.replace(WorkerEnv.from_environ(), rank=dist.get_rank(),
                               world_size=dist.get_world_size())


def script_agreement(env: WorkerEnv, schedule, watch_sigterm: bool = False) -> StepAgreement:
    """The stop/snapshot agreement of a script: every :data:`STOP_CHECK_EVERY` steps, on the
    supervisor's control file (script mode) and, with ``watch_sigterm``, on SIGTERM (the
    handler is installed here: main thread, after ``import paddle``). Rank 0 takes time-based
    snapshots alone (``schedule.due_by_time``): it writes them alone."""
    if watch_sigterm:
        signals.install_stop_handler()
    return StepAgreement(env.rank, env.world_size, STOP_CHECK_EVERY, env.run_dir,
                         watch_sigterm=watch_sigterm, schedule=schedule, agree_time=False)


def checkpoint_directory(directory, who: str) -> Path:
    """``directory``, else ``$PADDLERUN_CHECKPOINT_DIR``; ``who`` names the caller in the error."""
    directory = directory or WorkerEnv.from_environ().checkpoint_dir
    if not directory:
        raise ValueError(f"{who} needs a directory: pass {who}(directory=...), or run "
                         f"under `paddlerun run --script`, which sets {CHECKPOINT_DIR}")
    return Path(directory)


def checkpoint_config(directory: Path, source: str, every_steps: Optional[int],
                      every_seconds: Optional[float], keep_last: int, async_save: bool) -> Config:
    """The same validation and messages as a config file's ``checkpoint`` section."""
    return config_from_dict({"checkpoint": {
        "dir": str(directory), "every_steps": every_steps, "every_seconds": every_seconds,
        "keep_last": keep_last, "async_save": async_save}}, source=source)


@dataclasses.dataclass
class CheckpointTarget:
    """What :class:`~paddlerun.trainer.checkpointer.Checkpointer` reads from a trainer (see
    ``loop.Trainer``), for a model trained outside paddlerun's own loop."""
    layer: paddle.nn.Layer
    optimizer: Any
    train: TrainConfig
    position: Position = dataclasses.field(default_factory=Position)


class SupervisorLink:
    """One rank's heartbeats and metrics line. Every rank has one.

    Heartbeats start at construction: build it before anything slow (the supervisor
    gives a rank ``supervisor.hang_timeout_s`` for its first one). Call the methods from
    the training (main) thread.
    """

    def __init__(self, env: WorkerEnv):
        self.env = env
        self.run_dir = env.run_dir
        self.heartbeat: Optional[HeartbeatWriter] = None
        if self.run_dir is not None:
            self.heartbeat = HeartbeatWriter(self.run_dir / "heartbeats", env.rank,
                                             env.heartbeat_interval_s, env.attempt,
                                             supervisor=env.supervisor).start()
        self.metrics: Optional[MetricsLog] = None

    # ------------------------------------------------------------ heartbeats

    def beat(self, step: int, phase: str = "train") -> None:
        if self.heartbeat is not None:
            self.heartbeat.beat(step, phase)

    def set_phase(self, phase: str) -> None:
        if self.heartbeat is not None:
            self.heartbeat.set_phase(phase)

    def stop_heartbeat(self, phase: str = "done") -> None:
        """The last heartbeat, saying ``phase``; later beats do nothing. Idempotent."""
        if self.heartbeat is not None:
            self.heartbeat.stop(phase)
            self.heartbeat = None

    # ------------------------------------------------------------ rank 0's records

    def open_records(self) -> Optional[EventLog]:
        """Open ``metrics.jsonl`` (rank 0 in script mode); returns the event log for the
        Checkpointer's ``snapshot_committed`` events, or None where nothing is recorded."""
        if self.run_dir is None or self.env.rank != 0:
            return None
        if self.metrics is None:
            self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        return EventLog(self.run_dir / "events.jsonl")

    def log_metrics(self, position: Position, values: Mapping[str, Any], optimizer) -> None:
        """One ``metrics.jsonl`` line for the step just done, with ``optimizer``'s learning
        rate; a no-op where no file is open.

        Numbers (and one-element lists, arrays and tensors) are kept; ``step`` and
        ``batch_size`` in ``values`` (hapi's logs carry them) and anything else are dropped.
        """
        if self.metrics is None:
            return
        record = {"step": position.step, "epoch": position.epoch}
        for key, value in values.items():
            if key in ("step", "batch_size"):
                continue
            number = _scalar(value)
            if number is not None:
                record[key] = number
        record.update(lr=float(optimizer.get_lr()), time=time.time(), attempt=self.env.attempt)
        self.metrics.append(record)

    def close_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None


def _scalar(value: Any) -> Optional[float]:
    """``value`` as a float, if it is one number; else None."""
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, paddle.Tensor):
        value = value.numpy()
    if isinstance(value, (np.ndarray, np.generic)) and value.size == 1 \
            and np.issubdtype(value.dtype, np.number):
        return float(value.reshape(()))
    return None
