"""The chaos runner (bench/chaos.py): its schedule, its tools, and a short chaos run for real.

The quick run attacks the real job (2 CPU workers) with one fault of each of the
kinds and must pass every check of the runner: same digest as an uninterrupted run,
every fault recovered with its cause in events.jsonl, no corrupt snapshot loaded, no
process left. The long soak is a documented command (bench/chaos.py's docstring), not a test.
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from helpers import REPO, assert_no_leftovers

spec = importlib.util.spec_from_file_location("chaos", REPO / "bench" / "chaos.py")
chaos = importlib.util.module_from_spec(spec)
sys.modules["chaos"] = chaos  # dataclasses look their module up by name
spec.loader.exec_module(chaos)


# ---------------------------------------------------------------- the schedule (no processes)

def test_the_same_seed_gives_the_same_schedule():
    assert chaos.plan(1, 12, 300) == chaos.plan(1, 12, 300)
    assert chaos.plan(2024, 50, 700) == chaos.plan(2024, 50, 700)


def test_different_seeds_give_different_schedules():
    schedules = {tuple((f.kind, f.trigger_step, f.rank) for f in chaos.plan(seed, 6, 300))
                 for seed in range(20)}
    assert len(schedules) == 20


def test_the_schedule_is_within_bounds_and_covers_every_kind():
    kinds = len(chaos.Kind)
    for seed in range(10):
        faults = chaos.plan(seed, 2 * kinds + 2, 300)
        steps = [f.trigger_step for f in faults]
        assert steps == sorted(steps) and len(set(steps)) == len(steps)
        assert chaos.FIRST_TRIGGER <= steps[0] and steps[-1] <= 300 - chaos.END_MARGIN
        for block in (faults[:kinds], faults[kinds:2 * kinds]):
            assert {f.kind for f in block} == set(chaos.Kind), "each block has every kind"
        for f in faults:
            if f.kind in (chaos.Kind.WORKER_KILL, chaos.Kind.WORKER_STOP):
                assert f.rank in (0, 1)
            elif f.kind is chaos.Kind.PERSIST_KILL:
                assert f.rank == 0, "rank 0 is the one that writes snapshots"
            else:
                assert f.rank is None


def test_a_max_steps_too_small_for_the_faults_is_refused_naming_the_option():
    with pytest.raises(ValueError, match="raise --max-steps to at least 75"):
        chaos.plan(1, 10, 70)


def test_plan_prints_the_schedule_and_starts_nothing():
    out = subprocess.run([sys.executable, str(REPO / "bench" / "chaos.py"), "--faults", "6",
                          "--seed", "1", "--plan"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 6
    assert [line.split()[1] for line in lines] == [f.kind.value for f in chaos.plan(1, 6, 300)]


# ---------------------------------------------------------------- its tools, on real files and processes

def test_flip_byte_alters_one_tensor_byte_and_keeps_the_size(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": np.arange(256, dtype=np.float32), "b": np.ones(8, dtype=np.float32)}, str(path))
    before = path.read_bytes()
    offset = chaos.flip_byte(path, salt=7)
    after = path.read_bytes()
    assert len(after) == len(before)
    assert [i for i in range(len(before)) if before[i] != after[i]] == [offset]
    assert after[offset] == before[offset] ^ 0xFF
    header_end = 8 + int.from_bytes(before[:8], "little")
    assert offset >= header_end, "the header is left alone: the file still parses"
    load_file(str(path))


def test_kill_all_kills_the_run_s_processes_and_nothing_else(tmp_path):
    run_dir = tmp_path / "run"
    other = tmp_path / "other"
    mine = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", str(run_dir)])
            for _ in range(2)]
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", str(other)])
    os.kill(mine[1].pid, signal.SIGSTOP)  # a stopped process is killed too
    try:
        assert sorted(p.pid for p in chaos.processes_of(run_dir)) == sorted(p.pid for p in mine)
        killed = chaos.kill_all(run_dir)
        assert sorted(killed) == sorted(p.pid for p in mine)
        assert chaos.processes_of(run_dir) == []
        for p in mine:
            p.wait(timeout=10)  # already reaped by kill_all: the code is not ours to read
        assert bystander.poll() is None
    finally:
        for p in (*mine, bystander):
            p.kill()
            p.wait(timeout=10)


# ---------------------------------------------------------------- a short chaos run, for real

def assert_all_runs_left_nothing(work_dir):
    for run_dir in (work_dir / "reference", work_dir / "run"):
        assert_no_leftovers(run_dir)


@pytest.mark.slow
def test_a_short_chaos_run_loses_nothing(tmp_path):
    """One fault of each kind (seed 1, one fault per kind): about 4-5 minutes on 2 cores.

    ``--hang-timeout 15``: the supervisor's hang timeout also bounds a worker's start-up
    (import paddle, rendezvous), which takes over 8 s on a busy 2-core machine.
    """
    report = tmp_path / "chaos.json"
    argv = [sys.executable, str(REPO / "bench" / "chaos.py"), "--faults", str(len(chaos.Kind)), "--seed", "1",
            "--hang-timeout", "15", "--work-dir", str(tmp_path), "--json", str(report),
            "--timeout", "1300"]  # on a busy 2-core machine the default (300 + 60 x faults) ran out
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        out, _ = proc.communicate(timeout=1500)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the runner kills the run's processes on its way out
        out, _ = proc.communicate(timeout=60)
        timed_out = AssertionError(f"the chaos run did not finish in 25 min:\n{out[-6000:]}")
        try:  # kill anything left, but report the timeout, not the leftovers it caused
            assert_all_runs_left_nothing(tmp_path)
        except AssertionError as leftovers:
            raise timed_out from leftovers
        raise timed_out from None
    assert_all_runs_left_nothing(tmp_path)
    assert proc.returncode == 0, out[-8000:]
    assert "PASSED" in out and "[FAIL]" not in out, out[-8000:]
    figures = json.loads(report.read_text())
    assert figures["passed"] and all(c["ok"] for c in figures["checks"]), figures["checks"]
    assert {c["name"] for c in figures["checks"]} == {
        "run succeeded", "every fault injected", "final digest equals the uninterrupted run's",
        "no process of the run left", "no corrupted snapshot loaded",
        "every fault in events.jsonl with its cause"}
    every_kind = {kind.value: 1 for kind in chaos.Kind}
    assert figures["injected_by_kind"] == every_kind
    assert figures["recovered_by_kind"] == every_kind
    assert figures["digest"] == figures["reference_digest"]
    assert figures["reruns"] == len(chaos.RERUN_KINDS), "each of those kinds stops paddlerun, then runs again"
    assert figures["restarts"] >= 4
    persist = next(f for f in figures["faults_detail"] if f["kind"] == "persist_kill")
    assert persist["mid_persist"], persist["note"]
    second = next(f for f in figures["faults_detail"] if f["kind"] == "second_job")
    assert second["second_refused"] and second["staging_kept"], second["note"]
    assert second["mid_persist"], second["note"]
    corrupt = next(f for f in figures["faults_detail"] if f["kind"] == "corrupt")
    assert corrupt["corrupted"].endswith("model.safetensors")
    assert corrupt["resumed_step"] < corrupt["crash_step"], "an older snapshot was used"
    orphaned = next(f for f in figures["faults_detail"] if f["kind"] == "supervisor_kill")
    assert orphaned["stopped_s"] is not None, orphaned["note"]  # its job stopped by itself
    startup = next(f for f in figures["faults_detail"] if f["kind"] == "startup_preempt")
    assert startup["exit_code"] == chaos.REQUEUE, startup["note"]
    print(f"\nsupervisor_kill: {orphaned['note']}; startup_preempt: {startup['note']}")
