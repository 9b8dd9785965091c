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
#: An elastic job's generation, which this worker belongs to: its commits are refused once
#: a newer one has started (docs/checkpoints.md#generation-fence). Absent: a fixed-size job.
GENERATION = "PADDLERUN_GENERATION"
#: Test-only: stands in for GENERATION, which the supervisor scrubs from the environment it
#: inherits (PADDLERUN_TEST_* pass), so a test can run a fixed-size job's workers as generation N.
TEST_GENERATION = "PADDLERUN_TEST_GENERATION"


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
    #: The elastic job's generation this worker runs in; None in a fixed-size job.
    generation: Optional[int] = None

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
            generation=_generation(environ.get(GENERATION) or environ.get(TEST_GENERATION)),
        )


def _generation(value: Optional[str]) -> Optional[int]:
    if not value:
        return None
    if not value.isdigit():
        raise ValueError(f"{GENERATION}={value!r} is not a generation number (an int >= 0); "
                         f"only an elastic job's supervisor sets it")
    return int(value)
