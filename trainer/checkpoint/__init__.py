"""The checkpoint store: layout, commit, manifest, locks, retention, verification, listing.

Paddle-free (the supervisor and ``paddlerun ckpt`` import it); capturing and restoring
tensors is :mod:`paddlerun.trainer.state`'s job. A snapshot is
``checkpoints/step-XXXXXXXX/`` holding safetensors and JSON files and ``manifest.json``,
written last, with the size and sha256 of every file. Start at :class:`CheckpointStore`.
"""
from .atomic import FileRecord
from .errors import (CheckpointError, LockTimeoutError, NoWriterClaimError, StaleGenerationError,
                     StepAlreadyExistsError, WriterBusyError)
from .layout import snapshot_name
from .locks import WriterClaim
from .manifest import MANIFEST_NAME
from .retention import steps_to_keep
from .snapshot import SnapshotInfo, inspect_snapshot
from .staging import Staging
from .store import CheckpointStore, resolve_snapshot
from .tensors_io import read_tensors, write_tensors
from .verify import SnapshotState

__all__ = [
    "CheckpointError", "CheckpointStore", "FileRecord", "LockTimeoutError", "MANIFEST_NAME",
    "NoWriterClaimError", "SnapshotInfo", "SnapshotState", "StaleGenerationError", "Staging",
    "StepAlreadyExistsError", "WriterBusyError",
    "WriterClaim", "inspect_snapshot", "read_tensors", "resolve_snapshot", "snapshot_name",
    "steps_to_keep", "write_tensors",
]
