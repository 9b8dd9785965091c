"""A snapshot as readers see it: :class:`SnapshotInfo`, and reading its files against the manifest."""
from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np

from . import manifest as mf
from .atomic import FileRecord
from .digests import hash_bytes
from .errors import CheckpointError
from .layout import parse_step
from .tensors_io import read_tensors
from .verify import SnapshotState, inspect


@dataclass(frozen=True)
class SnapshotInfo:
    """One ``step-*`` directory: where, which step, its state and, if not complete, why."""

    path: Path
    step: int
    state: SnapshotState
    #: What is wrong, starting with the bad file's name; None when complete.
    problem: Optional[str]
    #: Total size of the regular files in the directory.
    size_bytes: int
    mtime: float
    #: The parsed manifest.json; None when missing or invalid.
    manifest: Optional[dict] = field(default=None, hash=False, repr=False)

    @property
    def complete(self) -> bool:
        return self.state == SnapshotState.COMPLETE

    @property
    def files(self) -> Dict[str, FileRecord]:
        """The files the manifest records, by name (empty without a valid manifest)."""
        return {r.name: r for r in mf.records(self.manifest)} if self.manifest else {}

    @property
    def manifest_sha256(self) -> Optional[str]:
        """The identity of this snapshot's manifest (sha256 of its canonical JSON), which names
        every file's sha256: two ranks that see the same value read the same bytes."""
        if self.manifest is None:
            return None
        return hashlib.sha256(json.dumps(self.manifest, sort_keys=True, separators=(",", ":"))
                              .encode()).hexdigest()

    def to_json(self) -> dict:
        return {"path": str(self.path), "step": self.step, "state": self.state.value,
                "problem": self.problem, "size_bytes": self.size_bytes, "mtime": self.mtime}

    def read_bytes(self, name: str) -> bytes:
        """The content of ``name``, checked against the manifest's size and sha256."""
        record, path = self._record(name)
        try:
            # O_NONBLOCK: opening a FIFO planted in the snapshot must not wait for a writer.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise CheckpointError(f"{path} is not a regular file: the snapshot is corrupt", path)
            with open(fd, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise CheckpointError(f"cannot read {path}: {exc}", path) from exc
        problem = record.mismatch(len(data), hash_bytes(data, record.hashed_in))
        if problem:
            raise CheckpointError(f"{path} does not match {mf.MANIFEST_NAME} ({problem}): the "
                                  f"snapshot is corrupt", path)
        return data

    def read_json(self, name: str) -> Any:
        data = self.read_bytes(name)
        try:
            return json.loads(data)
        except ValueError as exc:
            raise CheckpointError(f"{self.path / name} is not valid JSON ({exc})", self.path / name) from exc

    def read_tensors(self, name: str) -> Dict[str, np.ndarray]:
        """The arrays of the safetensors file ``name``, checked against the manifest's size and sha256."""
        record, path = self._record(name)
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise CheckpointError(f"cannot read {path}: {exc}", path) from exc
        if not stat.S_ISREG(st.st_mode) or st.st_size != record.size:
            raise CheckpointError(f"{path} is not the regular file of {record.size} bytes that "
                                  f"{mf.MANIFEST_NAME} records: the snapshot is corrupt", path)
        return read_tensors(path, expected=record)

    def _record(self, name: str):
        if self.manifest is None:
            raise CheckpointError(f"{self.path} has no valid {mf.MANIFEST_NAME} ({self.problem})", self.path)
        record = self.files.get(name)
        if record is None:
            raise CheckpointError(f"{name} is not in the manifest of {self.path}; it holds "
                                  f"{', '.join(sorted(self.files)) or 'nothing'}", self.path)
        return record, self.path / name


def inspect_snapshot(path: Union[str, os.PathLike], verify: bool = True) -> SnapshotInfo:
    """Check one snapshot directory (``step-*``, or a copy of one under another name).

    ``verify=False`` checks the manifest, file presence and sizes; ``verify=True`` also
    every sha256, that JSON files parse and that safetensors headers fit their data.
    """
    path = Path(path)
    info = _inspect(path, parse_step(path.name), verify)
    if info is None:
        raise CheckpointError(f"snapshot {path} does not exist", path)
    return info


def _inspect(path: Path, step: Optional[int], verify: bool) -> Optional[SnapshotInfo]:
    """SnapshotInfo of ``path``, or None when it vanished (retention renamed it away) meanwhile."""
    try:
        mtime = path.lstat().st_mtime
    except FileNotFoundError:
        return None
    found = inspect(path, step, verify=verify)
    if found.state != SnapshotState.COMPLETE and not os.path.lexists(path):
        return None
    if step is None:
        step = found.manifest["step"] if found.manifest else -1
    return SnapshotInfo(path, step, found.state, found.problem, found.size_bytes, mtime, found.manifest)
