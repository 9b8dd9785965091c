"""Where training stands, and when all ranks stop or snapshot: one protocol for every loop.

The config loop (:mod:`.loop`), :class:`~paddlerun.trainer.session.Session` and the hapi
callback (:mod:`.hapi`) each count their steps in a :class:`StepAgreement` and ask it, after
each step, whether training must stop or a snapshot is due.

A stop may be asked on any rank -- each node's supervisor writes its own node's control
file (:mod:`.rundir.control`), a scheduler may SIGTERM one node's processes -- and it must
stop every rank: ranks may enter a collective only together, and a rank that left would
leave its peers waiting in their next one (gloo: 30 s, then an error). So the ranks agree
at *agreement points* only: every ``every`` steps (and after ``last_step``), since the step
count is the one thing every rank knows without a message. There each rank contributes
its requests, they are summed over the ranks, and a request of any rank stops all.

Snapshots: one due by step count (``checkpoint.every_steps``) is the same on every rank
with no message. One due by time is rank 0's opinion (its clock). Where every rank takes
part in a snapshot (the config loop: a sharded optimizer writes one shard per rank),
that opinion travels with the requests and counts from the next agreement point
(``agree_time=True``); where rank 0 alone writes (script mode), rank 0 acts on it at
once.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from paddlerun.trainer import signals
from paddlerun.trainer.grad_sync import all_reduce_sums
from paddlerun.trainer.rundir import control


@dataclass
class Position:
    """Where training stands: ``step`` optimizer steps done; the next batch is
    ``batch`` of ``epoch``. This is what a snapshot stores to resume exactly."""
    step: int = 0
    epoch: int = 0
    batch: int = 0


@dataclass(frozen=True)
class Decision:
    """What every rank does after a step; the same on every rank."""
    stop: bool = False      #: snapshot now (waiting for it) and end training
    snapshot: bool = False  #: a scheduled snapshot is due


class StepAgreement:
    """One rank's position and its part in the all-rank stop/snapshot agreement.

    Args:
        rank, world_size: this rank, and how many agree.
        every: steps between agreement points.
        run_dir: this node's run directory, whose control file asks for a stop
            (None outside ``paddlerun``: no file to read).
        watch_sigterm: a SIGTERM to this process asks for a stop too; the caller has
            installed :func:`~paddlerun.trainer.signals.install_stop_handler`.
        schedule: the snapshot schedule (``due_by_steps(step)``, ``due_by_time(now)``: a
            :class:`~paddlerun.trainer.checkpointer.Checkpointer`), or None: no snapshots.
        agree_time: rank 0's time-based snapshot is agreed on by all ranks (see the module
            docstring); else rank 0 takes it at once, alone.
        last_step: also an agreement point (the config loop's final step), if given.
    """

    def __init__(self, rank: int, world_size: int, every: int, run_dir: Optional[Path] = None,
                 watch_sigterm: bool = False, schedule=None, agree_time: bool = False,
                 last_step: Optional[int] = None):
        if every < 1:
            raise ValueError(f"StepAgreement(every={every!r}): must be >= 1")
        self.rank, self.world_size, self.every = rank, world_size, every
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.watch_sigterm = watch_sigterm
        self.schedule = schedule
        self.agree_time = agree_time
        self.last_step = last_step
        self.position = Position()

    # ------------------------------------------------------------ counting

    def advance(self) -> int:
        """One optimizer step is done: the next batch of the same epoch. Returns the step."""
        self.position.step += 1
        self.position.batch += 1
        return self.position.step

    def next_epoch(self) -> None:
        """The epoch's last batch is done: the next batch is the next epoch's first."""
        self.position.epoch += 1
        self.position.batch = 0

    def resume_at(self, position: Position) -> None:
        """Continue from ``position`` (a restored snapshot's). Copied into :attr:`position`,
        which stays the same object: whoever holds it (a checkpoint target) sees the change."""
        self.position.step, self.position.epoch, self.position.batch = \
            position.step, position.epoch, position.batch

    def is_point(self, step: int) -> bool:
        """Whether the ranks agree after step ``step``: the same answer on every rank."""
        return step % self.every == 0 or step == self.last_step

    # ------------------------------------------------------------ the agreement

    def requests(self) -> List[float]:
        """This rank's contribution to an agreement point, to be summed over the ranks:
        ``[stop asked here, snapshot due by rank 0's clock (when agreed)]``."""
        stop = float(self.stop_asked())
        due = self.agree_time and self.rank == 0 and self._due_by_time()
        return [stop, float(due)]

    def stop_asked(self) -> bool:
        """Whether a stop was asked of this rank: its node's control file, or a SIGTERM."""
        return ((self.run_dir is not None and control.stop_requested(self.run_dir))
                or (self.watch_sigterm and signals.stop_signalled()))

    def decide(self, summed: Optional[Sequence[float]]) -> Decision:
        """The decision after the step just counted, from :meth:`requests` summed over all
        ranks at an agreement point (None elsewhere): the same on every rank."""
        step = self.position.step
        stop, by_time = (summed[0] > 0, summed[1] > 0) if summed is not None else (False, False)
        if not self.agree_time:
            by_time = self.rank == 0 and self._due_by_time()
        by_steps = self.schedule is not None and self.schedule.due_by_steps(step)
        return Decision(stop=stop, snapshot=bool(by_steps or by_time))

    def agree(self) -> Decision:
        """:meth:`decide` with its own collective at an agreement point (a sum over the ranks
        when world > 1). Every rank, after every step. Where no rank can have a request (no
        run directory, SIGTERM not watched, no agreed time), there is no collective at all."""
        summed = None
        if self.is_point(self.position.step) and self._may_ask():
            summed = self.requests()
            if self.world_size > 1:
                summed = all_reduce_sums(summed)
        return self.decide(summed)

    def _may_ask(self) -> bool:
        # The same on every rank: all run under paddlerun or none, and all watch SIGTERM or none.
        return self.run_dir is not None or self.watch_sigterm or self.agree_time

    def _due_by_time(self) -> bool:
        return self.schedule is not None and self.schedule.due_by_time(time.time())

