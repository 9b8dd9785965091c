"""The names inside a checkpoints directory (a contract: tools and users rely on it).

::

    checkpoints/
      step-00001200/            a committed snapshot (see manifest.py); only these match step-*
      .staging-step-00001400/   a snapshot being written; never read; removed by prepare() if stale
      .trash-step-00000800-1f2e/  a snapshot retention is deleting; removed by prepare() if stale
      .lock                     filelock held for commit, retention and cleanup
      .writer.lock .writer.json the single-writer claim and its owner (host, pid, run dir, generation)
      .generation               the generation fence of an elastic job (see fence.py); absent: none
      .readers/step-00001200.lock  shared flock held by every process reading that snapshot
"""
from __future__ import annotations

import re
from typing import Optional

SNAPSHOT_PREFIX = "step-"
STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"
LOCK_NAME = ".lock"
WRITER_LOCK_NAME = ".writer.lock"
WRITER_OWNER_NAME = ".writer.json"
FENCE_NAME = ".generation"
READERS_DIR = ".readers"

_SNAPSHOT = re.compile(r"^step-(\d{8,})$")

# The files of a paddlerun snapshot (written by trainer/checkpointer.py, read by the tools).
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
SHARD_PATTERN = re.compile(r"^optimizer-rank-(\d{5,})\.safetensors$")


def shard_file(rank: int) -> str:
    """One rank's optimizer shard, when the optimizer state is sharded."""
    return f"optimizer-rank-{rank:05d}.safetensors"


def snapshot_name(step: int) -> str:
    return f"{SNAPSHOT_PREFIX}{step:08d}"


def staging_name(step: int) -> str:
    # Starts with '.', so it can never match step-*: no reader mistakes it for a snapshot.
    return f"{STAGING_PREFIX}{snapshot_name(step)}"


def parse_step(name: str) -> Optional[int]:
    """The step of a snapshot directory name, or None if ``name`` is not one."""
    match = _SNAPSHOT.match(name)
    return int(match.group(1)) if match else None


def check_step(step: object) -> int:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"a checkpoint step must be an int >= 0, got {step!r}")
    return step
