"""What makes a snapshot directory complete: the checks every reader runs.

A snapshot is *complete* when ``manifest.json`` parses, every file it names is a
regular file of the recorded size (and, with ``verify=True``, of the recorded sha256;
JSON files parse; safetensors headers fit their data), and nothing in the directory is
a symlink. It is *incomplete* when ``manifest.json`` is missing (the commit never
finished) and *corrupt* otherwise. A problem always starts with the name of the file
that is wrong.
"""
from __future__ import annotations

import enum
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import manifest as mf
from .atomic import FileRecord
from .tensors_io import header_problem


class SnapshotState(str, enum.Enum):
    """How a reader sees a ``step-*`` directory (compares equal to the plain string)."""

    COMPLETE = "complete"      #: every check passed; safe to restore from
    CORRUPT = "corrupt"        #: a file is missing, truncated, altered, unsafe or unreadable
    INCOMPLETE = "incomplete"  #: no manifest.json: the commit never finished

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Inspection:
    state: SnapshotState
    problem: Optional[str]
    manifest: Optional[dict]
    size_bytes: int


class _Broken(Exception):
    def __init__(self, state: SnapshotState, problem: str, manifest: Optional[dict] = None) -> None:
        super().__init__(problem)
        self.state, self.problem, self.manifest = state, problem, manifest


def inspect(path: Path, step: Optional[int], *, verify: bool) -> Inspection:
    """Check the snapshot directory ``path`` of ``step`` (None: take it from the manifest).

    Never raises for a bad snapshot: the answer is its state and problem.
    """
    sizes: dict = {}  # name -> size of every entry, -1 for what is not a regular file
    try:
        manifest = _check(path, step, verify, sizes)
    except _Broken as broken:
        return Inspection(broken.state, broken.problem, broken.manifest, _total(sizes))
    except OSError as exc:  # e.g. deleted while we looked: the caller checks whether it still exists
        name = Path(exc.filename).name if exc.filename else path.name
        return Inspection(SnapshotState.CORRUPT, f"{name}: {exc.strerror or exc}", None,
                          _total(sizes))
    return Inspection(SnapshotState.COMPLETE, None, manifest, _total(sizes))


def _total(sizes: dict) -> int:
    return sum(size for size in sizes.values() if size > 0)


def _check(path: Path, step: Optional[int], verify: bool, sizes: dict) -> dict:
    if path.is_symlink():
        raise _Broken(SnapshotState.CORRUPT, f"{path.name} is a symlink; a snapshot must be a real "
                                             "directory (readers never follow a link out of it)")
    with os.scandir(path) as entries:
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise _Broken(SnapshotState.CORRUPT, f"{entry.name} is a symlink inside the snapshot; "
                                                     "readers never follow one")
            sizes[entry.name] = st.st_size if stat.S_ISREG(st.st_mode) else -1
    if mf.MANIFEST_NAME not in sizes:
        raise _Broken(SnapshotState.INCOMPLETE, f"{mf.MANIFEST_NAME} is missing (the commit never finished)")
    manifest = _read_manifest(path / mf.MANIFEST_NAME, step)
    records = mf.records(manifest)
    for record in records:
        if record.name not in sizes:
            raise _Broken(SnapshotState.CORRUPT, f"{record.name} is missing", manifest)
        if sizes[record.name] < 0:
            raise _Broken(SnapshotState.CORRUPT, f"{record.name} is not a regular file", manifest)
        if sizes[record.name] != record.size:
            raise _Broken(SnapshotState.CORRUPT, f"{record.name} is {sizes[record.name]} bytes, "
                                                 f"{mf.MANIFEST_NAME} says {record.size} (truncated?)", manifest)
    if verify:
        for record in records:
            problem = _content_problem(path / record.name, record)
            if problem:
                raise _Broken(SnapshotState.CORRUPT, f"{record.name}: {problem}", manifest)
    return manifest


def _read_manifest(path: Path, step: Optional[int]) -> dict:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with open(fd, "rb") as f:
        data = f.read()
    try:
        return mf.parse(data, step)
    except ValueError as exc:
        raise _Broken(SnapshotState.CORRUPT, f"{mf.MANIFEST_NAME} {exc}") from None


def _content_problem(path: Path, record: FileRecord) -> Optional[str]:
    mismatch = record.mismatch_of_file(path)
    if mismatch:
        return mismatch
    if path.suffix == ".json":
        try:
            json.loads(path.read_bytes())
        except ValueError as exc:
            return f"is not valid JSON ({exc})"
    if path.suffix == ".safetensors":
        return header_problem(path)
    return None
