"""A snapshot being written: ``.staging-step-XXXXXXXX`` inside the checkpoints directory.

Every rank that contributes a file calls ``CheckpointStore.stage(step)`` and gets the same
directory. Each ``write_*`` call writes its file and fsyncs it, then publishes a *done
mark* ``.<name>.done`` (the file's name, size and sha256, the writer's host and pid) by
atomic rename. Rank 0's commit waits for the done marks of the files other ranks write:
a file without its mark may still be half written. The committing process knows its own
files without marks: it stages with ``publish_marks=False`` (a mark costs ~0.12 ms of
the persist thread's time, holding the GIL against training).

The marks themselves are not fsynced: they only tell the committing rank, while the
writers are alive, that a file is finished. After a crash a staging directory is never
read (it has no manifest); what makes a snapshot durable is the fsync of each file
before its mark and, at commit, of the manifest and the directories.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Union

import numpy as np

from ..rundir.atomic_file import write_atomic
from . import atomic
from .atomic import FileRecord
from .errors import CheckpointError
from .manifest import file_name_problem
from .tensors_io import write_tensors

_POLL_S = 0.05


class Staging:
    """The staging directory of one step. Obtain it from ``CheckpointStore.stage(step)``."""

    def __init__(self, path: Path, step: int, publish_marks: bool = True) -> None:
        self.path = path
        self.step = step
        #: Publish a done mark for each file written (False: only this process commits them).
        self.publish_marks = publish_marks
        #: Files known complete here, by name: written by this process, or confirmed by commit.
        self.records: Dict[str, FileRecord] = {}

    def __repr__(self) -> str:
        return f"Staging({str(self.path)!r}, step={self.step})"

    def write_tensors(self, name: str, arrays: Mapping[str, np.ndarray],
                      metadata: Optional[Mapping[str, str]] = None) -> FileRecord:
        """Write ``{tensor name: array}`` as the safetensors file ``name``; fsynced and marked done."""
        return self._publish(write_tensors(self._target(name), arrays, metadata))

    def write_json(self, name: str, obj: Any) -> FileRecord:
        """Write ``obj`` as JSON. JSON has no tuples and only str keys: those come back as lists and str.

        One line, no indent: only then does ``json`` use its C encoder. A trainer state
        holds ~40 KB of RNG state; indented, encoding it took ~3 ms of the persist
        thread's time holding the GIL, the training thread's biggest cost per snapshot
        of a small model (measured with cProfile).
        """
        try:
            data = (json.dumps(obj) + "\n").encode()
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"cannot write {name} into {self.path}: not JSON-serializable ({exc})",
                                  self.path / name) from exc
        return self.write_bytes(name, data)

    def write_bytes(self, name: str, data: Union[bytes, bytearray, memoryview]) -> FileRecord:
        return self._publish(atomic.write_bytes(self._target(name), data))

    def done_record(self, name: str) -> Optional[FileRecord]:
        """The record a writer published for ``name``, or None while the file is not done."""
        try:
            data = self._mark(name).read_bytes()
        except FileNotFoundError:
            return None
        try:
            return FileRecord.from_json(json.loads(data))
        except ValueError as exc:
            raise CheckpointError(f"the done mark {self._mark(name)} is unreadable ({exc})",
                                  self._mark(name)) from exc

    def wait_for(self, names: Iterable[str], timeout_s: float) -> Dict[str, FileRecord]:
        """Poll until every file in ``names`` is present and marked done; their published records."""
        pending = list(dict.fromkeys(names))
        for name in pending:
            self._check_name(name)
        done: Dict[str, FileRecord] = {}
        deadline = time.monotonic() + timeout_s
        while True:
            for name in list(pending):
                record = self.done_record(name)
                if record is not None:
                    done[name] = record
                    pending.remove(name)
            if not pending:
                return done
            if time.monotonic() >= deadline:
                described = [f"{n} ({'written but not marked done' if (self.path / n).exists() else 'absent'})"
                             for n in pending]
                raise CheckpointError(
                    f"gave up after {timeout_s:g} s waiting for {', '.join(described)} in {self.path} "
                    f"(step {self.step}). The rank that writes each of these files has died, is stuck, "
                    f"or never called stage({self.step}); check its log. Raise wait_timeout_s if it "
                    f"is only slow.", self.path)
            time.sleep(_POLL_S)

    def remove_marks(self) -> None:
        """Delete the done marks and their temp files (commit does this before writing the manifest)."""
        for entry in os.scandir(self.path):
            if entry.name.startswith(".") and not entry.is_dir(follow_symlinks=False):
                os.unlink(entry.path)

    def _check_name(self, name: str) -> None:
        problem = file_name_problem(name)
        if problem:
            raise CheckpointError(f"cannot stage {name!r} in {self.path}: {problem}", self.path)

    def _target(self, name: str) -> Path:
        self._check_name(name)
        if not self.path.is_dir():
            raise CheckpointError(
                f"the staging directory {self.path} is gone; was prepare() run by another process "
                f"while this one was saving? Only rank 0 calls prepare(), once, before training.", self.path)
        # A file being rewritten is not done until it is finished again.
        self._mark(name).unlink(missing_ok=True)
        self.records.pop(name, None)
        return self.path / name

    def _publish(self, record: FileRecord) -> FileRecord:
        if self.publish_marks:
            mark = {**record.to_json(), "host": socket.gethostname(), "pid": os.getpid()}
            write_atomic(self._mark(record.name), json.dumps(mark) + "\n", durable=False)
        self.records[record.name] = record
        return record

    def _mark(self, name: str) -> Path:
        return self.path / f".{name}.done"
