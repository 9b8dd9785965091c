"""``RUN_DIR/metrics.jsonl`` (rank 0, one line per logged step, appended across
attempts) and ``RUN_DIR/summary.json`` (written once at the end)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from paddlerun.trainer.rundir.atomic_file import write_atomic


class MetricsLog:
    """Rank 0 only. Each line is flushed at once so curves survive a crash."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", buffering=1)

    def append(self, record: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(record, sort_keys=False) + "\n")

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list:
    """Every complete line of a metrics file; a torn last line (a crash mid-write) is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def write_json_atomic(path: Path, obj: Any) -> None:
    """Durably: summary.json and the supervisor's owner file outlive a machine crash."""
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", durable=True)
