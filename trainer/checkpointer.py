"""Snapshots inside the worker: when to take one, capture, persist in the background, restore.

Two phases (docs/checkpoints.md#commit): *capture* copies the state to host memory on
the training thread (fast: into buffers reused from one snapshot to the next,
:mod:`host_copy`); *persist* writes, fsyncs, hashes and commits it on a
background thread. At most one persist is in flight: a snapshot due while one runs
is skipped (logged, a ``snapshot_skipped`` event), since waiting for it would hold
this rank out of the next collective; only the final and the stop's snapshot wait.
A persist error is raised on the training thread at the next save or at the end,
never lost (orbax's async save).

Restore is an agreement (:mod:`restore_agreement`): rank 0 chooses the snapshot,
every other rank loads exactly that one or the attempt fails.

Who writes what: rank 0 writes the model, the optimizer state and
``trainer_state.json`` and commits. With a sharded optimizer every rank writes its
own shard into the same staging directory and rank 0 commits only when every
shard is there and verified.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from enum import Enum
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import paddle
import paddle.distributed as dist

from paddlerun.trainer import state as tstate
from paddlerun.trainer.agreement import Position
from paddlerun.trainer.checkpoint.layout import (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, shard_file,
                                                 snapshot_name)
from paddlerun.trainer.checkpoint import (CheckpointError, CheckpointStore, StaleGenerationError,
                                          WriterBusyError, inspect_snapshot, resolve_snapshot)
from paddlerun.trainer.restore_agreement import (RestoreChoice, SnapshotSource, agree_on_choice,
                                                 agree_all_loaded)
from paddlerun.trainer.rundir.config import Config
from paddlerun.trainer.rundir.env import WorkerEnv
from paddlerun.trainer.rundir.errors import write_error
from paddlerun.trainer.host_copy import HostBuffers
from paddlerun.trainer.paddle_features import features

log = logging.getLogger("paddlerun.checkpoint")

FORMAT_VERSION = 1
#: How much lower the persist thread's CPU priority is than training's (a nice increment;
#: Linux keeps one per thread). The persist then runs mostly while the training threads
#: wait (on a collective, the GPU, the data), instead of taking CPU from rank 0 and,
#: through the next all-reduce, from every rank. 10, not 19: where nothing is ever idle
#: it still gets ~10 % of a busy core, so a persist never starves for long.
PERSIST_NICE = 10
REQUIRED_STATE_KEYS = {"format", "step", "epoch", "batch", "world_size", "global_batch_size",
                       "config_hash", "rng", "optimizer_extra"}


class SkipReason(str, Enum):
    """Why a due snapshot was not taken (the ``reason`` of a ``snapshot_skipped`` event)."""
    #: The previous snapshot's persist had not finished: waiting for it would hold this
    #: rank out of the next collective, where the others would time out.
    PERSIST_IN_FLIGHT = "persist_in_flight"


@dataclass
class Captured:
    """One snapshot's state, on the host, ready to persist."""
    step: int
    model: Dict[str, np.ndarray]
    optimizer: Dict[str, np.ndarray]
    trainer_state: Dict[str, Any]
    #: The RNG states as :func:`state.capture_rng` took them; the persist makes them JSON
    #: (~0.2 ms for Paddle's, numpy's and Python's: not on the training thread).
    rng: tuple
    reason: str
    captured_at: float = field(default_factory=time.time)
    #: Seconds the training thread spent copying the state (the snapshot's stall).
    capture_s: float = 0.0


class Checkpointer:
    """Every rank has one; all ranks call :meth:`save` at the same steps."""

    def __init__(self, config: Config, env: WorkerEnv, directory: Path, run_dir: Path,
                 sharded: bool = False, events=None):
        # Bit-exact resume is this class's promise: refuse a Paddle that cannot keep it
        # (the supervisor refuses it before starting; this covers a worker started otherwise).
        features().check()
        self.cfg = config.checkpoint
        self.config_hash = config.hash()
        self.env = env
        self.run_dir = run_dir
        #: The optimizer state really is sharded (see sharding.enabled); the config may ask
        #: for it with one worker, where it is not.
        self.sharded = sharded
        #: The global batch of the snapshot restored (None: none restored).
        self.restored_global_batch_size: Optional[int] = None
        self.sharding_asked = config.train.sharded_optimizer
        self.events = events
        self.store = CheckpointStore(directory, lock_timeout_s=self.cfg.lock_timeout_s)
        self.is_writer = env.rank == 0
        self._claim = None
        if self.is_writer:
            _test_gate_before_claim()
            # Claim first: a second job on this directory must fail here, before prepare()
            # removes the staging directory of the snapshot the first job is writing.
            self._claim = self.store.open_writer({
                "host": socket.gethostname(), "pid": os.getpid(), "run_dir": str(run_dir),
                "attempt": env.attempt, "started": time.time()}, generation=env.generation)
        self._thread: Optional[threading.Thread] = None
        #: The step of the persist started last, and when (time.monotonic()).
        self._in_flight: Tuple[int, float] = (-1, 0.0)
        #: Snapshots skipped because the previous persist was still running.
        self.skipped = 0
        # The persist in flight reads these buffers: a capture always waits for it first.
        self._host = HostBuffers()
        #: Write the model and optimizer files side by side, each file's fsync and sha256
        #: read-back overlapping the other's write: on an idle machine 630 MB persisted in
        #: 573 ms instead of 765. Only when training runs on a GPU: with CPU training the
        #: cores are busy, and training steps ran 1.39x slower during such a persist
        #: instead of 1.09x (measured, bench/checkpoint_bench.py). Set at the first capture,
        #: once the worker has chosen its device.
        self.write_side_by_side: Optional[bool] = None
        self._error: Optional[BaseException] = None
        self.last_save_time = time.time()
        self.last_saved_step: Optional[int] = None
        #: Test-only pause point "STEP:SECONDS": in a run's first attempt, sleep between
        #: writing that step's files and committing them, so a test can kill the writer
        #: in the middle of a persist (or start a second job meanwhile). The pause ends
        #: early once the file PADDLERUN_TEST_RELEASE_COMMIT names exists.
        step, _, seconds = os.environ.get("PADDLERUN_TEST_PAUSE_BEFORE_COMMIT", "").partition(":")
        self._pause_before_commit = (int(step), float(seconds)) if seconds and env.attempt == 0 \
            else None
        self._release_commit = os.environ.get("PADDLERUN_TEST_RELEASE_COMMIT")
        #: Test-only: seconds an emergency snapshot sleeps before its commit (a slow one).
        self._pause_before_emergency_commit = float(
            os.environ.get("PADDLERUN_TEST_PAUSE_BEFORE_EMERGENCY_COMMIT") or 0)

    # ------------------------------------------------------------ schedule

    def due_by_steps(self, step: int) -> bool:
        """Deterministic in the step: every rank computes the same answer with no message."""
        return bool(self.cfg.every_steps) and step % self.cfg.every_steps == 0

    def due_by_time(self, now: float) -> bool:
        """Rank 0's opinion only; the loop all-reduces it at the next agreement point."""
        return self.cfg.every_seconds is not None and now - self.last_save_time >= self.cfg.every_seconds

    # ------------------------------------------------------------ save

    def save(self, trainer, reason: str = "scheduled", wait: bool = False) -> bool:
        """Capture now, persist in the background (or at once with ``wait`` or
        ``checkpoint.async: false``). Returns False when the snapshot was skipped.

        A snapshot without ``wait`` that is due while the previous persist still runs is
        skipped (:meth:`_skip_while_persisting`), never waited for: the other ranks go on to
        the next collective meanwhile, and would time out in it (gloo: 30 s) if this rank
        waited for a slow persist. ``wait=True`` (the final and the stop's snapshot, after
        which no collective follows) waits for it.
        """
        pos = trainer.position
        if self.last_saved_step == pos.step:
            if wait:
                self.wait()
            return True
        if not wait and self._skip_while_persisting(pos.step, reason):
            return False
        self.wait()  # at most one persist in flight; raises the previous one's error
        captured = self.capture(trainer, reason, tstate.capture_rng())
        self.last_save_time = time.time()
        self.last_saved_step = pos.step
        if self.cfg.async_save and not wait:
            self._thread = threading.Thread(target=self._persist_guarded, args=(captured,),
                                            name=f"paddlerun-persist-{pos.step}", daemon=True)
            self._in_flight = (pos.step, time.monotonic())
            self._thread.start()
        else:
            self.persist(captured)
        return True

    @property
    def persisting(self) -> bool:
        """A background persist is running (its error, if any, is raised by :meth:`wait`)."""
        return self._thread is not None and self._thread.is_alive()

    def _skip_while_persisting(self, step: int, reason: str) -> bool:
        """Whether to skip the snapshot due at ``step`` because a persist is still running;
        if so, say so (log, ``snapshot_skipped`` event) and count it.

        Every rank decides alike. Unsharded, only rank 0 persists, so its answer is the
        only one. Sharded, every rank persists its shard, so the ranks agree through one
        all-reduce (every rank calls :meth:`save` at the same steps). The step is not
        retried: a snapshot by steps comes at the next multiple of ``every_steps``; one by
        time is due again at the next agreement point (``last_save_time`` is unchanged).
        """
        busy = self.persisting
        if self.sharded and self.env.world_size > 1:
            busy = _on_any_rank(busy)
        if not busy:
            return False
        self.skipped += 1
        in_flight_step, since = self._in_flight
        running_s = time.monotonic() - since
        log.warning("snapshot of step %d (%s) skipped: the persist of step %d is still running "
                    "(%.1f s so far); %d skipped in this attempt. Slow storage or a large state: "
                    "raise checkpoint.every_steps / every_seconds", step, reason, in_flight_step,
                    running_s, self.skipped)
        if self.events is not None and self.is_writer:
            self.events.emit("snapshot_skipped", self.env.attempt, step=step,
                             reason=SkipReason.PERSIST_IN_FLIGHT.value, snapshot_reason=reason,
                             in_flight_step=in_flight_step, in_flight_s=round(running_s, 3))
        return True

    def capture(self, trainer, reason: str, rng: tuple) -> Captured:
        """Copy the state to host memory. The arrays are reused buffers: call only with no
        persist in flight (:meth:`wait`), and persist the result before the next capture."""
        started = time.perf_counter()
        if self.write_side_by_side is None:
            self.write_side_by_side = paddle.device.get_device().startswith("gpu")
        pos = trainer.position
        groups: Dict[str, Dict[str, paddle.Tensor]] = {}
        opt_extra: Dict[str, Any] = {}
        if self.is_writer or self.sharded:
            groups["optimizer"], opt_extra = tstate.optimizer_tensors(trainer.optimizer)
        if self.is_writer:
            groups["model"] = tstate.model_tensors(trainer.layer)
        arrays = self._host.copy(groups)
        trainer_state: Dict[str, Any] = {}
        if self.is_writer:
            trainer_state = {
                "format": FORMAT_VERSION,
                "step": pos.step, "epoch": pos.epoch, "batch": pos.batch,
                "world_size": self.env.world_size,
                "global_batch_size": trainer.train.global_batch_size,
                "sharded_optimizer": self.sharded,
                "config_hash": self.config_hash,
                "optimizer_extra": opt_extra,
                "grad_scaler": {},
                "reason": reason,
                "attempt": self.env.attempt,
                "time": time.time(),
            }
        return Captured(pos.step, arrays.get("model", {}), arrays.get("optimizer", {}), trainer_state,
                        rng, reason, capture_s=time.perf_counter() - started)

    def persist(self, c: Captured) -> Optional[Path]:
        if not (self.is_writer or self.sharded):
            return None
        started = time.perf_counter()
        staging = self.store.stage(c.step, publish_marks=not self.is_writer)  # rank 0 commits
        files = {}
        if self.sharded:
            files[shard_file(self.env.rank)] = c.optimizer
        if self.is_writer:
            files[MODEL_FILE] = c.model
            if not self.sharded:
                files[OPTIMIZER_FILE] = c.optimizer
        _write_all(staging, files, side_by_side=self.write_side_by_side)
        if not self.is_writer:
            return None
        staging.write_json(STATE_FILE, {**c.trainer_state, "rng": tstate.rng_to_json(c.rng)})
        if self._pause_before_commit and self._pause_before_commit[0] == c.step \
                and c.reason != "emergency":
            self._test_pause(self._pause_before_commit[1])
        if c.reason == "emergency":
            time.sleep(self._pause_before_emergency_commit)
        shards = [shard_file(r) for r in range(self.env.world_size)] if self.sharded else []
        try:
            path = self.store.commit(staging, meta={
                "step": c.step, "epoch": c.trainer_state["epoch"], "world_size": self.env.world_size,
                "reason": c.reason, "sharded_optimizer": self.sharded}, expect_files=shards,
                generation=self.env.generation)
        except StaleGenerationError as e:
            self._stale(e)
            raise
        removed = self.store.apply_retention(self.cfg.keep_last, self.cfg.keep_every_steps)
        if self.events is not None:
            self.events.emit("snapshot_committed", self.env.attempt, step=c.step, reason=c.reason,
                             path=str(path), removed=[p.name for p in removed],
                             capture_s=round(c.capture_s, 6),
                             persist_s=round(time.perf_counter() - started, 6))
        log.info("snapshot step %d committed (%s)", c.step, c.reason)
        return path

    def _stale(self, error: StaleGenerationError) -> None:
        """A newer generation started: say so, and record the error at once as the root cause,
        not retriable -- also for a user's script, whose exceptions no one else records."""
        log.error("generation %d is over (the job runs generation %d now): the snapshot of step %d "
                  "was refused and this worker stops; not retried", error.generation, error.fence,
                  error.step)
        if self.env.run_dir is not None:
            write_error(self.env.run_dir, self.env.attempt, self.env.rank, error)

    def _test_pause(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self._release_commit and os.path.exists(self._release_commit):
                return
            time.sleep(0.05)

    def _persist_guarded(self, captured: Captured) -> None:
        _lower_priority(PERSIST_NICE)
        try:
            self.persist(captured)
        except BaseException as e:  # kept and raised on the training thread
            self._error = e

    def wait(self) -> None:
        """Wait for the persist in flight; raise its error on this (the training) thread."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, StaleGenerationError):
                raise error  # as itself: not retriable, unlike a failed write
            raise CheckpointError(f"persisting a snapshot failed: {type(error).__name__}: {error}") \
                from error

    def emergency_save(self, trainer, rng: tuple) -> Optional[Path]:
        """A peer died mid-step: persist the last completed step now, synchronously.

        Caller: the lowest surviving rank (in plain data parallel every rank holds the
        same replica). ``rng`` is the RNG state from the start of the failed step
        (:func:`state.capture_rng`), so the snapshot is bit-identical to a scheduled one
        at that step. The caller sets its heartbeat phase to ``checkpoint``: the supervisor
        then keeps Paddle's launcher from SIGKILLing it (for up to ``supervisor.preempt_grace_s``);
        if it is cut short all the same, its staging directory is cleaned on the next start.
        """
        if self.sharded:
            log.warning("no emergency snapshot with a sharded optimizer: the dead rank's shard "
                        "is gone; the newest scheduled snapshot will be used")
            return None
        try:
            self.wait()
        except StaleGenerationError:
            raise  # a newer generation owns the checkpoints: no emergency snapshot either
        except CheckpointError as e:
            log.warning("the snapshot in flight failed: %s", e)
        if self._committed(trainer.position.step):
            return None  # committed already (a non-writer's last_saved_step proves nothing)
        if not self.is_writer:  # rank 0 died: its claim dies with it, a moment later
            self._claim = self._claim_writer_after_dead_owner({
                "host": socket.gethostname(), "pid": os.getpid(), "run_dir": str(self.run_dir),
                "attempt": self.env.attempt, "started": time.time(), "emergency": True})
            self.is_writer = True
        path = self.persist(self.capture(trainer, "emergency", rng))
        self.last_saved_step = trainer.position.step
        return path

    def _committed(self, step: int) -> bool:
        path = self.store.directory / snapshot_name(step)
        try:
            return inspect_snapshot(path, verify=False).complete
        except CheckpointError:  # no such snapshot
            return False

    def _claim_writer_after_dead_owner(self, owner: Dict[str, Any], timeout_s: float = 2.0):
        """The dead writer's lock is released when the kernel has closed its files: retry briefly."""
        deadline = time.time() + timeout_s
        while True:
            try:
                return self.store.claim_writer(owner, self.env.generation)
            except WriterBusyError:
                if time.time() > deadline:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        """Wait for the persist in flight (raising its error), then free the buffers and the
        writer claim -- those also when the persist failed."""
        try:
            self.wait()
        finally:
            self._host.close()
            if self._claim is not None:
                self._claim.release()
                self._claim = None

    # ------------------------------------------------------------ restore

    def restore(self, trainer, resume_from: Optional[str] = None):
        """Load the newest complete snapshot into ``trainer``; returns its Position or None.
        Every rank calls it, at the same point (it is a collective when world > 1).

        Rank 0 chooses: the run's own snapshots newest first (they win over ``resume_from``:
        after a restart they are newer), then ``resume_from`` when none of them restores.
        Each file is verified (size, sha256) as it is read, and a snapshot that fails is
        skipped with a warning for the next older one. With a sharded optimizer every file
        of each own candidate is hashed first, the other ranks' shards too.

        Then every other rank loads exactly rank 0's choice -- the same step, the same
        manifest (its sha256) -- or the attempt fails on every rank with
        :class:`RestoreDisagreement`, naming the rank and its reason. A rank never falls back
        on its own: a replica resumed from another snapshot would train on silently diverged.
        """
        if self.env.world_size == 1:
            loaded = self._restore_newest(trainer, resume_from)
            return loaded[0] if loaded else None
        position, choice, failure = None, RestoreChoice.nothing(), ""
        if self.env.rank == 0:
            loaded = self._restore_newest(trainer, resume_from)
            if loaded:
                position, choice = loaded
        choice = agree_on_choice(choice)
        if self.env.rank != 0 and choice.source is not SnapshotSource.NONE:
            try:
                position = self._restore_exactly(trainer, choice, resume_from)
            except (CheckpointError, tstate.StateMismatch, OSError) as e:
                failure = f"{type(e).__name__}: {e}"
                log.error("rank %d cannot load %s, which rank 0 resumed from: %s", self.env.rank,
                          choice.describe(), failure)
        agree_all_loaded(choice, failure, self.env.rank, self.env.world_size)
        return position

    def _restore_newest(self, trainer, resume_from: Optional[str]):
        """Rank 0 (or the only rank): load the newest usable snapshot; (Position, RestoreChoice) or None."""
        candidates = []
        for info in reversed(self.store.snapshots()):
            if info.complete:
                candidates.append(info.path)
            else:
                log.warning("skipping snapshot %s (%s): %s", info.path, info.state, info.problem)
        log.info("snapshots found: %s", [p.name for p in candidates])
        own = set(candidates)
        for path in _then_resume_from(candidates, resume_from):
            if self.sharded and path in own and not self._verified_everywhere(path):
                continue
            try:
                position, manifest_sha256 = self._load(trainer, path)
            except CheckpointError as e:
                log.warning("skipping snapshot %s: %s", path, e)
                continue
            source = SnapshotSource.OWN if path in own else SnapshotSource.RESUME_FROM
            return position, RestoreChoice(source, position.step, manifest_sha256, str(path))
        if candidates or resume_from:
            log.warning("no usable snapshot in %s%s: starting from scratch", self.store.directory,
                        f" or {resume_from}" if resume_from else "")
        return None

    def _restore_exactly(self, trainer, choice: RestoreChoice, resume_from: Optional[str]):
        """Ranks other than 0: load the snapshot rank 0 chose, and nothing else."""
        if choice.source is SnapshotSource.OWN:
            path = self.store.directory / snapshot_name(choice.step)
        else:
            path = resolve_snapshot(resume_from, step=choice.step)
        position, _ = self._load(trainer, path, expect_manifest=choice.manifest_sha256)
        return position

    def _load(self, trainer, path: Path, expect_manifest: Optional[str] = None):
        """Read, check and load one snapshot into ``trainer``; (Position, manifest sha256).

        Raises :class:`CheckpointError` when the snapshot is unusable (missing, corrupt, not
        the manifest expected) and :class:`~state.StateMismatch` when it is intact but does
        not fit this job (another world size, a changed model)."""
        with self.store.reading(path) as info:
            if expect_manifest is not None and info.manifest_sha256 != expect_manifest:
                raise CheckpointError(
                    f"{path}: its manifest (sha256 {str(info.manifest_sha256)[:16]}...) is not the "
                    f"one rank 0 resumed from ({expect_manifest[:16]}...): this rank sees another "
                    f"snapshot of that step there", path)
            _test_read_fault(self.env, path)
            state = info.read_json(STATE_FILE)
            if not isinstance(state, dict) or not REQUIRED_STATE_KEYS <= set(state):
                raise CheckpointError(f"{path / STATE_FILE} lacks the keys "
                                      f"{sorted(REQUIRED_STATE_KEYS)}: it is corrupt", path)
            self._check_compatible(state, path)
            check_global_batch(state["global_batch_size"], trainer.train.global_batch_size, path)
            model = info.read_tensors(MODEL_FILE)
            optimizer = _read_optimizer(info, state, self.env.rank,
                                        self.sharded and state["world_size"] == self.env.world_size)
            manifest_sha256 = info.manifest_sha256
        try:
            tstate.check_model(trainer.layer, model, source=str(path / MODEL_FILE))
        except tstate.StateMismatch as e:
            if state["config_hash"] != self.config_hash:
                raise  # the model really changed: say so, do not quietly use an older one
            # Written by this very config, yet it does not fit: it lies, so it is corrupt.
            raise CheckpointError(str(e), path) from e
        tstate.load_model(trainer.layer, model)
        tstate.restore_optimizer(trainer.optimizer, optimizer, state["optimizer_extra"])
        tstate.restore_rng(state["rng"])
        self.last_saved_step = state["step"]
        self.restored_global_batch_size = state["global_batch_size"]
        log.info("resumed from %s: step %d, epoch %d, batch %d", path, state["step"],
                 state["epoch"], state["batch"])
        if state["world_size"] != self.env.world_size:
            log.info("the snapshot was written by %d workers, this attempt has %d: the same "
                     "global batch of %d, now %d per worker", state["world_size"],
                     self.env.world_size, state["global_batch_size"],
                     state["global_batch_size"] // self.env.world_size)
        if self.events is not None and self.env.local_rank == 0:  # once per run directory
            self.events.emit("resumed", self.env.attempt, snapshot=path.name, step=state["step"],
                             from_world_size=state["world_size"], to_world_size=self.env.world_size,
                             sharded_optimizer=_sharded_on_disk(state))
        return Position(step=state["step"], epoch=state["epoch"], batch=state["batch"]), manifest_sha256

    @staticmethod
    def _verified_everywhere(path: Path) -> bool:
        """Every file of ``path`` is intact, the other ranks' shards too: each rank reads
        only its own shard, yet all must decide alike."""
        try:
            info = inspect_snapshot(path, verify=True)
        except CheckpointError as e:  # gone meanwhile
            log.warning("skipping snapshot %s: %s", path, e)
            return False
        if not info.complete:
            log.warning("skipping snapshot %s (%s): %s", path, info.state, info.problem)
        return info.complete

    def _check_compatible(self, state: dict, path: Path) -> None:
        if state.get("format") != FORMAT_VERSION:
            raise tstate.StateMismatch(f"{path}: snapshot format {state.get('format')} is not "
                                  f"{FORMAT_VERSION}; it was written by another paddlerun version")
        if state["global_batch_size"] % self.env.world_size:
            raise tstate.StateMismatch(f"{path}: its global batch {state['global_batch_size']} does not "
                                  f"divide among {self.env.world_size} workers")
        if state["config_hash"] != self.config_hash and self.env.rank == 0:
            log.warning("%s was written with a different train config (hash %s, now %s); "
                        "resuming anyway: the model's shapes are checked next", path,
                        state["config_hash"][:12], self.config_hash[:12])


def check_global_batch(saved: int, now: int, path) -> None:
    """A snapshot's position counts global batches of its size: resuming it with another
    size would train on other samples than the uninterrupted run. ``now`` 0: not known yet."""
    if now and saved != now:
        raise tstate.StateMismatch(
            f"{path}: written with a global batch of {saved}, this run has {now}; resume with "
            f"a global batch of {saved} (with hapi, batch_size = {saved} / the number of workers), "
            f"or start a new run")


def _then_resume_from(own: List[Path], resume_from: Optional[str]):
    """The run's own snapshots, newest first, then ``resume_from`` -- resolved only when
    none of them restored (a source deleted since the run began must not stop it)."""
    yield from own
    if resume_from:
        yield resolve_snapshot(resume_from)


def _sharded_on_disk(state: dict) -> bool:
    """Whether a snapshot holds its optimizer state as one shard per rank. A "shard" of one
    rank is the whole state: older versions wrote those for one worker with
    ``sharded_optimizer`` set, and they resume like an unsharded snapshot."""
    return bool(state.get("sharded_optimizer")) and state["world_size"] > 1


def _read_optimizer(info, state: dict, rank: int, own_shard_only: bool) -> Dict[str, np.ndarray]:
    """The optimizer state this rank restores.

    A replicated snapshot holds it whole. A sharded one holds one shard per rank that
    wrote it; at the same world size with the optimizer sharded again each rank reads its
    own (Paddle partitions the parameters by the sharding degree alone, so the shares
    match). At another world size, or unsharded now, the shards are merged by name into
    the whole state: the sharded optimizer keeps only its new share of it
    (``set_state_dict`` matches its own parameters by name), a plain one takes all.
    """
    if not state.get("sharded_optimizer"):
        names = [OPTIMIZER_FILE]
    elif not _sharded_on_disk(state):
        names = [shard_file(0)]  # one rank's "shard" is the whole state
    elif own_shard_only:
        names = [shard_file(rank)]
    else:
        names = [shard_file(r) for r in range(state["world_size"])]
    merged: Dict[str, np.ndarray] = {}
    for name in names:
        if name not in info.files:
            raise CheckpointError(f"{info.path}: has no {name}, which its {STATE_FILE} says it "
                                  f"holds: it is corrupt")
        arrays = info.read_tensors(name)
        twice = merged.keys() & arrays.keys()
        if twice:
            raise CheckpointError(f"{info.path}: optimizer entries {sorted(twice)[:3]} are in more "
                                  f"than one shard: it is corrupt")
        merged.update(arrays)
    return merged


def _write_all(staging, files: Dict[str, Dict[str, np.ndarray]], side_by_side: bool) -> None:
    """Write the tensor files one after the other or side by side, a thread each. All are
    finished, or failed, on return; the first error is raised."""
    if len(files) <= 1 or not side_by_side:
        for name, arrays in files.items():
            staging.write_tensors(name, arrays)
        return
    with ThreadPoolExecutor(len(files), thread_name_prefix="paddlerun-write") as pool:
        futures = [pool.submit(staging.write_tensors, name, arrays) for name, arrays in files.items()]
    for future in futures:
        future.result()


def _test_gate_before_claim() -> None:
    """Test-only: with PADDLERUN_TEST_GATE_BEFORE_CLAIM=FILE, rank 0 creates FILE.waiting and
    claims the checkpoints directory only once FILE exists (at most 30 min later), so that a
    test can time a second job's claim to the moment the first job is mid-persist."""
    gate = os.environ.get("PADDLERUN_TEST_GATE_BEFORE_CLAIM")
    if not gate:
        return
    Path(gate + ".waiting").touch()
    deadline = time.monotonic() + 1800
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.02)


def _test_read_fault(env: WorkerEnv, path: Path) -> None:
    """Test-only: PADDLERUN_TEST_RESTORE_READ_FAILS="RANK:ATTEMPT" makes that rank's reads of
    snapshots fail in that attempt, as a transient I/O error on one host would."""
    rank, _, attempt = os.environ.get("PADDLERUN_TEST_RESTORE_READ_FAILS", "").partition(":")
    if attempt and int(rank) == env.rank and int(attempt) == env.attempt:
        raise CheckpointError(f"cannot read {path / MODEL_FILE}: [Errno 5] Input/output error "
                              f"(injected by PADDLERUN_TEST_RESTORE_READ_FAILS)", path)


def _on_any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any (a collective: every rank calls it)."""
    t = paddle.to_tensor([int(flag)], dtype="int64")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.numpy()[0])


def _lower_priority(increment: int) -> None:
    """Make the calling thread ``increment`` nicer (only it: nice is per thread on Linux).
    Where that is not possible the thread just runs at the usual priority."""
    if increment <= 0:
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
    except (AttributeError, OSError):  # not Linux, or not allowed
        pass
