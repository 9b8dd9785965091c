"""The end of a worker's log that Paddle's launcher had not copied when the attempt was torn down."""
import io

from paddlerun.launcher.console_log import MAX_LINES, TAIL_BYTES, LaunchLogForwarder, unshown_lines

WORKER = [f"step {i}/63 - loss: 0.{i:04d}" for i in range(1, 11)]
LAUNCHER = ["LAUNCH INFO 2026-11-30 watching pod", "LAUNCH INFO 2026-11-30 ..."]


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_lines_after_the_last_copied_one_are_unshown(tmp_path):
    worker = write(tmp_path / "workerlog.0", WORKER)
    launch = write(tmp_path / "launch.log", LAUNCHER[:1] + WORKER[:4] + LAUNCHER[1:] + WORKER[4:6])
    assert unshown_lines(worker, launch) == WORKER[6:]


def test_everything_copied_or_no_worker_log_shows_nothing(tmp_path):
    worker = write(tmp_path / "workerlog.0", WORKER)
    launch = write(tmp_path / "launch.log", LAUNCHER + WORKER + LAUNCHER)
    assert unshown_lines(worker, launch) == []
    assert unshown_lines(tmp_path / "workerlog.9", launch) == []


def test_nothing_copied_shows_the_last_lines_only(tmp_path):
    many = [f"line {i}" for i in range(3 * MAX_LINES)]
    worker = write(tmp_path / "workerlog.0", many)
    launch = write(tmp_path / "launch.log", LAUNCHER)
    assert unshown_lines(worker, launch) == many[-MAX_LINES:]
    assert unshown_lines(worker, tmp_path / "no-launch.log") == many[-MAX_LINES:]


def test_a_repeated_line_is_told_apart_by_the_lines_before_it(tmp_path):
    worker = write(tmp_path / "workerlog.0", ["warning: slow", "step 1", "warning: slow", "step 2"])
    launch = write(tmp_path / "launch.log", ["warning: slow", "step 1"])
    assert unshown_lines(worker, launch) == ["warning: slow", "step 2"]


def test_a_line_the_launcher_also_prints_does_not_hide_the_lines_before_it(tmp_path):
    # Seen in CI-like runs: the launcher, stopped, printed its own traceback; the worker's
    # "Traceback" line then matched it, and the emergency snapshot's line was never shown.
    worker = write(tmp_path / "workerlog.0", [
        "step 30", "snapshot step 32 committed (emergency)",
        "emergency snapshot written by rank 0", "rank 0 failed: RuntimeError: peer died",
        "Traceback (most recent call last):", '  File "main.py", line 39, in main',
        "RuntimeError: peer died"])
    launch = write(tmp_path / "launch.log", [
        "step 25", "step 30", "Exception ignored in atexit callback",
        "Traceback (most recent call last):", '  File "controller.py", line 169',
        "SystemExit: 15"])
    assert unshown_lines(worker, launch)[0] == "snapshot step 32 committed (emergency)"


def test_only_the_ends_of_long_logs_are_read(tmp_path):
    long = [f"early line {i:07d}" for i in range(2 * TAIL_BYTES // 20)]
    worker = write(tmp_path / "workerlog.0", long + WORKER)
    launch = write(tmp_path / "launch.log", long + WORKER[:8])
    assert unshown_lines(worker, launch) == WORKER[8:]


def test_forwarder_copies_what_was_appended_since_the_last_call(tmp_path):
    log = tmp_path / "launch.log"
    log.write_bytes(b"from an earlier attempt\n")
    out = io.StringIO()
    console = LaunchLogForwarder(out)
    console.forward()  # nothing followed yet
    console.follow(log, log.stat().st_size)
    with open(log, "ab") as f:
        f.write(b"one\n")
    console.forward()
    with open(log, "ab") as f:
        f.write(b"two \xff\n")
    console.forward()
    assert out.getvalue() == "one\ntwo \ufffd\n"


def test_forwarder_keeps_the_http_polling_off_the_console(tmp_path):
    # httpx logs each request of Paddle's launcher to its HTTP master (twice a second while
    # a node waits for its peers): the launch log keeps them, the console does not.
    poll = (b'[2026-12-04 17:04:46,625] [    INFO] _client.py:1025 - HTTP Request: GET '
            b'http://127.0.0.1:52259/default/info "HTTP/1.0 200 OK"\n')
    log = tmp_path / "launch.log"
    log.write_bytes(b"")
    out = io.StringIO()
    console = LaunchLogForwarder(out)
    console.follow(log, 0)
    with open(log, "ab") as f:
        f.write(b"LAUNCH INFO waiting for peers\n" + poll * 3 + b"step 1 - loss: HTTP Request: ")
    console.forward()
    with open(log, "ab") as f:  # the rest of a line cut by the read is the line's, not noise
        f.write(b'GET http://x "HTTP/1.0"\n' + poll + b"step 2\n")
    console.forward()
    with open(log, "ab") as f:  # a request line cut by the read goes, all of it
        f.write(poll[:-10])
    console.forward()
    with open(log, "ab") as f:
        f.write(poll[-10:] + b"step 3\n")
    console.forward()
    assert out.getvalue() == ('LAUNCH INFO waiting for peers\nstep 1 - loss: HTTP Request: '
                              'GET http://x "HTTP/1.0"\nstep 2\nstep 3\n')
    assert log.read_bytes().count(b"HTTP Request: GET http://127.0.0.1") == 5
