"""Assemble one worker: trainer, checkpointer, heartbeat and stop requests."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

from paddlerun.trainer import sharding, signals
from paddlerun.trainer.checkpointer import Checkpointer
from paddlerun.trainer.rundir.config import Config
from paddlerun.trainer.rundir.env import WorkerEnv
from paddlerun.trainer.rundir.events import EventLog
from paddlerun.trainer.loop import Trainer


def run_worker(config: Config, env: WorkerEnv, run_dir: Path, heartbeat=None) -> Dict:
    signals.install_stop_handler()
    checkpoint_dir = env.checkpoint_dir or Path(config.checkpoint.dir or run_dir / "checkpoints")
    # Any rank may commit (an emergency snapshot after rank 0 died), so every rank can emit.
    events = EventLog(run_dir / "events.jsonl")
    checkpointer = Checkpointer(config, env, checkpoint_dir, run_dir,
                                sharded=sharding.enabled(config.train.sharded_optimizer, env.world_size),
                                events=events)
    trainer = Trainer(config, env, run_dir, checkpointer=checkpointer, heartbeat=heartbeat,
                      watch_sigterm=True)
    return trainer.fit()
