"""Chaos suite, disk faults: a snapshot write that fails for real, and what is left afterwards.

Real errors from the kernel, no mocks:

- **ENOSPC**: a small tmpfs mounted by the test (needs root / CAP_SYS_ADMIN; skipped with the
  reason otherwise), filled so that exactly N pages are free. Sweeping N over every page a
  save needs makes the disk run out in every phase of a save: inside the safetensors writer,
  in a done mark, in ``trainer_state.json``, in ``manifest.json``.
- **EFBIG**: a child process with ``RLIMIT_FSIZE`` (and SIGXFSZ ignored) gets a real
  "File too large" from write(2) for the first file bigger than the limit.
- End to end: ``paddlerun run`` with ``checkpoint.dir`` on a tmpfs that fills after two
  snapshots (``slow``).

Not here: EIO. There is no device-mapper (dm-error / dm-flakey) on the CI machine to make a
disk fail for real; EIO reaches the same code (an OSError from write(2) or fsync(2)) as
the errors above.

What must hold every time: the older snapshot stays complete and byte-identical; no
``step-*`` directory of the failed step appears (the staging directory may stay, but no
reader lists it, and the next ``prepare()`` -- the next start -- removes it); the error
names errno's text; after the space is back the same save succeeds.

The training-side policy this documents (docs/checkpoints.md#disk-full-or-failing): a persist error
is raised on the training thread at the next save (``checkpoint.async: false``: at once),
the worker exits 1 with a CheckpointError naming the cause, the supervisor restarts from
the newest complete snapshot (removing the leftover staging directory, which frees its
space), and when the disk is still full the restart budget runs out and paddlerun gives up
with exit 1 and the ENOSPC as the root cause. Training never goes on without snapshots.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest

from helpers import REPO, assert_no_leftovers, events, run, summary
from paddlerun.trainer.checkpoint import CheckpointStore, inspect_snapshot

LOGGER = "paddlerun.checkpoint"
PAGE = os.sysconf("SC_PAGE_SIZE")
FILES = ("model.safetensors", "optimizer.safetensors", "trainer_state.json")


# ---------------------------------------------------------------- a small real filesystem

@contextlib.contextmanager
def tmpfs(where: Path, size: str):
    """Mount a tmpfs of ``size`` at ``where`` for the block; always unmounted afterwards."""
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("no mount/umount binaries here: cannot make a small filesystem to fill")
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755",
                              "paddlerun-test-tmpfs", str(where)],
                             capture_output=True, text=True, timeout=60)
    if mounted.returncode != 0:
        why = mounted.stderr.strip()
        if os.geteuid() != 0 or "permission denied" in why.lower() or "not permitted" in why.lower():
            pytest.skip(f"cannot mount a tmpfs ({why or 'EPERM'}): the full-disk tests need root "
                        f"(CAP_SYS_ADMIN) to mount a small filesystem")
        pytest.fail(f"mount -t tmpfs failed: {why}")
    try:
        yield where
    finally:
        unmount(where)


def unmount(where: Path) -> None:
    last = ""
    for _ in range(50):  # a process of the run may still be exiting (its cwd or files there)
        done = subprocess.run(["umount", str(where)], capture_output=True, text=True, timeout=60)
        if done.returncode == 0:
            return
        last = done.stderr.strip()
        time.sleep(0.2)
    lazy = subprocess.run(["umount", "-l", str(where)], capture_output=True, text=True, timeout=60)
    assert lazy.returncode == 0, f"could not unmount {where}: {last}; lazily: {lazy.stderr}"
    raise AssertionError(f"{where} was still busy ({last}); detached it lazily")


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def leave_free(mount: Path, free: int) -> None:
    """Allocate a filler file so that exactly ``free`` bytes (a multiple of a page) stay free."""
    filler = mount / "filler"
    filler.unlink(missing_ok=True)
    excess = free_bytes(mount) - free
    if excess > 0:
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.posix_fallocate(fd, 0, excess)
        finally:
            os.close(fd)
    assert free_bytes(mount) == free, (free_bytes(mount), free)


# ---------------------------------------------------------------- a snapshot with four sizes

def save_snapshot(store: CheckpointStore, step: int) -> Path:
    """Written as a worker writes one (safetensors through the library, JSON through
    atomic.write_bytes). Sizes differ file by file so a size limit picks which one fails:
    model ~8 KB < optimizer ~16 KB < trainer_state.json ~40 KB < manifest.json ~80 KB."""
    staging = store.stage(step)
    staging.write_tensors("model.safetensors", {"w": np.full((32, 64), step, np.float32)})
    staging.write_tensors("optimizer.safetensors", {"m": np.full((64, 64), step, np.float32)})
    staging.write_json("trainer_state.json", {"step": step, "rng": list(range(7000))})
    return store.commit(staging, {"epoch": 0, "world_size": 1, "note": "n" * 80_000})


def file_contents(snapshot: Path) -> Dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(snapshot.iterdir())}


def phase_of(staging: Path, sizes: Dict[str, int]) -> str:
    """Where a failed save stopped, from what it left in its staging directory."""
    if not staging.exists():
        return "before staging"
    if (staging / "manifest.json").exists():
        return "writing manifest.json"
    for name in FILES:
        if not (staging / f".{name}.done").exists():
            if (staging / name).exists() and (staging / name).stat().st_size == sizes[name]:
                return f"done mark of {name}"
            return f"writing {name}"
    return "after the files, before the manifest"


@pytest.fixture(scope="module")
def enospc_sweep(tmp_path_factory) -> List[dict]:
    """Save step 20 with 0, 1, 2, ... pages free until it fits; record each outcome."""
    mount = tmp_path_factory.mktemp("enospc") / "disk"
    results = []
    with tmpfs(mount, "2m"):
        directory = mount / "checkpoints"
        sizes: Optional[Dict[str, int]] = None
        for pages in range(0, 80):
            shutil.rmtree(directory, ignore_errors=True)
            (mount / "filler").unlink(missing_ok=True)
            store = CheckpointStore(directory, lock_timeout_s=10)
            store.prepare()
            older = save_snapshot(store, 10)
            if sizes is None:
                sizes = {name: (older / name).stat().st_size for name in FILES}
            before = file_contents(older)
            leave_free(mount, pages * PAGE)
            error = None
            try:
                save_snapshot(store, 20)
            except Exception as exc:  # noqa: BLE001 - every kind is recorded and judged below
                error = exc
            staging = directory / ".staging-step-00000020"
            outcome = {
                "pages": pages, "error": error, "phase": phase_of(staging, sizes) if error else "saved",
                "entries": sorted(os.listdir(directory)),
                "states": [(i.step, str(i.state)) for i in store.snapshots(verify=True)],
                "newest": store.newest_complete().step,
                "older_unchanged": file_contents(older) == before,
                "staging": str(staging),
            }
            # The space comes back and the job starts again: prepare() cleans, the save fits.
            (mount / "filler").unlink(missing_ok=True)
            CheckpointStore(directory, lock_timeout_s=10).prepare()
            outcome["after_prepare"] = sorted(os.listdir(directory))
            if error is not None:
                retried = save_snapshot(store, 20)
                outcome["retry_complete"] = inspect_snapshot(retried).complete
            results.append(outcome)
            if error is None:
                break
        shutil.rmtree(directory, ignore_errors=True)
    return results


def test_enospc_sweep_reaches_every_phase_of_a_save(enospc_sweep):
    assert enospc_sweep[-1]["error"] is None, "the save fits once there is room"
    phases = {r["phase"] for r in enospc_sweep}
    for expected in ("writing model.safetensors", "writing optimizer.safetensors",
                     "writing trainer_state.json", "writing manifest.json",
                     "done mark of model.safetensors"):
        assert expected in phases, sorted(phases)


def test_enospc_in_any_phase_leaves_the_older_snapshot_and_nothing_visible(enospc_sweep):
    failures = [r for r in enospc_sweep if r["error"] is not None]
    assert len(failures) > 20
    for r in failures:
        where = f"{r['pages']} pages free, {r['phase']}: {r['error']!r}"
        assert "No space left on device" in str(r["error"]), where
        assert r["states"] == [(10, "complete")], where
        assert r["newest"] == 10, where
        assert r["older_unchanged"], where
        assert "step-00000020" not in r["entries"], where
        assert all(not e.startswith("step-") or e == "step-00000010" for e in r["entries"]), where
        assert not any(e.startswith(".staging") for e in r["after_prepare"]), where
        assert r["retry_complete"], where


def test_enospc_error_names_the_file_in_every_phase(enospc_sweep):
    unnamed = {}
    for r in enospc_sweep:
        if r["error"] is not None and r["staging"] not in str(r["error"]):
            unnamed.setdefault(r["phase"], repr(r["error"]))
    assert not unnamed, "errors that name no file or directory:\n" + \
        "\n".join(f"  {phase}: {message}" for phase, message in sorted(unnamed.items()))


def test_a_restart_on_a_full_disk_can_still_read_its_snapshot_and_claim_after_space_returns(tmp_path):
    """Reading needs no space (reader marks are empty files); the writer claim does
    (``.writer.json``): it fails with ENOSPC and releases its lock, so the next start can claim."""
    mount = tmp_path / "disk"
    with tmpfs(mount, "1m"):
        store = CheckpointStore(mount / "checkpoints", lock_timeout_s=10)
        store.prepare()
        older = save_snapshot(store, 10)
        expected = file_contents(older)
        leave_free(mount, 0)
        store.prepare()  # the next start, on a full disk: only deletes
        newest = store.newest_complete()
        assert newest is not None and newest.step == 10
        with store.reading(newest) as info:
            assert info.read_tensors("model.safetensors")["w"][0, 0] == 10
            assert info.read_json("trainer_state.json")["step"] == 10
        with pytest.raises(OSError) as err:
            store.claim_writer({"run_dir": str(tmp_path)})
        assert err.value.errno == 28
        (mount / "filler").unlink()
        with store.claim_writer({"run_dir": str(tmp_path)}) as claim:
            assert claim.held
        assert file_contents(older) == expected


# ---------------------------------------------------------------- EFBIG: a file size limit

EFBIG_CHILD = """if True:
    import json, resource, signal, sys
    sys.path.insert(0, sys.argv[3])
    from pathlib import Path
    from paddlerun.trainer.checkpoint import CheckpointStore
    from test_disk_faults import save_snapshot
    store = CheckpointStore(sys.argv[1], lock_timeout_s=10)
    store.prepare()
    save_snapshot(store, 10)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write(2) then fails with EFBIG
    limit = int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        save_snapshot(store, 20)
        print(json.dumps({"error": None}))
    except Exception as exc:
        print(json.dumps({"error": repr(exc), "message": str(exc), "type": type(exc).__name__}))
"""

#: the file that crosses the limit first -> a limit between its size and the ones before it
EFBIG_LIMITS = {"model.safetensors": 4096, "optimizer.safetensors": 12 * 1024,
                "trainer_state.json": 32 * 1024, "manifest.json": 64 * 1024}


@pytest.fixture(scope="module")
def efbig(tmp_path_factory) -> Dict[str, dict]:
    results = {}
    for name, limit in EFBIG_LIMITS.items():
        directory = tmp_path_factory.mktemp("efbig") / "checkpoints"
        child = subprocess.run([sys.executable, "-c", EFBIG_CHILD, str(directory), str(limit),
                                str(Path(__file__).parent)],
                               cwd=REPO, capture_output=True, text=True, timeout=120)
        assert child.returncode == 0, child.stderr
        results[name] = {"directory": directory, **json.loads(child.stdout.splitlines()[-1])}
    return results


def ckpt_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "paddlerun.launcher.cli", "ckpt", *argv],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", list(EFBIG_LIMITS))
def test_efbig_leaves_the_older_snapshot_and_nothing_visible(efbig, name, caplog):
    result = efbig[name]
    directory = result["directory"]
    assert result["error"] is not None, f"the limit did not stop the save of {name}"
    assert "File too large" in result["message"], result
    staging = directory / ".staging-step-00000020"
    assert staging.is_dir(), "the failed save's staging directory is left behind ..."
    assert not (staging / f".{name}.done").exists()  # (the safetensors writer removes its partial file)
    assert sorted(p.name for p in directory.glob("step-*")) == ["step-00000010"]

    listed = ckpt_cli("list", str(directory), "--verify", "--json")  # ... but no reader lists it
    assert listed.returncode == 0, listed.stderr
    assert [(s["step"], s["state"]) for s in json.loads(listed.stdout)] == [(10, "complete")]
    verified = ckpt_cli("verify", str(directory))
    assert verified.returncode == 0 and "step-00000010" in verified.stdout, verified.stdout + verified.stderr

    caplog.set_level(logging.WARNING, LOGGER)
    store = CheckpointStore(directory, lock_timeout_s=10)
    store.prepare()  # the next start
    assert not staging.exists()
    assert "removing stale unfinished snapshot" in caplog.text and staging.name in caplog.text
    assert inspect_snapshot(save_snapshot(store, 20)).complete, "without the limit it saves"


@pytest.mark.parametrize("name", [
    "model.safetensors", "optimizer.safetensors",
    "trainer_state.json", "manifest.json",
])
def test_efbig_error_names_the_file(efbig, name):
    result = efbig[name]
    assert str(result["directory"] / ".staging-step-00000020" / name) in result["message"], result


# ---------------------------------------------------------------- end to end

def cleaned_staging(out: str, staging: Path) -> bool:
    """Whether a worker logged removing ``staging`` at its start (CheckpointStore.prepare)."""
    return any(line.endswith(str(staging)) for line in out.splitlines()
               if "removing stale unfinished snapshot" in line)


@pytest.mark.slow
def test_a_full_checkpoint_disk_gives_up_with_enospc_and_keeps_the_older_snapshots(tmp_path):
    """checkpoint.dir on a 2 MB tmpfs: the snapshots of steps 10 and 20 fit (~0.8 MB each),
    step 30's does not. The error surfaces at the next save (step 40), the worker exits 1, the
    restart removes the staging directory and fails the same way, and the supervisor gives
    up with ENOSPC as the root cause. With room again, the same command resumes from 20."""
    disk = tmp_path / "disk"
    run_dir = tmp_path / "run"
    with tmpfs(disk, "2000k"):
        ckpts = disk / "checkpoints"
        try:
            result = run(run_dir, "train.max_steps=40", "checkpoint.every_steps=10",
                         f"checkpoint.dir={ckpts}", "supervisor.max_restarts=1", timeout=900)
            out = result.stdout
            assert_no_leftovers(run_dir)
            assert result.returncode == 1, out[-6000:]
            assert "No space left on device" in out
            root_causes = [line for line in out.splitlines() if "root cause:" in line]
            assert root_causes and all("No space left on device" in line for line in root_causes), \
                root_causes
            assert any(str(ckpts / ".staging-step-00000030") in line for line in root_causes), \
                "the root cause names the file"
            kinds = [e["event"] for e in events(run_dir)]
            assert kinds.count("started") == 2 and kinds[-1] == "gave_up", kinds
            assert summary(run_dir)["status"] == "gave_up"
            # From the restarted worker's own log: a failed attempt is torn down as soon as its
            # workers have exited, which can be before paddle's launcher forwards their last lines.
            restarted_log = (run_dir / "logs" / "attempt-1" / "workerlog.0").read_text(errors="replace")
            assert cleaned_staging(restarted_log, ckpts / ".staging-step-00000030"), \
                "the restart cleaned the first attempt's staging directory (and freed its space)"
            assert (ckpts / ".staging-step-00000030").is_dir(), "the last attempt's is left ..."

            assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-00000010", "step-00000020"]
            for step in (10, 20):
                verified = ckpt_cli("verify", str(ckpts / f"step-{step:08d}"))
                assert verified.returncode == 0, verified.stdout + verified.stderr
            listed = ckpt_cli("list", str(run_dir), "--json")  # checkpoint.dir from config.yaml
            assert listed.returncode == 0, listed.stderr
            assert [(s["step"], s["state"]) for s in json.loads(listed.stdout)] == \
                [(10, "complete"), (20, "complete")], "... and never listed"

            grown = subprocess.run(["mount", "-o", "remount,size=16m", str(disk)],
                                   capture_output=True, text=True, timeout=60)
            assert grown.returncode == 0, grown.stderr
            again = run(run_dir, "train.max_steps=40", "checkpoint.every_steps=10",
                        f"checkpoint.dir={ckpts}", "supervisor.max_restarts=1", timeout=900)
            assert again.returncode == 0, again.stdout[-6000:]
            assert f"resumed from {ckpts / 'step-00000020'}: step 20" in again.stdout
            assert cleaned_staging(again.stdout, ckpts / ".staging-step-00000030")
            assert summary(run_dir)["status"] == "succeeded"
            assert summary(run_dir)["global_steps"] == 40
            assert not list(ckpts.glob(".staging-*"))
        finally:  # nothing of the run may keep the filesystem busy
            with contextlib.suppress(AssertionError):
                assert_no_leftovers(run_dir)
