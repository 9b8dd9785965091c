"""The checkpoint store's errors: one base type that carries the path (as filelock's
``Timeout`` does), and a few specific ones a caller may want to tell apart."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from paddlerun.trainer.rundir.errors import NotRetriable


class CheckpointError(Exception):
    """A checkpoint directory, snapshot or file that cannot be used.

    The message names the path and, where there is one, the fix; ``path`` holds it.
    """

    def __init__(self, message: str, path: Optional[Union[str, os.PathLike]] = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None


class StepAlreadyExistsError(CheckpointError):
    """A complete snapshot of this step is already committed; snapshots are never overwritten."""


class LockTimeoutError(CheckpointError):
    """A checkpoint lock (``.lock`` or a reader mark) could not be taken in time."""


class WriterBusyError(CheckpointError, NotRetriable):
    """Another live process owns the checkpoint directory (see ``CheckpointStore.claim_writer``).

    Not a fault a restart fixes while that process lives (so NotRetriable: the supervisor
    gives up at once): ``owner`` names it (host, pid, run dir), and the message says to
    stop it or use another directory.
    """

    def __init__(self, message: str, path: Path, owner: dict) -> None:
        super().__init__(message, path)
        self.owner = owner


class NoWriterClaimError(CheckpointError):
    """A writer-only operation (``CheckpointStore.prepare``) was called without the writer claim."""


class StaleGenerationError(CheckpointError, NotRetriable):
    """A commit by a worker of an older generation than the directory's fence (see
    ``CheckpointStore.raise_fence``): the job has moved on without this worker.

    NotRetriable: restarting the same generation cannot help; the worker must stop.
    """

    def __init__(self, message: str, path: Path, generation: int, fence: int, step: int) -> None:
        super().__init__(message, path)
        self.generation, self.fence, self.step = generation, fence, step
