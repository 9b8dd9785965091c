"""events.jsonl with real files and several real processes appending at once."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import psutil
import pytest

from paddlerun.trainer.rundir.events import MAX_LINE_BYTES, EventLog, read_events


def test_emit_and_read_back(tmp_path):
    path = tmp_path / "run" / "events.jsonl"  # parent created on first emit
    log = EventLog(path)
    before = time.time()
    rec = log.emit("attempt_started", 0, pid=123, argv=["python", "-m", "x"])
    rec2 = log.emit("worker_failed", 0, rank=1, reason="killed by SIGKILL",
                    log=Path("/tmp/workerlog.1"), error=RuntimeError("boom"))
    assert before <= rec["time"] <= time.time()
    assert rec["event"] == "attempt_started" and rec["attempt"] == 0
    parsed = datetime.fromisoformat(rec["iso"])
    assert parsed.utcoffset().total_seconds() == 0
    assert abs(parsed.timestamp() - rec["time"]) < 0.001
    events = read_events(path)
    assert events == [rec, {**rec2, "log": "/tmp/workerlog.1", "error": "boom"}]
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 3  # one object a line, newline-terminated
    assert list(json.loads(lines[0])) == ["time", "iso", "event", "attempt", "pid", "argv"]


def test_details_json_cannot_encode_are_logged_as_text(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")
    loop = []
    loop.append(loop)
    rec = log.emit("odd", 1, mapping={(1, 2): "tuple key"}, loop=loop, nan=float("nan"),
                   fine={"a": [1, 2.5]})
    (event,) = read_events(tmp_path / "events.jsonl")
    assert event["mapping"] == "{(1, 2): 'tuple key'}" and event["loop"] == "[[...]]"
    assert event["nan"] == "nan"  # strict JSON: no bare NaN in the file
    assert event["fine"] == {"a": [1, 2.5]}  # only the offending details became text
    assert event == rec


def test_reserved_detail_names_are_refused(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")
    with pytest.raises(ValueError, match="'time' is reserved"):
        log.emit("x", 0, time=1.0)
    with pytest.raises(ValueError, match="'iso' is reserved"):
        log.emit("x", 0, iso="now")
    assert read_events(tmp_path / "events.jsonl") == []  # nothing written, no file


def test_long_details_are_truncated_to_one_short_line(tmp_path):
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    traceback_text = "Traceback (most recent call last):\n" + "  File \"x.py\", line 1\n" * 2000
    rec = log.emit("worker_failed", 2, rank=0, traceback=traceback_text,
                   unicode="ü\"\n" * 3000, small="kept")
    line = path.read_bytes()
    assert len(line) <= MAX_LINE_BYTES and line.endswith(b"\n") and line.count(b"\n") == 1
    (event,) = read_events(path)
    assert event == rec
    assert event["truncated"] is True and event["small"] == "kept" and event["rank"] == 0
    assert event["event"] == "worker_failed" and event["attempt"] == 2
    # Both long details keep a fair share of the line, cut with a note.
    assert event["traceback"].startswith("Traceback (most recent call last):\n  File")
    assert event["traceback"].endswith(" bytes truncated]")
    assert event["unicode"].startswith("ü\"\nü") and event["unicode"].endswith(" bytes truncated]")
    assert len(line) > MAX_LINE_BYTES - 200  # the space was used, not thrown away

    # Even an absurd event name yields one bounded, readable line.
    log.emit("x" * 10_000, 3, a="b" * 10_000)
    assert len(path.read_bytes().split(b"\n")[1]) < MAX_LINE_BYTES
    assert read_events(path)[1]["attempt"] == 3


def test_torn_last_line_is_skipped(tmp_path, capsys):
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    log.emit("a", 0)
    log.emit("b", 0)
    with open(path, "ab") as f:
        f.write(b'{"time": 1.0, "event": "snapsh')  # a writer killed mid-line
    assert [e["event"] for e in read_events(path)] == ["a", "b"]
    assert capsys.readouterr().err == ""
    # A garbage line in the middle is skipped too, with a warning.
    with open(path, "ab") as f:
        f.write(b"\n")
    log.emit("c", 1)
    assert [e["event"] for e in read_events(path)] == ["a", "b", "c"]
    assert "skipping unreadable line 3" in capsys.readouterr().err


APPENDER = r"""
import sys
from paddlerun.trainer.rundir.events import EventLog
path, writer, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
log = EventLog(path)
for i in range(n):
    log.emit("tick", 0, writer=writer, i=i, payload=writer * (1000 + 37 * (i % 50)))
"""


def test_concurrent_appenders_never_interleave(tmp_path):
    path = tmp_path / "events.jsonl"
    writers, n = ["A", "B", "C", "D"], 300
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, str(path), w, str(n)])
             for w in writers]
    try:
        for proc in procs:
            assert proc.wait(timeout=60) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
    assert not psutil.Process().children(recursive=True)
    raw_lines = path.read_bytes().split(b"\n")
    assert raw_lines[-1] == b""
    assert len(raw_lines) - 1 == len(writers) * n  # every line parses on its own
    events = read_events(path)
    assert len(events) == len(writers) * n
    for w in writers:
        mine = [e for e in events if e["writer"] == w]
        assert [e["i"] for e in mine] == list(range(n))  # in order, none lost
        assert all(e["payload"] == w * (1000 + 37 * (e["i"] % 50)) for e in mine)
