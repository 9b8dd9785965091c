"""The generation fence and the writer claim of an elastic job, with real processes and files.

A worker of an older generation must never commit a snapshot once a newer generation has
started: the supervisor raises the fence (``CheckpointStore.raise_fence``) and every commit
that names an older generation is refused under the same lock. Each test here starts its
own processes (the ``spawn`` fixture reaps them).
"""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from paddlerun.trainer.checkpoint import (CheckpointError, CheckpointStore, StaleGenerationError,
                                          WriterBusyError, inspect_snapshot)
from paddlerun.trainer.rundir.errors import is_retriable


@pytest.fixture
def spawn():
    """Start ``python -c CODE ARGS...``; every child is killed and reaped at teardown."""
    children = []

    def start(code: str, *args) -> subprocess.Popen:
        child = subprocess.Popen([sys.executable, "-c", code, *map(str, args)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        children.append(child)
        return child

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=10)
        child.stderr.close()


def wait_for_file(path: Path, child: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if child.poll() is not None:
            pytest.fail(f"child exited {child.returncode}: {child.stderr.read().decode()}")
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout_s} s"
        time.sleep(0.01)


def finished(child: subprocess.Popen, timeout_s: float = 60.0) -> None:
    assert child.wait(timeout=timeout_s) == 0, child.stderr.read().decode()


def commit_one(store: CheckpointStore, step: int, generation=None) -> Path:
    staging = store.stage(step)
    staging.write_json("trainer_state.json", {"step": step})
    return store.commit(staging, {"world_size": 1}, generation=generation)


def steps_in(directory: Path) -> list:
    return sorted(e.name for e in os.scandir(directory) if e.name.startswith("step-"))


def leftovers(directory: Path) -> list:
    return sorted(e.name for e in os.scandir(directory) if e.name.startswith((".staging-", ".trash-")))


# -- a stale committer ------------------------------------------------------------------------

#: Stage a snapshot of STEP, say so, wait for GO, commit it as GENERATION; write what happened.
STALE_COMMITTER = """if True:
    import json, sys, time
    from pathlib import Path
    from paddlerun.trainer.checkpoint import CheckpointStore
    from paddlerun.trainer.rundir.errors import is_retriable
    directory, step, generation, staged, go, out = sys.argv[1:]
    store = CheckpointStore(directory, lock_timeout_s=30)
    staging = store.stage(int(step))
    staging.write_json("trainer_state.json", {"step": int(step)})
    staging.write_bytes("model.safetensors", b"not really" * 1000)
    Path(staged).touch()
    deadline = time.monotonic() + 60
    while not Path(go).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        result = {"committed": str(store.commit(staging, {"world_size": 1}, generation=int(generation)))}
    except Exception as e:
        result = {"error": type(e).__name__, "message": str(e), "retriable": is_retriable(e),
                  "generation": getattr(e, "generation", None), "fence": getattr(e, "fence", None),
                  "step": getattr(e, "step", None)}
    Path(out).write_text(json.dumps(result))
"""


def run_committer(spawn, tmp_path: Path, store: CheckpointStore, step: int, generation: int,
                  before_commit=lambda: None) -> dict:
    name = f"{step}-{generation}"
    staged, go, out = (tmp_path / f"{kind}-{name}" for kind in ("staged", "go", "out"))
    child = spawn(STALE_COMMITTER, store.directory, step, generation, staged, go, out)
    wait_for_file(staged, child)
    before_commit()
    go.touch()
    finished(child)
    return json.loads(out.read_text())


def test_a_stale_committer_is_refused_once_another_process_raised_the_fence_and_nothing_lands(
        tmp_path, spawn):
    store = CheckpointStore(tmp_path / "checkpoints", lock_timeout_s=30)
    assert commit_one(store, 5, generation=1).name == "step-00000005"

    # Generation 1's writer has its snapshot of step 10 staged when generation 2 starts.
    result = run_committer(spawn, tmp_path, store, 10, 1, before_commit=lambda: store.raise_fence(2))
    assert result["error"] == "StaleGenerationError", result
    message = result["message"]
    for part in ("generation 1", "generation 2", "step 10", str(store.directory), "must stop"):
        assert part in message, (part, message)
    assert (result["generation"], result["fence"], result["step"]) == (1, 2, 10)
    assert result["retriable"] is False, "a restart of generation 1 cannot help"
    assert steps_in(store.directory) == ["step-00000005"], "nothing landed"
    assert leftovers(store.directory) == [], "its staging directory was removed"
    assert store.newest_complete().step == 5

    # A worker of the generation in force commits as before, and its manifest says which it is.
    result = run_committer(spawn, tmp_path, store, 10, 2)
    assert "committed" in result, result
    assert inspect_snapshot(result["committed"]).manifest["generation"] == 2
    assert steps_in(store.directory) == ["step-00000005", "step-00000010"]


def test_without_a_generation_a_commit_ignores_the_fence_as_a_fixed_size_job_does(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints", lock_timeout_s=5)
    store.raise_fence(7)
    path = commit_one(store, 3)
    assert "generation" not in inspect_snapshot(path).manifest
    with pytest.raises(StaleGenerationError) as err:
        commit_one(store, 4, generation=6)
    assert isinstance(err.value, CheckpointError) and not is_retriable(err.value)
    assert steps_in(store.directory) == ["step-00000003"] and leftovers(store.directory) == []


def test_the_fence_never_goes_down_and_says_who_raised_it(tmp_path, spawn):
    store = CheckpointStore(tmp_path / "checkpoints", lock_timeout_s=5)
    assert store.fence() == 0 and not store.fence_path.exists(), "no fence until one is raised"
    assert store.raise_fence(3) == 3
    assert store.raise_fence(2) == 3, "a late call for an older generation leaves it"
    assert store.raise_fence(3) == 3 and store.fence() == 3
    lower = spawn("import sys; from paddlerun.trainer.checkpoint import CheckpointStore; "
                  "sys.exit(CheckpointStore(sys.argv[1]).raise_fence(1))", store.directory)
    assert lower.wait(timeout=60) == 3, lower.stderr.read().decode()
    record = json.loads(store.fence_path.read_text())
    assert record["generation"] == 3 and record["by"] == {"host": socket.gethostname(), "pid": os.getpid()}
    assert abs(record["raised_at"] - time.time()) < 600
    for bad in (-1, True, 2.0):
        with pytest.raises(ValueError, match="generation"):
            store.raise_fence(bad)

    store.fence_path.write_text('{"generation": "two"}')
    with pytest.raises(CheckpointError) as err:
        commit_one(store, 1, generation=3)
    assert str(store.fence_path) in str(err.value) and "delete it" in str(err.value)
    assert steps_in(store.directory) == []


#: Generation 1's writer, in ROUNDS directories in turn: commit steps 1, 2, ... until refused.
RACING_COMMITTER = """if True:
    import json, sys
    from pathlib import Path
    from paddlerun.trainer.checkpoint import CheckpointStore, StaleGenerationError
    root, rounds = Path(sys.argv[1]), int(sys.argv[2])
    for r in range(rounds):
        store = CheckpointStore(root / f"round-{r}", lock_timeout_s=30)
        committed, refused = [], None
        for step in range(1, 2000):
            staging = store.stage(step)
            staging.write_json("trainer_state.json", {"step": step})
            try:
                store.commit(staging, {}, generation=1)
            except StaleGenerationError:
                refused = step
                break
            committed.append(step)
        done = root / f"round-{r}.json"
        Path(f"{done}.tmp").write_text(json.dumps({"committed": committed, "refused": refused}))
        Path(f"{done}.tmp").rename(done)  # whole, or not there: the test polls for it
"""


def test_raise_fence_racing_commits_from_another_process_never_lets_an_older_one_land_after_it(
        tmp_path, spawn):
    rounds, rng = 40, random.Random(20)
    committer = spawn(RACING_COMMITTER, tmp_path, rounds)
    for r in range(rounds):
        directory = tmp_path / f"round-{r}"
        wanted = rng.randint(1, 3)  # raise it after a few commits, at a random moment of the next
        deadline = time.monotonic() + 60
        while not (directory.is_dir() and len(steps_in(directory)) >= wanted):
            assert committer.poll() is None, committer.stderr.read().decode()
            assert time.monotonic() < deadline, f"round {r}: no commits"
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.004))
        assert CheckpointStore(directory, lock_timeout_s=30).raise_fence(2) == 2
        landed = steps_in(directory)
        out = tmp_path / f"round-{r}.json"
        wait_for_file(out, committer)
        result = json.loads(out.read_text())
        assert steps_in(directory) == landed, f"round {r}: a generation 1 commit landed after the fence"
        assert [f"step-{s:08d}" for s in result["committed"]] == landed, (r, result)
        assert result["refused"] == len(landed) + 1, (r, result)
        assert leftovers(directory) == [], r
        assert all(inspect_snapshot(directory / s).manifest["generation"] == 1 for s in landed)
    finished(committer)


# -- the writer claim of a new generation --------------------------------------------------------

#: Claim DIR as GENERATION ("" for none), say so (READY), hold it HOLD seconds, release it
#: and say so (READY.released).
OWNER = """if True:
    import sys, time
    from pathlib import Path
    from paddlerun.trainer.checkpoint import CheckpointStore
    directory, generation, hold, ready = sys.argv[1:]
    claim = CheckpointStore(directory).claim_writer({"run_dir": "/runs/old"},
                                                   generation=int(generation) if generation else None)
    Path(ready).touch()
    time.sleep(float(hold))
    claim.release()
    Path(ready + ".released").touch()
"""


def start_owner(spawn, store: CheckpointStore, generation, hold_s: float) -> subprocess.Popen:
    ready = store.directory.parent / f"owner-{generation}-{time.monotonic_ns()}"
    owner = spawn(OWNER, store.directory, "" if generation is None else generation, hold_s, ready)
    wait_for_file(ready, owner)
    owner.released = Path(f"{ready}.released")
    return owner


def test_a_new_generation_waits_for_the_old_generation_s_writer_to_release(tmp_path, spawn):
    store = CheckpointStore(tmp_path / "checkpoints", lock_timeout_s=30)
    owner = start_owner(spawn, store, 1, hold_s=1.0)
    old = json.loads((store.directory / ".writer.json").read_text())
    assert old["generation"] == 1 and old["pid"] == owner.pid
    started = time.monotonic()
    with store.claim_writer({"run_dir": "/runs/new"}, generation=2) as claim:
        waited = time.monotonic() - started
        assert claim.held and owner.released.exists(), "it got the claim once the old owner let go"
        recorded = json.loads((store.directory / ".writer.json").read_text())
        assert recorded["generation"] == 2 and recorded["pid"] == os.getpid()
    assert 0.3 < waited < 30, waited
    finished(owner)


@pytest.mark.parametrize("owner_generation, claimant_generation",
                         [(2, 2), (3, 2), (None, 2), (1, None)],
                         ids=["same", "newer-owner", "owner-without", "claimant-without"])
def test_any_other_owner_fails_the_claim_at_once(tmp_path, spawn, owner_generation, claimant_generation):
    store = CheckpointStore(tmp_path / "checkpoints", lock_timeout_s=30)
    owner = start_owner(spawn, store, owner_generation, hold_s=120)
    started = time.monotonic()
    with pytest.raises(WriterBusyError) as err:
        store.claim_writer({"run_dir": "/runs/new"}, generation=claimant_generation)
    assert time.monotonic() - started < 10, "not the 30 s wait for an older generation"
    assert f"pid {owner.pid}" in str(err.value) and err.value.owner["pid"] == owner.pid
    if owner_generation is not None:
        assert f"of generation {owner_generation}" in str(err.value)


def test_an_old_generation_s_writer_that_never_lets_go_fails_the_claim_after_the_timeout(tmp_path, spawn):
    store = CheckpointStore(tmp_path / "checkpoints", lock_timeout_s=1.0)
    owner = start_owner(spawn, store, 1, hold_s=120)
    with pytest.raises(WriterBusyError) as err:
        store.claim_writer({"run_dir": "/runs/new"}, generation=3)
    message = str(err.value)
    for part in ("generation 1", "generation 3", "waited 1 s", f"kill pid {owner.pid}", "lock_timeout_s"):
        assert part in message, (part, message)
