"""What a worker learns from its environment: rank, world, attempt, run directory.

``paddle.distributed.launch`` sets the PADDLE_* variables; the supervisor sets the
PADDLERUN_* ones (docs/script-mode.md#environment).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from paddlerun.trainer.rundir.process_identity import ProcessIdentity

RUN_DIR = "PADDLERUN_RUN_DIR"
CHECKPOINT_DIR = "PADDLERUN_CHECKPOINT_DIR"
CONFIG = "PADDLERUN_CONFIG"
ATTEMPT = "PADDLERUN_ATTEMPT"
RESTARTS = "PADDLERUN_RESTARTS"
TTY = "PADDLERUN_TTY"
HEARTBEAT_INTERVAL = "PADDLERUN_HEARTBEAT_INTERVAL_S"
#: ``PID:START_TICKS`` of the supervisor: workers stop when it is gone (trainer/rundir/heartbeat.py).
SUPERVISOR = "PADDLERUN_SUPERVISOR"


@dataclass(frozen=True)
class WorkerEnv:
    rank: int
    world_size: int
    local_rank: int
    nnodes: int
    attempt: int
    restarts: int
    run_dir: Optional[Path]
    checkpoint_dir: Optional[Path]
    config_path: Optional[Path]
    tty: bool
    heartbeat_interval_s: float = 1.0
    #: The supervisor of this worker (same host), when started by one.
    supervisor: Optional[ProcessIdentity] = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> "WorkerEnv":
        def path(key):
            return Path(environ[key]) if environ.get(key) else None

        return cls(
            rank=int(environ.get("PADDLE_TRAINER_ID", environ.get("PADDLE_GLOBAL_RANK", 0))),
            world_size=int(environ.get("PADDLE_TRAINERS_NUM", environ.get("PADDLE_GLOBAL_SIZE", 1))),
            local_rank=int(environ.get("PADDLE_LOCAL_RANK", 0)),
            nnodes=int(environ.get("PADDLE_NNODES", 1)),
            attempt=int(environ.get(ATTEMPT, 0)),
            restarts=int(environ.get(RESTARTS, 0)),
            run_dir=path(RUN_DIR),
            checkpoint_dir=path(CHECKPOINT_DIR),
            config_path=path(CONFIG),
            tty=environ.get(TTY) == "1",
            heartbeat_interval_s=float(environ.get(HEARTBEAT_INTERVAL, 1.0)),
            supervisor=ProcessIdentity.parse(environ[SUPERVISOR]) if environ.get(SUPERVISOR) else None,
        )
