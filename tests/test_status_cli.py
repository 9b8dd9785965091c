"""``paddlerun status`` and ``paddlerun plot``.

One real run is shared by the module: 2 CPU workers, a snapshot every 10 steps;
``status`` while it trains (both workers SIGSTOPped meanwhile, so it certainly is), then
rank 1 SIGKILLed; the supervisor restarts it from the newest snapshot and it finishes. ``status`` and ``plot`` then describe that
history. The rest uses hand-written run directories.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, assert_no_leftovers, heartbeat, killed_on_error, start, wait_for
from paddlerun.launcher.cli import main
from paddlerun.trainer.rundir.events import read_events

slow = pytest.mark.slow
TOTAL = 120  # two epochs (63 steps each): long enough to catch it training


def cli(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "paddlerun.launcher.cli", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def restarted_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("status-run")
    proc = start(run_dir, f"train.max_steps={TOTAL}", "checkpoint.every_steps=10")
    with killed_on_error(proc):
        def training():
            beats = [heartbeat(run_dir, rank) for rank in (0, 1)]
            return (run_dir / "checkpoints" / "step-00000010").is_dir() and \
                all(b and b["phase"] != "init" and b["step"] >= 10 for b in beats) and beats
        beats = wait_for(training, 180, "both ranks training past the first snapshot")
        # Freeze both workers while we look (well within the hang timeout), so the run is
        # certainly still going; then kill rank 1 and let rank 0 go on to notice.
        for b in beats:
            os.kill(b["pid"], signal.SIGSTOP)
        try:
            during = cli("status", str(run_dir), "--json")
            text = io.StringIO()
            with contextlib.redirect_stdout(text):
                assert main(["status", str(run_dir)]) == 0
        finally:
            os.kill(beats[1]["pid"], signal.SIGKILL)
            os.kill(beats[0]["pid"], signal.SIGCONT)
        stopped_at = heartbeat(run_dir, 1)
        assert stopped_at["phase"] != "done" and stopped_at["step"] < TOTAL - 20, \
            f"the run got too far before the kill to test a restart: {stopped_at}"
        out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-5000:]
    assert_no_leftovers(run_dir)
    resumed = re.search(r"resumed from \S*step-(\d{8})", out)
    assert resumed, out[-5000:]
    return {"run_dir": run_dir, "supervisor_pid": proc.pid, "victim": beats[1],
            "during": during, "during_text": text.getvalue(), "resumed_step": int(resumed.group(1))}


# ------------------------------------------------------------------ status, real run


@slow
def test_status_while_training(restarted_run):
    result = restarted_run["during"]
    assert result.returncode == 0, result.stderr
    s = json.loads(result.stdout)
    assert s["state"] == "running" and not s["interrupted"]
    assert s["supervisor"]["pid"] == restarted_run["supervisor_pid"]
    assert s["supervisor"]["alive"] is True
    assert s["attempt"] == 0 and s["attempts"] == 1 and s["restarts"] == 0
    assert [r["rank"] for r in s["ranks"]] == [0, 1]
    for r in s["ranks"]:
        assert r["alive"] is True and r["attempt"] == 0 and r["step"] >= 10
        assert r["phase"] in ("train", "checkpoint", "eval")
        assert 0 <= r["heartbeat_age_s"] < 5
    assert s["ranks"][1]["pid"] == restarted_run["victim"]["pid"]
    assert s["snapshot"]["step"] >= 10 and s["snapshot"]["name"] == f"step-{s['snapshot']['step']:08d}"
    assert s["metrics"]["train"]["step"] >= 10 and isinstance(s["metrics"]["train"]["loss"], float)
    assert s["summary"] is None

    text = restarted_run["during_text"]
    assert "state     running since" in text and "supervisor pid" in text and ": alive" in text
    assert re.search(r"^1 +%d +\S+ +0 +\d+ +\w+ +\S+ ago +\S+ ago +yes$" % s["ranks"][1]["pid"],
                     text, re.M), text


@slow
def test_status_after_a_restart_and_the_end(restarted_run):
    run_dir = restarted_run["run_dir"]
    result = cli("status", str(run_dir), "--json")
    assert result.returncode == 0, result.stderr
    s = json.loads(result.stdout)
    assert s["state"] == "succeeded" and not s["interrupted"]
    assert s["supervisor"]["alive"] is False
    assert s["attempt"] == 1 and s["attempts"] == 2 and s["restarts"] == 1
    failed = [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "worker_failed"]
    assert len(failed) == 1
    assert s["last_failure"] == {k: failed[0].get(k) for k in ("attempt", "time", "kind", "rank", "cause")}
    assert s["last_failure"]["attempt"] == 0 and s["last_failure"]["cause"]
    assert all(r["phase"] == "done" and r["attempt"] == 1 and r["alive"] is False for r in s["ranks"])
    assert s["snapshot"]["step"] == TOTAL and s["snapshot"]["bad"] == []
    assert s["metrics"]["train"]["step"] == TOTAL and s["metrics"]["train"]["attempt"] == 1
    assert s["metrics"]["eval"]["step"] == TOTAL
    assert s["summary"]["status"] == "succeeded" and s["summary"]["restarts"] == 1
    committed = [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "snapshot_committed"]
    cost = s["snapshot_cost"]
    assert cost["count"] == len(committed) >= 2
    assert 0 < cost["capture_s_median"] < cost["persist_s_median"] < 30

    text = cli("status", str(run_dir)).stdout
    assert "state     succeeded" in text and "not running" in text
    assert "attempt   1 (2 started, 1 restart(s))" in text
    assert "failure   attempt 0, " in text and failed[0]["cause"] in text
    assert f"snapshot  step-{TOTAL:08d}: step {TOTAL}," in text
    assert f"{cost['count']} committed; training blocked " in text


@slow
def test_plot_of_the_real_run_marks_the_failure_and_the_resume_point(restarted_run, tmp_path):
    pytest.importorskip("matplotlib")
    from paddlerun.launcher.plot_cmd import timeline
    from paddlerun.trainer.rundir.metrics import read_metrics

    run_dir = restarted_run["run_dir"]
    metrics = read_metrics(run_dir / "metrics.jsonl")
    line = timeline(metrics, read_events(run_dir / "events.jsonl"))
    assert sorted(line.loss) == [0, 1]
    assert [(m.step, m.attempt) for m in line.resumes] == [(restarted_run["resumed_step"], 1)], \
        "the restart is marked at the snapshot the workers said they resumed from"
    assert [m.attempt for m in line.failures] == [0]
    assert line.failures[0].step == max(m["step"] for m in metrics if m["attempt"] == 0)
    assert min(step for step, _ in line.loss[1]) > restarted_run["resumed_step"]

    out = tmp_path / "plots" / "run.png"
    assert main(["plot", str(run_dir), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


# ------------------------------------------------------------------ status, hand-made run dirs


def write_lines(path: Path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_status_of_a_run_whose_supervisor_was_killed(tmp_path, capsys):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=30)  # reaped: its pid is dead
    now = time.time()
    (tmp_path / "supervisor.json").write_text(json.dumps(
        {"host": os.uname().nodename, "pid": child.pid, "started": now - 60}))
    write_lines(tmp_path / "events.jsonl", [
        {"time": now - 60, "event": "started", "attempt": 0, "state": "starting"},
        {"time": now - 30, "event": "snapshot_committed", "attempt": 0, "step": 10}])
    # metrics: a NaN loss (diverged), then a torn last line (the writer was killed mid-line)
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 10, "loss": 2.5, "time": %f, "attempt": 0}\n{"step": 20, "loss": NaN, "time": %f, '
        '"attempt": 0}\n{"step": 30, "lo' % (now - 40, now - 20))
    assert main(["status", str(tmp_path), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)  # strict JSON: NaN is a string
    assert s["state"] == "running" and s["supervisor"]["alive"] is False and s["interrupted"] is True
    assert s["metrics"]["train"]["step"] == 20 and s["metrics"]["train"]["loss"] == "nan"
    assert s["snapshot"]["count"] == 0 and "step" not in s["snapshot"]
    assert s["ranks"] == [] and s["summary"] is None
    assert s["snapshot_cost"] is None  # an event without timings (an older paddlerun) counts for nothing
    assert main(["status", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "its supervisor is gone" in text and "run the same `paddlerun run` command again" in text
    assert "loss nan" in text and "(no worker heartbeats)" in text


def test_a_reused_pid_is_not_the_supervisor(tmp_path, capsys):
    from paddlerun.launcher.status_cmd import process_alive
    from paddlerun.trainer.rundir.process_identity import ProcessIdentity
    me = ProcessIdentity.me()
    host = os.uname().nodename
    assert process_alive(host, me.pid, me.start_ticks) is True
    assert process_alive(host, me.pid, me.start_ticks - 100) is False, \
        "a process that started at another time is another one with the same pid"
    assert process_alive("some-other-host", me.pid, me.start_ticks) is None
    assert process_alive(host, me.pid, None) is None, "an older record: the pid is in use, cannot tell"


def test_status_of_what_is_not_a_run_dir_is_bad_usage(tmp_path, capsys):
    assert main(["status", str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["status", str(tmp_path / "empty")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    (tmp_path / "checkpoints" / "step-00000010").mkdir(parents=True)
    assert main(["status", str(tmp_path / "checkpoints")]) == 2
    err = capsys.readouterr().err
    assert "looks like a checkpoints directory" in err and "paddlerun ckpt list" in err


# ------------------------------------------------------------------ plot, hand-made run dir


def synthetic_run(run_dir: Path) -> None:
    """Attempt 0 logs steps 5..30 and dies after step 30; snapshots at 10 and 20 (so
    attempt 1 resumes from 20), then attempt 1 logs 25..50. Eval at 25 and 50."""
    t0 = 1_800_000_000.0
    metrics = [{"step": s, "epoch": 0, "loss": 3.0 - s / 20, "acc": s / 60, "time": t0 + s, "attempt": 0}
               for s in range(5, 31, 5)]
    metrics.append({"step": 25, "epoch": 0, "eval_loss": 1.5, "eval_acc": 0.6, "time": t0 + 25.5,
                    "attempt": 0})
    metrics += [{"step": s, "epoch": 0, "loss": 3.0 - s / 20, "acc": s / 60, "time": t0 + 100 + s,
                 "attempt": 1} for s in range(25, 51, 5)]
    metrics.append({"step": 50, "epoch": 0, "eval_loss": 0.5, "eval_acc": 0.9, "time": t0 + 151,
                    "attempt": 1})
    write_lines(run_dir / "metrics.jsonl", metrics)
    write_lines(run_dir / "events.jsonl", [
        {"time": t0, "event": "started", "attempt": 0, "state": "starting"},
        {"time": t0 + 10.5, "event": "snapshot_committed", "attempt": 0, "step": 10},
        {"time": t0 + 20.5, "event": "snapshot_committed", "attempt": 0, "step": 20},
        {"time": t0 + 33, "event": "hang_detected", "attempt": 0, "state": "running"},
        {"time": t0 + 34, "event": "worker_failed", "attempt": 0, "state": "failed",
         "kind": "hang", "cause": "no progress", "rank": 1},
        {"time": t0 + 34.1, "event": "restarting", "attempt": 0, "state": "failed"},
        {"time": t0 + 100, "event": "started", "attempt": 1, "state": "starting"},
        {"time": t0 + 130.5, "event": "snapshot_committed", "attempt": 1, "step": 30},
        {"time": t0 + 152, "event": "succeeded", "attempt": 1, "state": "running"},
    ])


def test_plot_timeline_and_png_from_a_synthetic_run(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from paddlerun.launcher.plot_cmd import timeline
    from paddlerun.trainer.rundir.metrics import read_metrics

    synthetic_run(tmp_path)
    line = timeline(read_metrics(tmp_path / "metrics.jsonl"), read_events(tmp_path / "events.jsonl"))
    assert [s for s, _ in line.loss[0]] == [5, 10, 15, 20, 25, 30]
    assert [s for s, _ in line.loss[1]] == [25, 30, 35, 40, 45, 50]
    assert line.eval_acc == [(25, 0.6), (50, 0.9)]
    assert [(m.step, m.attempt, m.label) for m in line.failures] == [(30, 0, "attempt 0 failed: hang")]
    assert [(m.step, m.attempt) for m in line.resumes] == [(20, 1)]

    assert main(["plot", str(tmp_path)]) == 0
    png = tmp_path / "plot.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "1 failure(s), 1 restart(s)" in capsys.readouterr().out
    assert main(["plot", str(tmp_path), "-o", str(tmp_path / "x.svg")]) == 0
    assert (tmp_path / "x.svg").read_text().lstrip().startswith("<?xml")
    assert main(["plot", str(tmp_path), "-o", str(tmp_path / "x.txt")]) == 2
    assert "cannot write 'txt' files" in capsys.readouterr().err
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary files left"


def test_plot_with_no_metrics_fails_naming_the_file(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    (tmp_path / "events.jsonl").write_text("")
    assert main(["plot", str(tmp_path)]) == 1
    assert str(tmp_path / "metrics.jsonl") in capsys.readouterr().err


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path):
    synthetic_run(tmp_path)
    # A None entry in sys.modules makes `import matplotlib` raise ImportError, as if absent.
    code = ("import sys; sys.modules['matplotlib'] = None; "
            "from paddlerun.launcher.cli import main; sys.exit(main(['plot', sys.argv[1]]))")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "pip install 'paddlerun[plot]'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "plot.png").exists()


def test_plot_marks_a_resume_at_another_world_size():
    from paddlerun.launcher.plot_cmd import timeline
    events = [{"event": "started", "attempt": 0, "time": 1.0},
              {"event": "snapshot_committed", "attempt": 0, "time": 2.0, "step": 20},
              {"event": "started", "attempt": 1, "time": 3.0},
              {"event": "resumed", "attempt": 1, "time": 4.0, "step": 30, "from_world_size": 2,
               "to_world_size": 1}]
    line = timeline([{"step": 10, "loss": 1.0, "attempt": 0}], events)
    assert [(m.step, m.label) for m in line.resumes] == \
        [(30, "attempt 1 resumed from step 30 on 1 workers (was 2)")]
