"""Snapshots and exact resume for ``paddle.Model.fit`` (hapi): one callback that owns the loader.

::

    from paddlerun.trainer.hapi import Checkpoint

    ckpt = Checkpoint("checkpoints", every_steps=100)
    model.fit(ckpt.loader(train_dataset, batch_size=64), epochs=5, callbacks=[ckpt])

Run it again after a crash (or under ``paddlerun run --script``, which restarts it and
sets the directory): it continues from the newest complete snapshot, and the model it
ends with is bit-identical to the one an uninterrupted run gives (CPU, same world size).
The snapshots are paddlerun's own (:mod:`paddlerun.trainer.checkpointer` writes them),
so ``paddlerun ckpt list/verify/digest`` work on them.

Why the callback builds the loader. ``fit`` runs ``for epoch in range(epochs)`` from 0
and iterates every batch of its loader; a callback can neither start it at a later
epoch nor skip a batch. So :meth:`Checkpoint.loader` puts paddlerun's
:class:`~paddlerun.trainer.sampler.ResumableBatchSampler` under the loader, and on a
resume the callback makes every finished epoch yield no batches and the interrupted
one start at its next batch. The skipped batches are never read, and every later
batch holds the same samples as in an uninterrupted run (the order depends only on
``(seed, epoch)``). Evaluation is skipped for the finished epochs too.

When things happen, and why there (hapi runs callbacks in list order and appends its
own ``LRScheduler`` callback, which steps the learning rate in ``on_train_batch_end``,
*after* ours):

* a snapshot due after step S is captured at the next ``on_train_batch_begin``,
  ``on_epoch_end`` or ``on_train_end``, once every callback has finished step S;
* on a resume the RNG states are set again right where the snapshot was captured (the
  first resumed ``on_train_batch_begin``; ``on_epoch_end`` / ``on_epoch_begin`` at an
  epoch boundary), so whatever the skipped epochs consumed does not count.

Exact, with these limits: random augmentation inside the data pipeline is not
replayed (the interrupted epoch's DataLoader workers, or the main process with
``num_workers=0``, draw from a different RNG state than they did for those batches);
hapi's running metrics (``acc``) restart from the resumed batch, and its progress bar
counts from there. ``accumulate_grad_batches > 1`` is refused (gradients held between
updates are not in a snapshot).

Script mode (``PADDLERUN_RUN_DIR`` set by the supervisor): the callback also writes
the rank's heartbeats, rank 0's per-step ``metrics.jsonl`` and ``snapshot_committed``
events, and honours the supervisor's stop request (snapshot, then end ``fit``), all
through :mod:`paddlerun.trainer.script_mode`, which a plain loop's
:class:`~paddlerun.trainer.session.Session` shares. Its heartbeats start when it is
constructed: construct it before anything slow (the supervisor gives a rank
``supervisor.hang_timeout_s`` for its first one).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Optional, Tuple

import paddle

from paddlerun.trainer import state as tstate
from paddlerun.trainer.agreement import Position, StepAgreement
from paddlerun.trainer.checkpointer import Checkpointer
from paddlerun.trainer.rundir.config import ConfigError, TrainConfig
from paddlerun.trainer.sampler import ResumableBatchSampler
from paddlerun.trainer.script_mode import (DEFAULT_SEED, CheckpointTarget, SupervisorLink,
                                           checkpoint_config, checkpoint_directory,
                                           script_agreement, script_env)

__all__ = ["Checkpoint"]

class _CountingSampler(ResumableBatchSampler):
    """Counts the epochs it was iterated, so the callback can tell that ``fit`` reads it."""

    iterations = 0

    def __iter__(self):
        self.iterations += 1
        yield from super().__iter__()


class Checkpoint(paddle.callbacks.Callback):
    """Take paddlerun snapshots during ``Model.fit`` and resume from the newest one.

    Args:
        directory: the checkpoints directory. Default: ``$PADDLERUN_CHECKPOINT_DIR``
            (set by ``paddlerun run --script``); required otherwise.
        every_steps: snapshot every this many training steps (hapi's batches, counted
            across epochs and restarts). With neither this nor ``every_seconds``: a
            snapshot at the end of every epoch.
        every_seconds: also snapshot when this much time passed since the last one (rank 0
            decides; only rank 0 writes).
        keep_last: how many complete snapshots to keep.
        async_save: write in a background thread (at most one in flight; its error is
            raised at the next snapshot or when training ends).
        resume: continue from the directory's newest complete snapshot. With ``False``
            the directory must hold none (snapshots are never overwritten).
        max_steps: end training after this many steps in total, counted across restarts
            (``fit(num_iters=...)`` counts this process's steps only, eval batches included).

    A final snapshot is always taken when ``fit`` ends. Every rank needs the callback;
    rank 0 writes. Pass :meth:`loader`'s result to ``fit``: resuming needs it.
    """

    def __init__(self, directory: Optional[str] = None, every_steps: Optional[int] = None,
                 every_seconds: Optional[float] = None, keep_last: int = 3, async_save: bool = True,
                 resume: bool = True, max_steps: Optional[int] = None):
        super().__init__()
        self.directory = checkpoint_directory(directory, "Checkpoint")
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"Checkpoint(max_steps={max_steps!r}): must be >= 1 or None")
        self.config = checkpoint_config(self.directory, "paddlerun.trainer.hapi.Checkpoint(...)",
                                        every_steps, every_seconds, keep_last, async_save)
        self.by_epoch = every_steps is None and every_seconds is None
        self.resume = resume
        self.max_steps = max_steps
        self.env = script_env()
        self.run_dir = self.env.run_dir
        self.link = SupervisorLink(self.env)  # script mode: heartbeats from now on
        self.sampler: Optional[_CountingSampler] = None
        self.trainer: Optional[CheckpointTarget] = None
        self.checkpointer: Optional[Checkpointer] = None
        self.agreement: Optional[StepAgreement] = None
        self._resume_at: Optional[Tuple[int, int]] = None  # (epoch, batch) to continue from
        self._resume_rng = None  # the snapshot's RNG states, set again at the capture point
        self._finished = False  # a resumed run that had already reached max_steps
        self._pending: Optional[str] = None  # reason of a snapshot due, captured at the next hook
        self._stop_reason: Optional[str] = None
        self._eval_sampler = None  # the eval loader's own sampler while evaluation is skipped
        self._epoch_iterations = 0

    # ------------------------------------------------------------ the loader

    def loader(self, dataset, batch_size: int = 1, shuffle: bool = True, drop_last: bool = False,
               seed: int = DEFAULT_SEED, **dataloader_args) -> paddle.io.DataLoader:
        """The training DataLoader to pass to ``fit`` instead of the dataset.

        ``batch_size`` is per rank, as in ``fit``. ``seed`` fixes the shuffled order (the
        same in every restart); other keyword arguments go to ``paddle.io.DataLoader``.
        """
        self.sampler = _CountingSampler(len(dataset), batch_size * self.env.world_size,
                                        self.env.world_size, self.env.rank, seed=seed,
                                        shuffle=shuffle, drop_last=drop_last)
        return paddle.io.DataLoader(dataset, batch_sampler=self.sampler, return_list=True,
                                    **dataloader_args)

    # ------------------------------------------------------------ train begin: restore

    def on_train_begin(self, logs=None):
        model = self.model
        if self.sampler is None:
            raise RuntimeError("Checkpoint cannot resume a fit it does not feed: pass "
                               "ckpt.loader(train_dataset, batch_size=...) to fit instead of the dataset")
        if getattr(model, "_accumulate", 1) != 1:
            raise ValueError("Checkpoint does not support fit(accumulate_grad_batches > 1): the "
                             "gradients held between updates are not in a snapshot")
        if getattr(model, "num_iters", None) is not None:
            warnings.warn("fit(num_iters=...) counts only this process's steps (and eval batches); "
                          "after a resume it trains that many more. Use Checkpoint(max_steps=...)")
        train = TrainConfig(
            model=f"{type(model.network).__module__}:{type(model.network).__qualname__}",
            optimizer=type(model._optimizer).__name__, lr=float(model._optimizer.get_lr()),
            loss=type(model._loss).__name__, epochs=int(self.params.get("epochs") or 1),
            max_steps=self.max_steps, global_batch_size=self.sampler.global_batch_size,
            drop_last=self.sampler.drop_last, seed=self.sampler.seed)
        config = dataclasses.replace(self.config, train=train)
        events = self.link.open_records()
        self.checkpointer = Checkpointer(config, self.env, self.directory,
                                         run_dir=self.run_dir or self.directory.parent, events=events)
        self.agreement = script_agreement(self.env, self.checkpointer)
        self.trainer = CheckpointTarget(model.network, model._optimizer, train, self.agreement.position)
        restored = self._restore() if self.resume else self._refuse_existing()
        if restored is not None:
            self.agreement.resume_at(restored)
            self._resume_at = (restored.epoch, restored.batch)
            self._resume_rng = tstate.rng_state()  # what restore just set: the snapshot's
            if self.max_steps is not None and restored.step >= self.max_steps:
                self._finished = True
                model.stop_training = True  # hapi checks it after the (now empty) first epoch

    def _restore(self) -> Optional[Position]:
        self.link.set_phase("checkpoint")
        restored = self.checkpointer.restore(self.trainer)
        if restored is not None and restored.batch > self.sampler.batches_per_epoch:
            raise tstate.StateMismatch(
                f"{self.directory}: the newest snapshot stopped at batch {restored.batch} of epoch "
                f"{restored.epoch}, but an epoch has {self.sampler.batches_per_epoch} batches now; was "
                f"the dataset or the batch size changed since? Resume with the same ones.")
        return restored

    def _refuse_existing(self) -> None:
        newest = self.checkpointer.store.newest_complete(verify=False)
        if newest is not None:
            raise ConfigError(f"Checkpoint(resume=False) but {self.directory} already holds the "
                              f"snapshot {newest.path.name}: delete it, pick another directory or "
                              f"resume")
        return None

    # ------------------------------------------------------------ epochs: skip what is done

    def on_epoch_begin(self, epoch, logs=None):
        pos, per_epoch = self.trainer.position, self.sampler.batches_per_epoch
        start = 0
        if self._finished or (self._resume_at is not None and epoch < self._resume_at[0]):
            start = per_epoch  # finished before the restart: an empty epoch, no evaluation
            self._skip_eval()
        else:
            self._unskip_eval()  # (hapi may skip evaluation at a skipped epoch: eval_freq)
            if self._resume_at is not None:  # epoch == the snapshot's epoch
                start = self._resume_at[1]
                self._resume_at = None
                if start == 0:
                    self._set_resume_rng()
        if not self._finished:
            pos.epoch, pos.batch = epoch, start
        self.sampler.set_epoch(epoch, start)
        self._epoch_iterations = self.sampler.iterations

    def on_epoch_end(self, epoch, logs=None):
        self._set_resume_rng()  # resumed at the end of this epoch: the capture point
        self._flush()
        pos = self.trainer.position
        if self.by_epoch and pos.batch == self.sampler.batches_per_epoch and not self._finished:
            self._save("epoch")

    def _skip_eval(self) -> None:
        loader = getattr(self.model, "_test_dataloader", None)
        if self._eval_sampler is None and isinstance(loader, paddle.io.DataLoader) \
                and loader.batch_sampler is not None:
            self._eval_sampler, loader.batch_sampler = loader.batch_sampler, []

    def _unskip_eval(self) -> None:
        if self._eval_sampler is not None:
            self.model._test_dataloader.batch_sampler = self._eval_sampler
            self._eval_sampler = None

    def on_eval_end(self, logs=None):
        self._unskip_eval()

    def on_eval_batch_end(self, step, logs=None):
        self.link.beat(self.trainer.position.step, "eval")

    # ------------------------------------------------------------ steps

    def on_train_batch_begin(self, step, logs=None):
        if self.sampler.iterations == self._epoch_iterations:
            raise RuntimeError("fit is not reading the loader of this Checkpoint: pass "
                               "ckpt.loader(train_dataset, batch_size=...) to fit as its train data")
        self._set_resume_rng()
        self._flush()

    def on_train_batch_end(self, step, logs=None):
        pos = self.trainer.position
        self.agreement.advance()
        self.link.beat(pos.step)
        self.link.log_metrics(pos, logs or {}, self.trainer.optimizer)
        if self.max_steps is not None and pos.step >= self.max_steps:
            self._stop("max_steps")
            decision = self.agreement.decide(None)  # every rank ends here: nothing to agree on
        else:
            decision = self.agreement.agree()
            if decision.stop:
                self._stop("preempted")
        if decision.snapshot:
            self._pending = "scheduled"  # captured once the other callbacks are done with the step

    def _stop(self, reason: str) -> None:
        """End ``fit`` after this batch. hapi checks ``stop_training`` only after a whole epoch;
        its ``num_iters`` countdown (``Model._run_one_epoch``) is the one way out mid-epoch."""
        self._stop_reason = reason
        self.model.num_iters = 1
        self.model.stop_training = True

    # ------------------------------------------------------------ snapshots

    def _set_resume_rng(self) -> None:
        if self._resume_rng is not None and self._resume_at is None:
            tstate.restore_rng(self._resume_rng)
            self._resume_rng = None

    def _flush(self) -> None:
        if self._pending is not None:
            reason, self._pending = self._pending, None
            self._save(reason)

    def _save(self, reason: str, wait: bool = False) -> None:
        self.link.set_phase("checkpoint")
        self.checkpointer.save(self.trainer, reason, wait=wait)
        self.link.beat(self.trainer.position.step)

    def on_train_end(self, logs=None):
        self._unskip_eval()
        try:
            self._pending = None
            self._save(self._stop_reason or "final", wait=True)
            self.checkpointer.close()
        finally:
            self.link.close_metrics()
        self.link.stop_heartbeat("stopped" if self._stop_reason == "preempted" else "done")
