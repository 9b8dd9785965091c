"""``manifest.json``: the list of what a committed snapshot holds, written last.

::

    {
      "format": "paddlerun.snapshot", "format_version": 1,
      "step": 1200, "created_unix": 1732900000.5,
      "versions": {"paddlerun": "0.1.0", "python": "3.11.7", "numpy": "...",
                   "safetensors": "0.8.0", "paddlepaddle": "3.3.1"},
      "files": [{"name": "model.safetensors", "size": 1234, "sha256": "..."}, ...],
      "epoch": 3, "world_size": 2, ...      every key of the caller's ``meta``
    }

A file of more than 64 MiB is recorded with the sha256 of each 64 MiB piece instead
(``{"name": ..., "size": ..., "piece_bytes": 67108864, "sha256_pieces": [...]}``, see
:mod:`.digests`); a manifest holding such a record is format_version 2, so that an older
paddlerun refuses it by its version rather than by a missing sha256.

Snapshots are flat: a file name is one plain path component, so a manifest can never
name anything outside its snapshot (absolute paths, ``..`` and ``/`` are refused).
"""
from __future__ import annotations

import functools
import importlib.metadata
import json
import platform
import time
from typing import Iterable, List, Mapping, Optional

from .atomic import FileRecord

MANIFEST_NAME = "manifest.json"
FORMAT = "paddlerun.snapshot"
FORMAT_VERSION = 2
#: Versions this paddlerun reads: 1 has a whole-file sha256 in every record.
READABLE_VERSIONS = (1, 2)
#: Keys the store writes itself; the caller's ``meta`` may not use them (``versions`` is merged).
RESERVED_KEYS = frozenset({"format", "format_version", "step", "created_unix", "versions", "files"})


def file_name_problem(name: object) -> Optional[str]:
    """Why ``name`` cannot name a file in a snapshot, or None if it can."""
    if not isinstance(name, str) or not name:
        return f"{name!r} is not a file name"
    if name in (".", "..") or any(c in name for c in "/\\\0"):
        return (f"{name!r} is not a plain file name inside the snapshot "
                "(absolute paths, '..' and '/' are refused)")
    if name.startswith("."):
        return f"{name!r} starts with '.', which is reserved for the store's own marks"
    if name == MANIFEST_NAME:
        return f"{name!r} is reserved for the manifest"
    return None


@functools.lru_cache(maxsize=1)
def _detected_versions() -> dict:
    versions = {"python": platform.python_version()}
    # importlib.metadata, not import: the store must stay paddle-free and fast.
    for dist in ("paddlerun", "numpy", "safetensors", "paddlepaddle", "paddlepaddle-gpu"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def build(step: int, records: Iterable[FileRecord], meta: Mapping) -> dict:
    """The manifest of ``step`` holding ``records``; ``meta`` keys go to the top level."""
    records = list(records)
    clash = sorted(k for k in RESERVED_KEYS.intersection(meta) - {"versions"}
                   if not (k == "step" and meta[k] == step))  # repeating the step is harmless
    if clash:
        raise ValueError(f"meta keys {clash} are reserved by the manifest; rename them")
    return {
        "format": FORMAT,
        # The lowest version that describes it: snapshots of small models stay readable by older paddleruns.
        "format_version": FORMAT_VERSION if any(len(r.sha256) > 1 for r in records) else 1,
        "step": step,
        "created_unix": time.time(),
        "versions": {**_detected_versions(), **dict(meta.get("versions", {}))},
        "files": [r.to_json() for r in sorted(records, key=lambda r: r.name)],
        **{k: v for k, v in meta.items() if k != "versions"},
    }


def dumps(manifest: Mapping) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def parse(data: bytes, step: Optional[int]) -> dict:
    """Check the raw manifest of the snapshot of ``step`` (None: any step); raises ``ValueError``
    saying what is wrong."""
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"is not a paddlerun manifest (no \"format\": \"{FORMAT}\")")
    version = manifest.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise ValueError(f"has format_version {version!r}; this paddlerun reads versions "
                         f"{', '.join(map(str, READABLE_VERSIONS))} (was it written by a newer paddlerun?)")
    found = manifest.get("step")
    if not isinstance(found, int) or isinstance(found, bool) or found < 0:
        raise ValueError(f"has an invalid step {found!r}")
    if step is not None and found != step:
        raise ValueError(f"says step {found} but the directory is step {step}")
    files = manifest.get("files")
    if not isinstance(files, list):
        raise ValueError("has no 'files' list")
    seen = set()
    for entry in files:
        record = FileRecord.from_json(entry)
        problem = file_name_problem(record.name)
        if problem:
            raise ValueError(f"names an unsafe path: {problem}")
        if record.name in seen:
            raise ValueError(f"names {record.name!r} twice")
        if version == 1 and len(record.sha256) > 1:
            raise ValueError(f"is format_version 1 but records {record.name!r} in sha256_pieces (version 2)")
        seen.add(record.name)
    return manifest


def records(manifest: Mapping) -> List[FileRecord]:
    """The file records of a manifest that :func:`parse` accepted."""
    return [FileRecord.from_json(entry) for entry in manifest["files"]]
