"""Assemble one worker: trainer, checkpointer and heartbeat, from config and environment."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

from paddlerun.trainer.config import Config
from paddlerun.trainer.env import WorkerEnv
from paddlerun.trainer.loop import Trainer


def run_worker(config: Config, env: WorkerEnv, run_dir: Path) -> Dict:
    trainer = Trainer(config, env, run_dir)
    return trainer.fit()
