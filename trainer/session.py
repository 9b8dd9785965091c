"""Snapshots, exact resume and supervision for a plain Paddle training loop.

::

    from paddlerun.trainer.session import Session

    session = Session(model, optimizer, every_steps=100)  # dir from $PADDLERUN_CHECKPOINT_DIR
    start = session.restore()                 # model, optimizer (and its LR scheduler), RNG
    sampler = session.sampler(len(dataset), global_batch_size=64)   # this rank's share
    loader = paddle.io.DataLoader(dataset, batch_sampler=sampler)
    for epoch in session.epochs(5):           # from the restored epoch on
        for x, y in loader:                   # from the restored batch on
            loss = loss_fn(model(x), y)
            loss.backward(); optimizer.step(); optimizer.clear_grad()
            if session.step(loss=loss):       # True: stop now (preempted or max_steps)
                break
    session.finish()                          # final snapshot, heartbeat "done"

Run it again after a crash, or under ``paddlerun run --script`` (which restarts it and
sets the directory): it continues from the newest complete snapshot, and the model it
ends with is bit-identical to the one an uninterrupted run gives (CPU, same world size),
provided the loop follows three rules:

* :meth:`Session.step` comes last in a step, after ``optimizer.step()`` and any
  ``scheduler.step()``: a snapshot is taken there and holds the step as done.
* :meth:`Session.restore` comes right before the loop, after the model, optimizer and
  data are built: it sets the RNG states to the snapshot's (and :meth:`Session.epochs`
  sets them once more as the loop begins, so building a loader in between costs nothing).
* The data order depends only on ``(seed, epoch)``: :meth:`Session.sampler` gives such
  a sampler, positioned where the snapshot stopped. With your own sampler, start epoch
  ``start.epoch`` at batch ``start.batch`` yourself.

Not replayed, as in the hapi callback: random augmentation in DataLoader workers.
Gradients held across steps (accumulation) are not in a snapshot: call ``step()`` once
per optimizer update.

Every rank calls every method, in the same order and at the same steps: ``step()`` runs
one all-reduce every :data:`~paddlerun.trainer.script_mode.STOP_CHECK_EVERY` steps to
agree on a stop (see :mod:`paddlerun.trainer.agreement`). Rank 0 writes the snapshots.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

import paddle

from paddlerun.trainer import state as tstate
from paddlerun.trainer.agreement import Position
from paddlerun.trainer.checkpointer import Checkpointer, check_global_batch
from paddlerun.trainer.rundir.config import TrainConfig
from paddlerun.trainer.sampler import ResumableBatchSampler
from paddlerun.trainer.script_mode import (DEFAULT_SEED, CheckpointTarget, SupervisorLink,
                                           checkpoint_config, checkpoint_directory,
                                           script_agreement, script_env)

__all__ = ["Position", "Session"]

class Session:
    """One rank's link to paddlerun for a hand-written training loop.

    Args:
        model: the ``paddle.nn.Layer`` being trained (``paddle.DataParallel`` is unwrapped).
        optimizer: its optimizer; an LR scheduler given to it as ``learning_rate`` is saved
            and restored with it.
        directory: the checkpoints directory. Default: ``$PADDLERUN_CHECKPOINT_DIR`` (set by
            ``paddlerun run --script``); required otherwise.
        every_steps: snapshot after every this many steps (counted across restarts). With
            neither this nor ``every_seconds``: a snapshot at the end of every epoch of
            :meth:`epochs`.
        every_seconds: also snapshot when this much time passed since the last one (rank 0
            decides; only rank 0 writes).
        keep_last: how many complete snapshots to keep.
        async_save: write in a background thread (at most one in flight; its error is raised
            at the next snapshot or in :meth:`finish`).
        max_steps: :meth:`step` returns True once this many steps are done in all.
        stop_on_sigterm: a SIGTERM to this process (a scheduler preempting the job) stops
            training like the supervisor's stop request: snapshot, then :meth:`step`
            returns True. Installs a signal handler: construct the Session on the main thread.

    Under ``paddlerun run --script`` it heartbeats from construction on: build it before
    anything slow (the supervisor gives a rank ``supervisor.hang_timeout_s`` for its first).
    """

    def __init__(self, model: paddle.nn.Layer, optimizer, directory=None, *,
                 every_steps: Optional[int] = None, every_seconds: Optional[float] = None,
                 keep_last: int = 3, async_save: bool = True, max_steps: Optional[int] = None,
                 stop_on_sigterm: bool = True):
        self.directory = checkpoint_directory(directory, "Session")
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"Session(max_steps={max_steps!r}): must be >= 1 or None")
        config = checkpoint_config(self.directory, "paddlerun.trainer.session.Session(...)",
                                   every_steps, every_seconds, keep_last, async_save)
        self.by_epoch = every_steps is None and every_seconds is None
        self.max_steps = max_steps
        self.env = script_env()
        self.link = SupervisorLink(self.env)
        layer = tstate.unwrap(model)
        # Only a description (its hash is stored in each snapshot; a different one on resume
        # is a warning) plus the data plan, which sampler() fills in. 0: no sampler (unknown).
        train = TrainConfig(model=f"{type(layer).__module__}:{type(layer).__qualname__}",
                            optimizer=type(optimizer).__name__, lr=float(optimizer.get_lr()),
                            max_steps=max_steps, global_batch_size=0)
        events = self.link.open_records()
        self.checkpointer = Checkpointer(dataclasses.replace(config, train=train), self.env,
                                         self.directory, events=events,
                                         run_dir=self.env.run_dir or self.directory.parent)
        self.agreement = script_agreement(self.env, self.checkpointer, watch_sigterm=stop_on_sigterm)
        self._target = CheckpointTarget(layer, optimizer, train, self.agreement.position)
        self._sampler: Optional[ResumableBatchSampler] = None
        self._resume_rng = None  # the snapshot's RNG states, set again as the loop begins
        self._stop_reason: Optional[str] = None
        self._finished = False
        self.link.set_phase("init")

    # ------------------------------------------------------------ where training stands

    @property
    def position(self) -> Position:
        """Steps done, and the next batch's epoch and index in it (live; do not modify)."""
        return self._target.position

    @property
    def preempted(self) -> bool:
        """A stop was requested (supervisor or SIGTERM); the snapshot of it is written."""
        return self._stop_reason == "preempted"

    def restore(self) -> Position:
        """Load the newest complete snapshot (model, optimizer, RNG) and return a copy of its
        position; ``Position()`` (step 0) when there is none. Every rank; before the loop."""
        self.link.set_phase("checkpoint")
        restored = self.checkpointer.restore(self._target)
        if restored is not None:
            self.agreement.resume_at(restored)
            self._resume_rng = tstate.rng_state()  # what restore just set: the snapshot's
            if self._sampler is not None:
                self._position_sampler()
        self.link.beat(self.position.step, "init")
        return dataclasses.replace(self.position)

    def sampler(self, dataset_size: int, global_batch_size: int, seed: int = DEFAULT_SEED,
                shuffle: bool = True, drop_last: bool = False) -> ResumableBatchSampler:
        """This rank's share of every global batch, as a ``batch_sampler`` for
        ``paddle.io.DataLoader``, positioned at the restored epoch and batch.

        The order depends only on ``(seed, epoch)``; ``global_batch_size`` is over all ranks
        and must divide by the world size. :meth:`epochs` moves it to each epoch.
        """
        if self.checkpointer.restored_global_batch_size is not None:
            check_global_batch(self.checkpointer.restored_global_batch_size, global_batch_size,
                               self.directory)
        self._sampler = ResumableBatchSampler(dataset_size, global_batch_size,
                                              self.env.world_size, self.env.rank, seed=seed,
                                              shuffle=shuffle, drop_last=drop_last)
        self._target.train = dataclasses.replace(self._target.train,
                                                 global_batch_size=global_batch_size,
                                                 drop_last=drop_last, seed=seed)
        self._position_sampler()
        return self._sampler

    def _position_sampler(self) -> None:
        pos, per_epoch = self.position, self._sampler.batches_per_epoch
        if pos.batch > per_epoch:
            raise tstate.StateMismatch(
                f"{self.directory}: the newest snapshot stopped at batch {pos.batch} of epoch "
                f"{pos.epoch}, but an epoch has {per_epoch} batches now; was the dataset or the "
                f"batch size changed since? Resume with the same ones.")
        self._sampler.set_epoch(pos.epoch, pos.batch)

    # ------------------------------------------------------------ the loop

    def epochs(self, epochs: int) -> Iterator[int]:
        """The epochs left of ``range(epochs)``: from the restored one on, until a step
        returned True. Moves the sampler to each; an epoch ends when your loop over the
        loader does (with the sampler, only after its last batch)."""
        pos = self.position
        if self.max_steps is not None and pos.step >= self.max_steps:
            self._stop_reason = "max_steps"  # a resumed run that had already finished
        while pos.epoch < epochs and self._stop_reason is None:
            if self._sampler is not None:
                self._position_sampler()
            if self._resume_rng is not None:
                tstate.restore_rng(self._resume_rng)
                self._resume_rng = None
            yield pos.epoch
            if self._stop_reason is not None:
                return
            if self._sampler is not None and pos.batch != self._sampler.batches_per_epoch:
                raise RuntimeError(
                    f"epoch {pos.epoch} ended after batch {pos.batch} of "
                    f"{self._sampler.batches_per_epoch}: leave the loop over the loader early only "
                    f"when session.step() returns True, and call step() once per batch")
            self.agreement.next_epoch()
            if self.by_epoch and pos.epoch < epochs:
                self._save("epoch")

    def step(self, loss=None, **metrics) -> bool:
        """One optimizer step is done (call it last in the step, on every rank).

        Counts it, heartbeats, writes rank 0's ``metrics.jsonl`` line (``loss`` and the
        other ``metrics``: numbers or one-element tensors, rank 0's own values), and takes
        a scheduled snapshot. Returns True when training must end now: ``max_steps`` is
        reached, or a stop was requested -- then the snapshot is already written.
        """
        if self._stop_reason is not None:
            raise RuntimeError(f"Session.step() after it returned True ({self._stop_reason}): "
                               f"leave the training loop then")
        pos = self.position
        self.agreement.advance()
        self.link.beat(pos.step)
        values = metrics if loss is None else {"loss": loss, **metrics}
        self.link.log_metrics(pos, values, self._target.optimizer)
        if self.max_steps is not None and pos.step >= self.max_steps:
            self._stop_reason = "max_steps"  # finish() takes the final snapshot
            return True
        decision = self.agreement.agree()
        if decision.stop:
            self._stop_reason = "preempted"
            self._save("preempted", wait=True)
            return True
        if decision.snapshot:
            self._save("scheduled")
        return False

    def finish(self) -> None:
        """Take the final snapshot (unless the stop's is already written), wait until it is
        persisted, release the checkpoint directory and send the last heartbeat ("done", or
        "stopped" after a stop request: the supervisor then knows the run is not finished).
        Every rank, once, after the loop. A preempted run should then just exit (code 0)."""
        if self._finished:
            return
        self._finished = True
        try:
            self._save("preempted" if self.preempted else "final", wait=True)
            self.checkpointer.close()
        finally:
            self.link.close_metrics()
        self.link.stop_heartbeat("stopped" if self.preempted else "done")

    def _save(self, reason: str, wait: bool = False) -> None:
        self.link.set_phase("checkpoint")
        self.checkpointer.save(self._target, reason, wait=wait)
        self.link.beat(self.position.step)
