"""The worker-side Checkpointer in one process: async persist, its errors, restore."""
import json
import os
import threading
import time

import numpy as np
import pytest

from paddlerun.trainer import state as tstate
from paddlerun.trainer.checkpoint import CheckpointError, CheckpointStore, StaleGenerationError
from paddlerun.trainer.checkpointer import PERSIST_NICE
from paddlerun.trainer.rundir.errors import is_retriable
from paddlerun.trainer.rundir.events import EventLog, read_events
from paddlerun.trainer.agreement import Position

from checkpointer_kit import make_checkpointer as make, train_step


def test_async_save_then_restore_into_a_fresh_model(tmp_path):
    ckpt, trainer = make(tmp_path)
    for _ in range(3):
        train_step(trainer)
    ckpt.save(trainer)
    expected = tstate.model_arrays(trainer.layer)
    moments, _ = tstate.optimizer_arrays(trainer.optimizer)
    ckpt.close()
    fresh_ckpt, fresh = make(tmp_path)
    position = fresh_ckpt.restore(fresh)
    assert position == Position(step=3, epoch=0, batch=3)
    got = tstate.model_arrays(fresh.layer)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)
    got_moments, _ = tstate.optimizer_arrays(fresh.optimizer)
    assert set(got_moments) == set(moments)
    assert all(np.array_equal(got_moments[k], moments[k]) for k in moments)
    fresh_ckpt.close()


def test_capture_is_a_copy_training_may_go_on(tmp_path):
    ckpt, trainer = make(tmp_path, async_save=True)
    train_step(trainer)
    before = tstate.model_arrays(trainer.layer)
    ckpt.save(trainer)
    for _ in range(5):  # mutate the live parameters while the persist may still run
        train_step(trainer)
    ckpt.wait()
    info = CheckpointStore(tmp_path / "ckpt").newest_complete()
    saved = info.read_tensors("model.safetensors")
    assert all(np.array_equal(saved[k], before[k]) for k in before)
    ckpt.close()


def block_staging(tmp_path, step):
    """A regular file where the staging directory must go: the persist fails for real."""
    (tmp_path / "ckpt").mkdir(exist_ok=True)
    (tmp_path / "ckpt" / f".staging-step-{step:08d}").write_text("in the way")


def test_a_failed_async_persist_surfaces_at_the_next_save(tmp_path):
    ckpt, trainer = make(tmp_path)
    block_staging(tmp_path, 1)
    train_step(trainer)
    ckpt.save(trainer)  # returns at once: the failure happens in the background
    train_step(trainer)
    deadline = time.time() + 60
    while ckpt.persisting and time.time() < deadline:  # (a save due meanwhile is skipped)
        time.sleep(0.01)
    with pytest.raises(CheckpointError, match="persisting a snapshot failed"):
        ckpt.save(trainer)


def test_a_failed_async_persist_surfaces_at_the_end(tmp_path):
    ckpt, trainer = make(tmp_path)
    block_staging(tmp_path, 1)
    train_step(trainer)
    ckpt.save(trainer)
    with pytest.raises(CheckpointError, match="persisting a snapshot failed"):
        ckpt.close()
    again, _ = make(tmp_path)  # the failed close released the writer claim all the same
    again.close()


def test_a_snapshot_due_while_the_last_persist_runs_is_skipped_not_waited_for(tmp_path, monkeypatch):
    """Waiting would hold this rank out of the next collective, where its peers time out."""
    monkeypatch.setenv("PADDLERUN_TEST_PAUSE_BEFORE_COMMIT", "1:1.5")
    ckpt, trainer = make(tmp_path)
    ckpt.events = EventLog(tmp_path / "events.jsonl")
    train_step(trainer)
    started = time.time()
    assert ckpt.save(trainer)
    train_step(trainer)
    assert ckpt.save(trainer) is False, "step 2 is skipped: step 1 still persists"
    assert time.time() - started < 1.5, "neither save waited for the persist"
    assert ckpt.skipped == 1
    skipped = [e for e in read_events(tmp_path / "events.jsonl") if e["event"] == "snapshot_skipped"]
    assert [(e["step"], e["reason"], e["in_flight_step"]) for e in skipped] == \
        [(2, "persist_in_flight", 1)]
    train_step(trainer)
    assert ckpt.save(trainer, wait=True)  # the final snapshot waits: no collective follows it
    assert time.time() - started >= 1.5
    ckpt.close()
    assert [s.step for s in CheckpointStore(tmp_path / "ckpt").snapshots()] == [1, 3]


def test_the_persist_thread_runs_nicer_than_training(tmp_path):
    """Linux keeps a nice value per thread: the persist thread's is raised, the caller's is not."""
    ckpt, trainer = make(tmp_path)
    seen = []
    persist = ckpt.persist

    def persist_noting_its_priority(captured):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return persist(captured)

    ckpt.persist = persist_noting_its_priority
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    train_step(trainer)
    ckpt.save(trainer)
    ckpt.close()
    assert seen == [min(19, before + PERSIST_NICE)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
    assert [s.step for s in CheckpointStore(tmp_path / "ckpt").snapshots()] == [1]


def test_second_writer_on_the_same_directory_is_refused(tmp_path):
    first, _ = make(tmp_path)
    with pytest.raises(CheckpointError, match=f"pid {os.getpid()}"):
        make(tmp_path)
    first.close()


def test_switching_the_sharded_optimizer_on_resumes_with_the_whole_state(tmp_path):
    """A replicated snapshot holds the whole optimizer state: a sharded optimizer takes its
    share of it (here, with one rank, all of it) instead of starting from scratch."""
    ckpt, trainer = make(tmp_path)
    train_step(trainer)
    ckpt.save(trainer, wait=True)
    ckpt.close()
    sharded, fresh = make(tmp_path, sharded=True)
    assert sharded.restore(fresh).step == 1
    saved = optimizer_state(trainer)
    assert saved and all(np.array_equal(saved[k], v) for k, v in optimizer_state(fresh).items())
    sharded.close()


def optimizer_state(trainer):
    return {k: v.numpy() for k, v in tstate.optimizer_tensors(trainer.optimizer)[0].items()}


def test_one_worker_asking_for_a_sharded_optimizer_saves_and_resumes_a_whole_one(tmp_path):
    # One worker has nobody to share with: the trainer builds a plain optimizer, and
    # the snapshot says so (anything else would ask a 2-worker resume for shards).
    ckpt, trainer = make(tmp_path, sharded=False, sharded_optimizer=True)
    train_step(trainer, 2)
    ckpt.save(trainer, wait=True)
    ckpt.close()
    snapshot = CheckpointStore(tmp_path / "ckpt").snapshots()[-1].path
    assert (snapshot / "optimizer.safetensors").is_file()
    state = json.loads((snapshot / "trainer_state.json").read_text())
    assert state["sharded_optimizer"] is False
    again, fresh = make(tmp_path, sharded=False, sharded_optimizer=True)
    assert again.restore(fresh).step == 2
    for name, value in optimizer_state(trainer).items():
        np.testing.assert_array_equal(optimizer_state(fresh)[name], value, err_msg=name)
    again.close()


def test_a_one_rank_shard_written_by_older_versions_resumes_as_a_whole_optimizer(tmp_path):
    old, trainer = make(tmp_path, sharded=True, sharded_optimizer=True)  # what they did
    train_step(trainer, 2)
    old.save(trainer, wait=True)
    old.close()
    snapshot = CheckpointStore(tmp_path / "ckpt").snapshots()[-1].path
    assert not (snapshot / "optimizer.safetensors").exists()
    now, fresh = make(tmp_path, sharded=False, sharded_optimizer=True)
    assert now.restore(fresh).step == 2
    for name, value in optimizer_state(trainer).items():
        np.testing.assert_array_equal(optimizer_state(fresh)[name], value, err_msg=name)
    now.close()


def test_a_save_while_the_last_persist_runs_keeps_both_snapshots_exact(tmp_path, monkeypatch):
    # The capture reuses host buffers: the second save must wait for the first persist
    # (paused here before its commit) before it overwrites them.
    monkeypatch.setenv("PADDLERUN_TEST_PAUSE_BEFORE_COMMIT", "1:0.5")
    ckpt, trainer = make(tmp_path, async_save=True)
    train_step(trainer)
    first = tstate.model_arrays(trainer.layer)
    ckpt.save(trainer)
    train_step(trainer)
    second = tstate.model_arrays(trainer.layer)
    ckpt.save(trainer, wait=True)  # (a save without wait would be skipped meanwhile)
    ckpt.close()
    store = CheckpointStore(tmp_path / "ckpt")
    by_step = {info.step: info for info in store.snapshots() if info.complete}
    for step, want in ((1, first), (2, second)):
        saved = by_step[step].read_tensors("model.safetensors")
        assert all(np.array_equal(saved[k], want[k]) for k in want), step


@pytest.mark.parametrize("side_by_side", [False, True])
def test_model_and_optimizer_files_written_side_by_side_or_not_restore_alike(tmp_path, side_by_side):
    ckpt, trainer = make(tmp_path)
    assert ckpt.write_side_by_side is None  # decided at the first capture, from the device
    train_step(trainer)
    ckpt.save(trainer, wait=True)
    assert ckpt.write_side_by_side is False  # CPU here: one file after the other
    ckpt.write_side_by_side = side_by_side  # what a GPU worker does
    train_step(trainer)
    ckpt.save(trainer, wait=True)
    expected = tstate.model_arrays(trainer.layer)
    moments, _ = tstate.optimizer_arrays(trainer.optimizer)
    ckpt.close()
    fresh_ckpt, fresh = make(tmp_path)
    assert fresh_ckpt.restore(fresh).step == 2
    got = tstate.model_arrays(fresh.layer)
    got_moments, _ = tstate.optimizer_arrays(fresh.optimizer)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)
    assert all(np.array_equal(got_moments[k], moments[k]) for k in moments)
    fresh_ckpt.close()


def test_resume_from_is_tried_when_none_of_the_runs_own_snapshots_restores(tmp_path):
    source, trainer = make(tmp_path / "pretrained")
    train_step(trainer, 2)
    source.save(trainer, wait=True)
    source.close()
    src = CheckpointStore(tmp_path / "pretrained" / "ckpt").snapshots()[-1].path
    own, trainer = make(tmp_path / "run")
    train_step(trainer, 3)
    own.save(trainer, wait=True)
    own.close()
    snapshot = CheckpointStore(tmp_path / "run" / "ckpt").snapshots()[-1].path
    model = snapshot / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF  # same size: only its sha256 tells
    model.write_bytes(bytes(data))
    again, fresh = make(tmp_path / "run")
    assert again.restore(fresh, resume_from=str(src)).step == 2  # not from scratch
    again.close()


def test_a_resume_from_gone_since_the_run_began_does_not_stop_its_own_resume(tmp_path):
    ckpt, trainer = make(tmp_path)
    train_step(trainer, 2)
    ckpt.save(trainer, wait=True)
    ckpt.close()
    again, fresh = make(tmp_path)
    assert again.restore(fresh, resume_from=str(tmp_path / "deleted-source")).step == 2
    again.close()


def test_a_snapshot_of_another_global_batch_is_refused_naming_both(tmp_path):
    """Its position counts global batches of its own size: another size would train on
    other samples than the uninterrupted run."""
    import dataclasses
    ckpt, trainer = make(tmp_path)
    train_step(trainer)
    ckpt.save(trainer, wait=True)
    ckpt.close()
    again, fresh = make(tmp_path)
    fresh.train = dataclasses.replace(fresh.train, global_batch_size=trainer.train.global_batch_size * 2)
    with pytest.raises(tstate.StateMismatch, match=f"written with a global batch of "
                                                   f"{trainer.train.global_batch_size}, this run has"):
        again.restore(fresh)
    again.close()


# -- the generation fence of an elastic job (docs/checkpoints.md#generation-fence) ----------------


def test_an_old_generation_s_async_persist_is_refused_and_ends_the_worker_not_retriable(tmp_path):
    ckpt, trainer = make(tmp_path, generation=1)
    train_step(trainer)
    ckpt.save(trainer, wait=True)
    store = CheckpointStore(tmp_path / "ckpt")
    assert store.newest_complete().manifest["generation"] == 1
    assert store.raise_fence(2) == 2  # generation 2 started
    train_step(trainer)
    ckpt.save(trainer)  # in the background: refused there
    deadline = time.time() + 60
    while ckpt.persisting and time.time() < deadline:
        time.sleep(0.01)
    train_step(trainer)
    with pytest.raises(StaleGenerationError) as err:  # as itself, not "persisting ... failed"
        ckpt.save(trainer)
    assert not is_retriable(err.value) and (err.value.generation, err.value.fence) == (1, 2)
    record = json.loads((tmp_path / "errors" / "attempt-0" / "rank-0.json").read_text())
    assert record["type"] == "StaleGenerationError" and record["retriable"] is False, \
        "recorded when refused, for a script whose exceptions no one else records"
    assert [i.step for i in store.snapshots()] == [1]
    assert not any(p.name.startswith(".staging-") for p in store.directory.iterdir())
    ckpt.close()


def test_an_old_generation_s_emergency_snapshot_is_refused_too(tmp_path):
    ckpt, trainer = make(tmp_path, generation=3)
    train_step(trainer, 2)
    CheckpointStore(tmp_path / "ckpt").raise_fence(4)
    with pytest.raises(StaleGenerationError):
        ckpt.emergency_save(trainer, tstate.capture_rng())
    assert CheckpointStore(tmp_path / "ckpt").snapshots() == []
    ckpt.close()


def test_a_new_generation_s_checkpointer_waits_for_the_old_one_s_writer_claim(tmp_path):
    old, _ = make(tmp_path, generation=1)
    made = {}

    def start_generation_2():
        made["new"] = make(tmp_path, generation=2, lock_timeout_s=30)[0]
        made["at"] = time.monotonic()

    # In a thread: filelock releases a lock only in the thread that took it (this one).
    claimant = threading.Thread(target=start_generation_2)
    claimant.start()
    time.sleep(1.0)
    assert "new" not in made, "it waits while generation 1 holds the claim"
    released = time.monotonic()
    old.close()  # its supervisor stopped it
    claimant.join(timeout=60)
    new = made["new"]
    assert released <= made["at"]
    owner = json.loads((tmp_path / "ckpt" / ".writer.json").read_text())
    assert owner["generation"] == 2 and owner["pid"] == os.getpid()
    new.close()
