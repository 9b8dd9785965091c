"""The one atomic-write primitive: readers never see a partial file, errors leave the old
one and no temporary file, and ``durable`` is what decides the fsyncs (seen with strace)."""
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from helpers import wait_for
from paddlerun.trainer.rundir.atomic_file import atomic_write, temp_path, write_atomic


def test_replaces_the_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")
    for durable in (True, False):
        write_atomic(path, f"new {durable}", durable=durable)
        assert path.read_text() == f"new {durable}"
        assert os.listdir(tmp_path) == ["summary.json"]


def test_an_exception_while_writing_keeps_the_old_file_and_removes_the_temp(tmp_path):
    path = tmp_path / "stop.json"
    path.write_text("old")
    for error in (ValueError("a bad value"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with atomic_write(path, durable=True, mode="w") as f:
                f.write("half of the new")
                raise error
        assert path.read_text() == "old"
        assert os.listdir(tmp_path) == ["stop.json"]


def test_a_process_killed_while_writing_leaves_the_old_file_whole(tmp_path):
    path = tmp_path / "rank-0.json"
    path.write_text("old")
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from paddlerun.trainer.rundir.atomic_file import atomic_write
        with atomic_write({str(path)!r}, durable=True) as f:
            f.write(b"x" * 1000)
            f.flush()
            time.sleep(600)  # killed here
        """)])
    try:
        leftovers = lambda: [n for n in os.listdir(tmp_path) if n != "rank-0.json"]  # noqa: E731
        wait_for(lambda: leftovers() and os.path.getsize(tmp_path / leftovers()[0]) == 1000, 60,
                 "the writer to be half-way")
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        writer.kill()
        writer.wait(timeout=30)
    assert path.read_text() == "old"
    # Its temporary file stays, hidden and named for cleanup by pattern (e.g. heartbeats').
    [left] = leftovers()
    assert left.startswith(".rank-0.json.") and left.endswith(".tmp"), left


def test_the_temporary_file_is_per_thread_and_hidden(tmp_path):
    import threading
    names = set()
    both_alive = threading.Barrier(2, timeout=30)  # a thread id is reused once its thread ended

    def name_it():
        names.add(temp_path(tmp_path / "a").name)
        both_alive.wait()

    threads = [threading.Thread(target=name_it) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(names) == 2 and all(n.startswith(".a.") and n.endswith(".tmp") for n in names)


def traced(tmp_path, code):
    """The fsync and rename calls on files under ``tmp_path`` of ``python -c code``, by strace."""
    trace = tmp_path.parent / f"{tmp_path.name}.strace"
    result = subprocess.run(["strace", "-f", "-y", "-e", "trace=fsync,fdatasync,rename,renameat,renameat2",
                             "-o", str(trace), sys.executable, "-c", code],
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0 and "ptrace" in result.stderr:
        pytest.skip(f"strace cannot trace here: {result.stderr.strip()[:200]}")
    assert result.returncode == 0, result.stderr
    return [line.split(None, 1)[1] for line in trace.read_text().splitlines()
            if str(tmp_path) in line and ("fsync(" in line or "rename" in line)]


WRITERS = {  # writer: (code writing tmp_path/NAME, NAME, durable?)
    "write_atomic-durable": ("from paddlerun.trainer.rundir.atomic_file import write_atomic; "
                             "write_atomic(D / 'out.bin', b'data', durable=True)", "out.bin", True),
    "write_atomic-not-durable": ("from paddlerun.trainer.rundir.atomic_file import write_atomic; "
                                 "write_atomic(D / 'out.bin', b'data', durable=False)", "out.bin", False),
    "summary.json": ("from paddlerun.trainer.rundir.metrics import write_json_atomic; "
                     "write_json_atomic(D / 'summary.json', {'status': 'succeeded'})", "summary.json", True),
    "heartbeat": ("from paddlerun.trainer.rundir.heartbeat import HeartbeatWriter; "
                  "HeartbeatWriter(D, 0, 60).start()", "rank-0.json", False),
    "stop-request": ("from paddlerun.trainer.rundir import control; control.request_stop(D, 'SIGTERM')",
                     "stop.json", False),
}


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
@pytest.mark.parametrize("writer", list(WRITERS))
def test_durable_fsyncs_the_file_before_the_rename_and_the_directory_after(tmp_path, writer):
    code, name, durable = WRITERS[writer]
    calls = traced(tmp_path, f"from pathlib import Path; D = Path({str(tmp_path)!r}); {code}")
    renames = [c for c in calls if c.startswith("rename")]
    assert len(renames) == 1 and renames[0].rstrip().split(", ")[-1].startswith(f'"{tmp_path}/'), calls
    assert f'/{name}"' in renames[0], calls
    if durable:
        tmp_synced, renamed, dir_synced = calls
        assert tmp_synced.startswith("fsync(") and f"/.{name}." in tmp_synced, calls
        assert renamed is renames[0]
        assert dir_synced.startswith("fsync(") and dir_synced.split(")", 1)[0].endswith(">"), calls
    else:
        assert calls == renames, "no fsync at all"
