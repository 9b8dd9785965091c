"""The checkpoint store with real files, real fsync and real processes.

Every snapshot here is written through the public API; corruption is done to the files
on disk afterwards. Tests that start processes reap them in the ``spawn`` fixture and
check that none survives.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock
from safetensors import safe_open

from paddlerun.trainer.checkpoint import (
    CheckpointError,
    CheckpointStore,
    LockTimeoutError,
    NoWriterClaimError,
    SnapshotInfo,
    SnapshotState,
    Staging,
    StepAlreadyExistsError,
    WriterBusyError,
    inspect_snapshot,
    read_tensors,
    resolve_snapshot,
    steps_to_keep,
    write_tensors,
)
from paddlerun.trainer.checkpoint.atomic import FileRecord
from paddlerun.trainer.checkpoint.digests import hash_file

LOGGER = "paddlerun.checkpoint"
SHARDS = ["optimizer-rank-00000.safetensors", "optimizer-rank-00001.safetensors"]


def model_arrays(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {"fc.weight": rng.standard_normal((16, 8)).astype(np.float32),
            "fc.bias": np.full(8, step, dtype=np.float64),
            "count": np.array(step, dtype=np.int64)}


def save(store: CheckpointStore, step: int) -> Path:
    staging = store.stage(step)
    staging.write_tensors("model.safetensors", model_arrays(step), metadata={"kind": "model"})
    for rank, name in enumerate(SHARDS):
        staging.write_tensors(name, {"moment": np.full((4, 4), rank + step, dtype=np.float32)})
    staging.write_json("trainer_state.json", {"step": step, "epoch": step // 100})
    return store.commit(staging, {"epoch": step // 100, "world_size": 2})


@pytest.fixture
def store(tmp_path) -> CheckpointStore:
    s = CheckpointStore(tmp_path / "run" / "checkpoints", lock_timeout_s=5.0)
    s.open_writer({"run_dir": str(tmp_path / "run")}).release()  # tests claim again as they need
    return s


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
    assert all(child.returncode is not None for child in children)


def wait_for_file(path: Path, child: subprocess.Popen, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if child.poll() is not None:
            pytest.fail(f"child exited {child.returncode}: {child.stderr.read().decode()}")
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout_s} s"
        time.sleep(0.02)


def rewrite_manifest(snapshot: Path, change) -> None:
    """Edit manifest.json and re-record every listed file's size and sha256."""
    path = snapshot / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    for entry in manifest["files"]:
        target = snapshot / entry["name"]
        if "/" not in entry["name"] and target.is_file() and not target.is_symlink():
            entry["size"], (entry["sha256"],) = hash_file(target)
    path.write_text(json.dumps(manifest))


def warnings_of(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records
                     if r.name == LOGGER and r.levelno == logging.WARNING)


# -- commit ---------------------------------------------------------------------------------


def test_commit_round_trip(store):
    strided = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]  # not contiguous
    staging = store.stage(40)
    assert isinstance(staging, Staging)
    assert staging.path == store.directory / ".staging-step-00000040"
    assert store.stage(40).path == staging.path  # every rank gets the same directory
    rec = staging.write_tensors("model.safetensors", {**model_arrays(40), "strided": strided},
                                metadata={"k": "v"})
    staging.write_json("trainer_state.json", {"step": 40, "rng": [1, 2, 3]})
    staging.write_bytes("notes.bin", b"\x00\x01raw")
    path = store.commit(staging, {"step": 40, "epoch": 2, "world_size": 1, "config_hash": "abc"})

    assert path == store.directory / "step-00000040"
    assert not staging.path.exists()
    assert sorted(os.listdir(path)) == ["manifest.json", "model.safetensors", "notes.bin",
                                        "trainer_state.json"]  # no done marks left behind
    [info] = store.snapshots()
    assert isinstance(info, SnapshotInfo)
    assert (info.step, info.state, info.problem) == (40, "complete", None)
    assert info.state is SnapshotState.COMPLETE and info.size_bytes > 0
    m = info.manifest
    assert (m["step"], m["epoch"], m["world_size"], m["config_hash"]) == (40, 2, 1, "abc")
    assert {"python", "numpy", "safetensors"} <= set(m["versions"])
    assert info.files["model.safetensors"] == rec
    assert (rec.size, rec.sha256) == hash_file(path / "model.safetensors")

    loaded = info.read_tensors("model.safetensors")
    for name, array in {**model_arrays(40), "strided": strided}.items():
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape
        np.testing.assert_array_equal(loaded[name], array)
    assert info.read_json("trainer_state.json") == {"step": 40, "rng": [1, 2, 3]}
    assert info.read_bytes("notes.bin") == b"\x00\x01raw"
    with safe_open(path / "model.safetensors", framework="np") as f:
        assert f.metadata() == {"k": "v"}
    assert store.newest_complete().path == path
    assert inspect_snapshot(path).complete


def test_manifest_is_written_last_and_nothing_else_counts(store, spawn, monkeypatch, caplog):
    path = save(store, 10)
    manifest_mtime = (path / "manifest.json").stat().st_mtime_ns
    assert all((path / n).stat().st_mtime_ns <= manifest_mtime for n in os.listdir(path))

    # A writer killed in the middle of a save leaves only a staging directory.
    child = spawn("""if True:
        import os, signal, sys, numpy as np
        from paddlerun.trainer.checkpoint import CheckpointStore
        staging = CheckpointStore(sys.argv[1]).stage(20)
        staging.write_tensors("model.safetensors", {"w": np.ones(4, np.float32)})
        os.kill(os.getpid(), signal.SIGKILL)""", store.directory)
    assert child.wait(timeout=10) == -signal.SIGKILL
    # A commit that dies after writing manifest.json but before the rename.
    staging = store.stage(30)
    staging.write_json("trainer_state.json", {})
    monkeypatch.setattr(os, "rename", lambda *a: (_ for _ in ()).throw(OSError("power cut")))
    with pytest.raises(OSError, match="power cut"):
        store.commit(staging, {})
    monkeypatch.undo()
    assert (staging.path / "manifest.json").exists()
    # A step-* directory without a manifest (e.g. copied by hand, half-way).
    (store.directory / "step-00000050").mkdir()
    (store.directory / "step-00000050" / "model.safetensors").write_bytes(b"x")

    assert [(i.step, i.state) for i in store.snapshots()] == [(10, "complete"), (50, "incomplete")]
    assert store.newest_complete().step == 10
    assert "step-00000050" in warnings_of(caplog) and "manifest.json" in warnings_of(caplog)


def test_prepare_removes_stale_staging_and_trash_with_a_warning(store, caplog):
    save(store, 10)
    store.stage(20).write_json("trainer_state.json", {})
    trash = store.directory / ".trash-step-00000005-0000"
    (trash / "sub").mkdir(parents=True)
    (trash / "sub" / "f").write_bytes(b"x")
    caplog.set_level(logging.WARNING, LOGGER)
    with store.claim_writer({"run_dir": "the next start"}):
        store.prepare()
    assert not (store.directory / ".staging-step-00000020").exists() and not trash.exists()
    assert (store.directory / "step-00000010").is_dir()
    warned = warnings_of(caplog)
    assert ".staging-step-00000020" in warned and ".trash-step-00000005-0000" in warned


def test_prepare_without_the_writer_claim_is_refused_and_removes_nothing(store):
    staging = store.stage(20)
    staging.write_json("trainer_state.json", {})
    with pytest.raises(NoWriterClaimError, match="claim_writer") as err:
        store.prepare()  # the fixture's claim is released
    assert str(store.directory) in str(err.value)
    with pytest.raises(NoWriterClaimError):
        CheckpointStore(store.directory).prepare()  # a store that never claimed
    assert staging.path.is_dir()


def test_open_writer_of_a_second_job_fails_before_removing_the_first_job_s_staging(store, spawn):
    ready = store.directory.parent / "claimed"
    owner = spawn(CLAIMER, store.directory, "/runs/first", ready)
    wait_for_file(ready, owner)
    in_flight = store.stage(30)  # the first job's snapshot being written
    in_flight.write_json("trainer_state.json", {})
    second = CheckpointStore(store.directory)
    with pytest.raises(WriterBusyError, match=f"pid {owner.pid}"):
        second.open_writer({"run_dir": "/runs/second"})
    assert in_flight.path.is_dir() and second.claim is None


def test_commit_refuses_an_existing_complete_step_and_replaces_a_broken_one(store, caplog):
    save(store, 10)
    with pytest.raises(StepAlreadyExistsError, match="step-00000010 already exists"):
        save(store, 10)
    save(store, 20)
    os.truncate(store.directory / "step-00000020" / "model.safetensors", 3)
    caplog.set_level(logging.WARNING, LOGGER)
    path = save(store, 20)
    assert inspect_snapshot(path).complete
    assert "replacing corrupt snapshot" in warnings_of(caplog)


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/b", "manifest.json", ".hidden", ""])
def test_staging_refuses_names_outside_the_snapshot(store, name):
    with pytest.raises(CheckpointError, match="cannot stage"):
        store.stage(1).write_bytes(name, b"x")


def test_commit_refuses_bad_meta_and_files_nobody_expected(store):
    staging = store.stage(1)
    staging.write_json("trainer_state.json", {})
    for meta in ({"files": []}, {"step": 2}, {"format": "mine"}):
        with pytest.raises(CheckpointError, match="reserved"):
            store.commit(staging, meta)
    (staging.path / "stray.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="stray.bin.*expect_files"):
        store.commit(staging, {})


# -- commit with files from other processes ------------------------------------------------

SHARD_WRITER = """if True:
    import sys, time, numpy as np
    from paddlerun.trainer.checkpoint import CheckpointStore
    directory, step, delay, names = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]
    staging = CheckpointStore(directory).stage(step)
    time.sleep(delay)
    for name in names:
        staging.write_tensors(name, {"moment": np.full((64, 64), 7, np.float32)})
    time.sleep(60)  # stay alive: the parent reaps us
"""


def test_commit_waits_for_shards_written_by_another_process(store, spawn):
    staging = store.stage(60, publish_marks=False)  # as rank 0 does: it knows its own files
    staging.write_tensors("model.safetensors", model_arrays(60))
    staging.write_tensors(SHARDS[0], {"moment": np.zeros((64, 64), np.float32)})
    assert not [p.name for p in staging.path.iterdir() if p.name.startswith(".")]
    spawn(SHARD_WRITER, store.directory, 60, 0.4, SHARDS[1])
    started = time.monotonic()
    path = store.commit(staging, {"world_size": 2}, expect_files=SHARDS, wait_timeout_s=10)
    assert time.monotonic() - started >= 0.3
    info = store.newest_complete()
    assert info.path == path and set(info.files) == {"model.safetensors", *SHARDS}
    np.testing.assert_array_equal(info.read_tensors(SHARDS[1])["moment"], np.full((64, 64), 7, np.float32))


def test_commit_gives_up_naming_the_missing_shard(store, spawn):
    staging = store.stage(70)
    staging.write_tensors("model.safetensors", model_arrays(70))
    child = spawn(SHARD_WRITER, store.directory, 70, 0, SHARDS[0])
    wait_for_file(staging.path / f".{SHARDS[0]}.done", child)
    (staging.path / "optimizer-rank-00002.safetensors").write_bytes(b"half")  # no done mark
    expected = [SHARDS[0], SHARDS[1], "optimizer-rank-00002.safetensors"]
    with pytest.raises(CheckpointError) as err:
        store.commit(staging, {}, expect_files=expected, wait_timeout_s=0.3)
    message = str(err.value)
    assert "0.3 s" in message and str(staging.path) in message
    assert f"{SHARDS[1]} (absent)" in message
    assert "optimizer-rank-00002.safetensors (written but not marked done)" in message
    assert SHARDS[0] not in message
    assert store.snapshots() == []


# -- corruption: newest_complete skips it, warns naming the file, falls back -----------------


def truncate(snap):
    os.truncate(snap / "model.safetensors", (snap / "model.safetensors").stat().st_size - 7)


def flip_byte(snap):
    data = bytearray((snap / "model.safetensors").read_bytes())
    data[-5] ^= 0x01
    (snap / "model.safetensors").write_bytes(data)


def zero_length(snap):
    (snap / "trainer_state.json").write_bytes(b"")


def delete_manifest(snap):
    (snap / "manifest.json").unlink()


def missing_shard(snap):
    (snap / SHARDS[1]).unlink()


def manifest_names_parent(snap):
    (snap.parent / "x").write_bytes(b"outside")
    rewrite_manifest(snap, lambda m: m["files"].append({"name": "../x", "size": 7, "sha256": "0" * 64}))


def manifest_names_absolute(snap):
    rewrite_manifest(snap, lambda m: m["files"].append({"name": "/etc/hostname", "size": 1, "sha256": "0" * 64}))


def symlink_inside(snap):
    outside = snap.parent.parent / "state-copy.json"
    outside.write_bytes((snap / "trainer_state.json").read_bytes())
    (snap / "trainer_state.json").unlink()
    (snap / "trainer_state.json").symlink_to(outside)


def snapshot_is_a_symlink(snap):
    real = snap.parent.parent / "elsewhere"
    snap.rename(real)
    snap.symlink_to(real)


def not_json(snap):
    (snap / "trainer_state.json").write_bytes(b"{'step': 20,")
    rewrite_manifest(snap, lambda m: None)


def header_lies(snap):
    data = (snap / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = data[8:8 + n].replace(b'"F32"', b'"F64"')  # same length, twice the bytes claimed
    (snap / "model.safetensors").write_bytes(data[:8] + header + data[8 + n:])
    rewrite_manifest(snap, lambda m: None)


def manifest_not_json(snap):
    (snap / "manifest.json").write_bytes(b"\x00garbage")


def manifest_wrong_step(snap):
    rewrite_manifest(snap, lambda m: m.update(step=30))


CORRUPTIONS = [
    (truncate, "model.safetensors"), (flip_byte, "model.safetensors"),
    (zero_length, "trainer_state.json"), (delete_manifest, "manifest.json"),
    (missing_shard, SHARDS[1]), (manifest_names_parent, "'../x'"),
    (manifest_names_absolute, "'/etc/hostname'"), (symlink_inside, "trainer_state.json"),
    (snapshot_is_a_symlink, "step-00000020"), (not_json, "trainer_state.json"),
    (header_lies, "model.safetensors"), (manifest_not_json, "manifest.json"),
    (manifest_wrong_step, "manifest.json"),
]


@pytest.mark.parametrize("corrupt, bad_file", CORRUPTIONS, ids=[c.__name__ for c, _ in CORRUPTIONS])
def test_newest_complete_skips_a_broken_snapshot_and_falls_back(store, caplog, corrupt, bad_file):
    save(store, 10)
    corrupt(save(store, 20))
    caplog.set_level(logging.WARNING, LOGGER)
    info = store.newest_complete()
    assert info is not None and info.step == 10
    warned = warnings_of(caplog)
    assert "step-00000020" in warned and bad_file in warned, warned
    broken = store.snapshots(verify=True)[-1]
    assert broken.step == 20 and broken.state != "complete" and bad_file in broken.problem
    with pytest.raises(CheckpointError):  # reading it file by file fails too
        read_everything(broken)


def read_everything(info: SnapshotInfo) -> None:
    if info.manifest is None:
        info.read_bytes("model.safetensors")
    for name in info.files:
        info.read_tensors(name) if name.endswith(".safetensors") else info.read_json(name)


def test_read_tensors_refuses_lying_headers_corrupt_files_and_symlinks(tmp_path):
    path = tmp_path / "t.safetensors"
    rec = write_tensors(path, {"w": np.arange(6, dtype=np.float32)})
    assert read_tensors(path, expected=rec)["w"].tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(CheckpointError, match="t.safetensors is corrupt"):
        read_tensors(path, expected=FileRecord(rec.name, rec.size, ("0" * 64,)))
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    (tmp_path / "lies.safetensors").write_bytes(data[:8] + data[8:8 + n].replace(b"[6]", b"[7]") + data[8 + n:])
    with pytest.raises(CheckpointError, match="lies.safetensors is not a valid safetensors file"):
        read_tensors(tmp_path / "lies.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.safetensors"):
        read_tensors(tmp_path / "empty.safetensors")
    (tmp_path / "link.safetensors").symlink_to(path)
    with pytest.raises(CheckpointError, match="link.safetensors is a symlink"):
        read_tensors(tmp_path / "link.safetensors")


# -- retention ------------------------------------------------------------------------------


def test_retention_keeps_the_newest_k_and_every_m_th(store):
    for step in range(10, 101, 10):
        save(store, step)
    deleted = store.apply_retention(keep_last=2, keep_every_steps=30)
    assert [p.name for p in deleted] == [f"step-{s:08d}" for s in (10, 20, 40, 50, 70, 80)]
    assert [i.step for i in store.snapshots()] == [30, 60, 90, 100]
    assert all(i.complete for i in store.snapshots(verify=True))
    assert not [n for n in os.listdir(store.directory) if n.startswith(".trash")]
    assert store.apply_retention(keep_last=2, keep_every_steps=30) == []
    assert steps_to_keep([5, 10, 15], keep_last=1) == {15}
    with pytest.raises(ValueError, match="keep_last"):
        store.apply_retention(keep_last=0)


def test_retention_never_deletes_the_newest_complete_snapshot(store, caplog):
    (store.directory / "step-00000005").mkdir()  # broken and old: goes
    for step in (10, 20, 30, 40):
        save(store, step)
    truncate(store.directory / "step-00000040")  # broken and newest: stays, for inspection
    caplog.set_level(logging.WARNING, LOGGER)
    deleted = store.apply_retention(keep_last=1)
    assert [p.name for p in deleted] == ["step-00000005", "step-00000010", "step-00000020"]
    assert [(i.step, i.state) for i in store.snapshots()] == [(30, "complete"), (40, "corrupt")]
    assert "step-00000005" in warnings_of(caplog)


def test_retention_leaves_a_snapshot_alone_while_a_reader_holds_it(store, spawn):
    for step in (10, 20, 30):
        save(store, step)
    ready = store.directory.parent / "reader-ready"
    reader = spawn("""if True:
        import sys, time
        from pathlib import Path
        from paddlerun.trainer.checkpoint import CheckpointStore
        store = CheckpointStore(sys.argv[1])
        with store.reading(Path(sys.argv[1]) / "step-00000010") as info:
            assert info.read_tensors("model.safetensors")
            Path(sys.argv[2]).touch()
            time.sleep(60)""", store.directory, ready)
    wait_for_file(ready, reader)
    assert [p.name for p in store.apply_retention(keep_last=1)] == ["step-00000020"]
    assert [i.step for i in store.snapshots(verify=True)] == [10, 30]
    # The same process counts as a reader too.
    info = store.snapshots()[0]
    with store.reading(info) as held:
        assert held.step == 10
        reader.send_signal(signal.SIGKILL)
        reader.wait(timeout=10)
        assert store.apply_retention(keep_last=1) == []
    # The kernel dropped the dead reader's mark.
    assert [p.name for p in store.apply_retention(keep_last=1)] == ["step-00000010"]
    with pytest.raises(CheckpointError, match="no longer complete"):
        with store.reading(info):
            pass


def test_a_reader_of_another_runs_snapshot_is_respected_by_that_runs_retention(store, tmp_path):
    first = save(store, 10)
    save(store, 20)
    resuming = CheckpointStore(tmp_path / "new-run" / "checkpoints")  # resume_from: another run
    with resuming.reading(resolve_snapshot(first)) as info:
        assert info.read_json("trainer_state.json")["step"] == 10
        assert store.apply_retention(keep_last=1) == []
    assert store.apply_retention(keep_last=1) == [first]


LISTER = """if True:
    import json, sys, time
    from pathlib import Path
    from paddlerun.trainer.checkpoint import CheckpointStore
    store, stop, out = CheckpointStore(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    loops, seen, bad = 0, set(), []
    Path(sys.argv[4]).touch()  # imported and listing from now on
    deadline = time.monotonic() + 10
    while not stop.exists() and time.monotonic() < deadline:
        for info in store.snapshots(verify=loops % 2 == 1):
            seen.add(info.step)
            if not info.complete:
                bad.append([info.step, str(info.state), info.problem])
        loops += 1
    out.write_text(json.dumps({"loops": loops, "seen": sorted(seen), "bad": bad}))
"""


def test_listing_in_another_process_never_sees_a_half_deleted_snapshot(store, spawn):
    stop, out = store.directory.parent / "stop", store.directory.parent / "lister.json"
    ready = store.directory.parent / "listing"
    save(store, 1)
    lister = spawn(LISTER, store.directory, stop, out, ready)
    # Only once it lists: its imports took over 4 s on a loaded machine, longer than the loop.
    wait_for_file(ready, lister, timeout_s=60)
    step, deadline = 1, time.monotonic() + 1.0
    while time.monotonic() < deadline:
        step += 1
        save(store, step)
        store.apply_retention(keep_last=1)
    stop.touch()
    assert lister.wait(timeout=10) == 0, lister.stderr.read().decode()
    result = json.loads(out.read_text())
    assert result["bad"] == []
    assert result["loops"] > 20 and len(result["seen"]) > 5, result
    assert [i.step for i in store.snapshots()] == [step]


# -- locks ----------------------------------------------------------------------------------

CLAIMER = """if True:
    import sys, time
    from pathlib import Path
    from paddlerun.trainer.checkpoint import CheckpointStore
    claim = CheckpointStore(sys.argv[1]).claim_writer({"run_dir": sys.argv[2]})
    Path(sys.argv[3]).touch()
    time.sleep(60)
"""


def test_a_second_writer_fails_fast_naming_the_owner_until_it_dies(store, spawn):
    ready = store.directory.parent / "claimed"
    owner = spawn(CLAIMER, store.directory, "/runs/first", ready)
    wait_for_file(ready, owner)
    started = time.monotonic()
    with pytest.raises(WriterBusyError) as err:
        store.claim_writer({"run_dir": "/runs/second"})
    assert time.monotonic() - started < 1.0
    message = str(err.value)
    assert f"pid {owner.pid}" in message and f"host {socket.gethostname()}" in message
    assert "/runs/first" in message and err.value.owner["pid"] == owner.pid

    owner.send_signal(signal.SIGKILL)
    owner.wait(timeout=10)
    with store.claim_writer({"run_dir": "/runs/second"}) as claim:
        assert claim.held and claim.owner["pid"] == os.getpid()
        recorded = json.loads((store.directory / ".writer.json").read_text())
        assert recorded["run_dir"] == "/runs/second" and recorded["pid"] == os.getpid()
    assert not claim.held and not (store.directory / ".writer.json").exists()


def test_lock_timeout_names_the_lock_path(store):
    save(store, 10)
    impatient = CheckpointStore(store.directory, lock_timeout_s=0.2)
    staging = impatient.stage(20)
    staging.write_json("trainer_state.json", {})
    with FileLock(store.lock_path, timeout=1):  # another holder: its own flock descriptor
        with pytest.raises(LockTimeoutError) as err:
            impatient.commit(staging, {})
        with pytest.raises(LockTimeoutError, match="checkpoints/.lock"):
            impatient.apply_retention(keep_last=1)
    assert isinstance(err.value, CheckpointError) and err.value.path == store.lock_path
    assert str(store.lock_path) in str(err.value) and "lock_timeout_s" in str(err.value)
    assert impatient.commit(staging, {}).name == "step-00000020"  # lock free again: it goes through
    with pytest.raises(ValueError, match="lock_timeout_s"):
        CheckpointStore(store.directory, lock_timeout_s=float("inf"))


# -- resolving a PATH -----------------------------------------------------------------------


def test_resolve_snapshot_accepts_snapshot_checkpoints_and_run_dirs(store, tmp_path):
    run_dir = store.directory.parent
    first, newest = save(store, 10), save(store, 20)
    assert resolve_snapshot(run_dir) == newest
    assert resolve_snapshot(store.directory) == newest
    assert resolve_snapshot(first) == first
    flip_byte(newest)
    assert resolve_snapshot(run_dir) == first
    for bad in (tmp_path / "missing", tmp_path):
        with pytest.raises(CheckpointError) as err:
            resolve_snapshot(bad)
        assert str(bad) in str(err.value) and "run dir" in str(err.value)
    flip_byte(first)
    with pytest.raises(CheckpointError, match="no complete snapshot in .*checkpoints.*2 found"):
        resolve_snapshot(run_dir)


def test_the_store_never_imports_paddle():
    code = ("import sys, paddlerun.trainer.checkpoint as c; "
            "assert not any(m.split('.')[0] == 'paddle' for m in sys.modules), 'paddle imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_commit_replaces_a_same_step_snapshot_whose_content_is_corrupt(tmp_path, caplog):
    store = CheckpointStore(tmp_path / "ckpt")
    store.open_writer({"run_dir": str(tmp_path)})
    first = store.stage(5)
    first.write_bytes("data.bin", b"A" * 64)
    path = store.commit(first, meta={})
    with open(path / "data.bin", "r+b") as f:  # same size, different content
        f.write(b"B")
    again = store.stage(5)
    again.write_bytes("data.bin", b"C" * 64)
    with caplog.at_level("WARNING"):
        store.commit(again, meta={})
    assert "replacing corrupt snapshot" in caplog.text
    info = store.newest_complete(verify=True)
    assert info.step == 5 and info.read_bytes("data.bin") == b"C" * 64
