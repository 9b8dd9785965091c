"""``RUN_DIR/events.jsonl``: what happened to a run, one JSON object a line.

Every line is ``{"time": <unix float>, "iso": <UTC ISO-8601>, "event": ..., "attempt": N,
...details}``. Several processes append to the same file -- the supervisor
(state transitions, failures) and rank 0 (``snapshot_committed``) -- so each line
is written by a single ``os.write`` on a descriptor opened with ``O_APPEND``: the
kernel positions and writes it as a unit, and lines from different processes never
interleave on a local file system. A line is kept at most :data:`MAX_LINE_BYTES`
(PIPE_BUF, 4096) by truncating its longest details; beyond being small enough to
read, that is the size POSIX promises atomic for pipes, should the log ever be
one. (NFS clients do not honour O_APPEND atomically: keep RUN_DIR local or accept
the rare torn line, which :func:`read_events` skips.)

Each write goes straight to the kernel (no Python buffer), so a line is visible to
readers as soon as :meth:`EventLog.emit` returns; there is no fsync -- the log is a
record for people and tools, not the source of truth for checkpoints.

This module is paddle-free and lives in ``trainer/`` so that both the supervisor and
the workers can import it (``trainer/`` never imports ``launcher/``).
"""
from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Union

__all__ = ["MAX_LINE_BYTES", "EventLog", "read_events"]

#: Longest line written, newline included.
MAX_LINE_BYTES = 4096
_RESERVED = ("time", "iso", "event", "attempt")
#: A detail that would be cut to fewer bytes than this is dropped instead.
_MIN_KEEP = 48

PathLike = Union[str, "os.PathLike[str]"]


def _dumps(record: Dict[str, Any]) -> bytes:
    # default=str: a Path, an exception or a numpy scalar is logged as its text
    # instead of failing the caller (an event must never crash a supervisor).
    # allow_nan=False: NaN is not JSON (jq and others refuse it); such a detail is
    # logged as its repr instead (see EventLog.emit).
    return (json.dumps(record, ensure_ascii=False, default=str, allow_nan=False) + "\n").encode()


def _encoded_len(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False, default=str, allow_nan=False).encode())


def _shorten(value: Any, max_encoded: int) -> str:
    """``value``'s text cut so that its JSON encoding takes at most ``max_encoded`` bytes.

    Measured on the encoded form, because escaping (quotes, newlines) can make a
    string's JSON several times longer than its text.
    """
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    total = len(text.encode())

    def cut(n: int) -> str:
        return f"{text[:n]}...[{total - len(text[:n].encode())} bytes truncated]"

    lo, hi = 0, len(text)  # the longest prefix that fits, by bisection
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _encoded_len(cut(mid)) <= max_encoded:
            lo = mid
        else:
            hi = mid - 1
    return cut(lo)


def _fit(record: Dict[str, Any]) -> bytes:
    """The record as one line of at most MAX_LINE_BYTES, shortening details if needed.

    The space left after the reserved fields is shared fairly: details smaller than
    their share are kept whole, larger ones are cut to it, and a detail whose share
    is too small to say anything is dropped. ``"truncated": true`` marks the line.
    """
    line = _dumps(record)
    if len(line) <= MAX_LINE_BYTES:
        return line
    details = {k: v for k, v in record.items() if k not in _RESERVED}
    for key in details:
        del record[key]
    record["truncated"] = True
    if len(_dumps(record)) > MAX_LINE_BYTES // 2:  # a huge event name
        record["event"] = _shorten(record["event"], MAX_LINE_BYTES // 4)
    available = MAX_LINE_BYTES - len(_dumps(record))
    # ", " + "key": + value per detail
    cost = {k: 4 + _encoded_len(k) + _encoded_len(v) for k, v in details.items()}
    remaining = len(details)
    kept: Dict[str, Any] = {}
    for key in sorted(details, key=cost.get):
        share = available // remaining
        remaining -= 1
        if cost[key] <= share:
            kept[key] = details[key]
            available -= cost[key]
            continue
        room = share - 4 - _encoded_len(key)
        if room < _MIN_KEEP:
            continue  # dropped
        kept[key] = _shorten(details[key], room)
        available -= 4 + _encoded_len(key) + _encoded_len(kept[key])
    del record["truncated"]
    record.update((k, kept[k]) for k in details if k in kept)  # in the caller's order
    record["truncated"] = True
    line = _dumps(record)
    while len(line) > MAX_LINE_BYTES:  # only if the arithmetic above was off
        names = [k for k in record if k in details]
        if not names:
            break
        del record[max(names, key=lambda k: _encoded_len(record[k]))]
        line = _dumps(record)
    return line


class EventLog:
    """Appends events to one ``events.jsonl``; any process of the run may hold one."""

    def __init__(self, path: PathLike):
        self.path = Path(path)

    def emit(self, event: str, attempt: int, **details: Any) -> Dict[str, Any]:
        """Append one event line and return the record as written (after any truncation).

        ``details`` must not use the keys ``time`` or ``iso``. Raises OSError if the
        line cannot be written (the caller decides whether that is fatal).
        """
        for key in ("time", "iso"):
            if key in details:
                raise ValueError(f"event detail {key!r} is reserved; rename it "
                                 f"(event {event!r})")
        now = time.time()
        record: Dict[str, Any] = {
            "time": now,
            "iso": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds"),
            "event": str(event),
            "attempt": int(attempt),
            **details,
        }
        try:
            line = _fit(record)
        except (TypeError, ValueError):  # tuple dict keys, a circular reference, NaN
            for key in list(record):
                if key not in _RESERVED:
                    try:
                        _encoded_len(record[key])
                    except (TypeError, ValueError):
                        record[key] = repr(record[key])
            line = _fit(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, line)  # one write: the line lands whole or not at all
        finally:
            os.close(fd)
        if written != len(line):  # a regular file writes short only when full
            raise OSError(f"short write to {self.path}: {written} of {len(line)} bytes "
                          f"(disk full?)")
        return record


def read_events(path: PathLike) -> List[Dict[str, Any]]:
    """Every event in ``path`` in file order; ``[]`` if it does not exist.

    A torn last line (a writer killed mid-write, or still writing) is skipped
    silently; an unreadable line elsewhere is skipped with a warning on stderr.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    complete = data.endswith(b"\n")
    events: List[Dict[str, Any]] = []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
            if not isinstance(value, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            if i == len(lines) - 1 and not complete:
                continue  # torn last line
            print(f"paddlerun: {path}: skipping unreadable line {i + 1}: {exc}",
                  file=sys.stderr)
            continue
        events.append(value)
    return events
