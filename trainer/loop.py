"""The training loop that ``paddlerun run CONFIG`` runs in every worker.

config -> model, data, optimizer -> ``paddle.DataParallel`` -> epochs of steps, with
the resumable sampler, metrics, evaluation and (through :mod:`checkpointer`) snapshots.

Ranks agree on everything that needs a collective: each step's data comes from the
sampler's deterministic plan, and the logged metrics are all-reduced at the same
global steps on every rank.
"""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import paddle
import paddle.distributed as dist

from paddlerun.trainer import factories, sharding
from paddlerun.trainer.agreement import Position, StepAgreement
from paddlerun.trainer.checkpoint import StaleGenerationError
from paddlerun.trainer.rundir.config import Config
from paddlerun.trainer.rundir.digest import params_digest
from paddlerun.trainer.rundir.env import WorkerEnv
from paddlerun.trainer.rundir.metrics import MetricsLog, write_json_atomic
from paddlerun.trainer.progress import Progress, Throughput
from paddlerun.trainer.rendezvous import wait_for_master
from paddlerun.trainer.sampler import ResumableBatchSampler, shard_indices
from paddlerun.trainer.device import select_device
from paddlerun.trainer.rundir.errors import is_peer_failure
from paddlerun.trainer.grad_sync import GradientSync, all_reduce_sums, broadcast_parameters, connect_host_sum
from paddlerun.trainer.rundir.heartbeat import lowest_live_rank
from paddlerun.trainer.signals import ignoring_sigterm
from paddlerun.trainer.state import capture_rng, model_arrays

log = logging.getLogger("paddlerun.worker")


def seed_everything(seed: int) -> None:
    paddle.seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class Trainer:
    def __init__(self, config: Config, env: WorkerEnv, run_dir: Path, checkpointer=None,
                 heartbeat=None, watch_sigterm: bool = False):
        self.config = config
        self.train = config.train
        self.env = env
        self.run_dir = run_dir
        self.is_rank0 = env.rank == 0
        self.checkpointer = checkpointer
        self.heartbeat = heartbeat
        self.device = select_device(config.launch.device, env.local_rank)
        seed_everything(self.train.seed)
        # Fleet's sharded optimizer does the gradient reduction itself (trainer/sharding.py).
        self.sharded = sharding.enabled(self.train.sharded_optimizer, env.world_size)
        if env.world_size > 1:
            wait_for_master(config.supervisor.start_timeout_s)
        if self.sharded:
            sharding.init(env.world_size)
        elif env.world_size > 1:
            dist.init_parallel_env()

        self.layer = factories.build_model(self.train)
        self.model = self.layer
        self.grad_sync = None
        if self.sharded:
            self.model = sharding.wrap_model(self.layer)
        elif env.world_size > 1:
            if self.uses_python_grad_sync():
                broadcast_parameters(self.layer)
                self.grad_sync = GradientSync(self.layer.parameters(), env.world_size,
                                              host_sum=self._connect_host_sum())
            else:
                self.model = paddle.DataParallel(self.layer)
        self._init_progress()
        self.train_data = factories.build_dataset(self.train, "train")
        self.eval_data = factories.build_dataset(self.train, "eval")
        self._init_progress()
        if self.is_rank0:
            log.info("data: %s", getattr(self.train_data, "source", type(self.train_data).__name__))
        self.sampler = ResumableBatchSampler(
            len(self.train_data), self.train.global_batch_size, env.world_size, env.rank,
            seed=self.train.seed, drop_last=self.train.drop_last)
        self.loader = paddle.io.DataLoader(self.train_data, batch_sampler=self.sampler,
                                           num_workers=self.train.num_workers, return_list=True)
        steps_all_epochs = self.train.epochs * self.sampler.batches_per_epoch
        self.total_steps = min(self.train.max_steps or steps_all_epochs, steps_all_epochs)
        self.lr = factories.build_lr(self.train, self.total_steps)
        self.optimizer = factories.build_optimizer(self.train, self.model.parameters(), self.lr)
        if self.sharded:
            self.optimizer = sharding.wrap_optimizer(self.optimizer)
        self.loss_fn = factories.build_loss(self.train)
        # Stops and time-based snapshots are agreed at every log step (and the last), riding
        # on the metrics' sum: every rank takes part in a snapshot (sharded: one shard each).
        self.agreement = StepAgreement(env.rank, env.world_size, self.train.log_every_steps,
                                       run_dir, watch_sigterm=watch_sigterm, schedule=checkpointer,
                                       agree_time=True, last_step=self.total_steps)
        self.position: Position = self.agreement.position
        self.samples_per_step = self.train.global_batch_size
        self.last_eval: Dict[str, float] = {}
        self.last_train: Dict[str, float] = {}
        # Possible only where a dead peer raises in Python: our own gradient sync, unsharded.
        self._emergency_enabled = checkpointer is not None and self.grad_sync is not None
        # A window's sample count is exact in float32 gradients up to 2**24.
        self._counts_fit_float32 = self.train.global_batch_size * self.train.log_every_steps < 2 ** 24
        self._rng_before_step = None

    def _init_progress(self) -> None:
        """Start-up is slow (data, rendezvous, restore): each stage counts as progress."""
        if self.heartbeat is not None:
            self.heartbeat.set_phase("init")

    def _connect_host_sum(self):
        """Shared memory for the gradient sum when every rank is on this host (CPU)."""
        host_sum, how = None, "gloo"
        if self.train.grad_transport == "auto" and self.device == "cpu":
            host_sum, how = connect_host_sum(self.env.rank, self.env.world_size)
        if self.is_rank0:
            log.info("gradients summed through %s", how)
        return host_sum

    def uses_python_grad_sync(self) -> bool:
        mode = self.train.grad_sync
        return mode == "python" or (mode == "auto" and not self.device.startswith("gpu"))

    # ------------------------------------------------------------ the loop

    def fit(self) -> Dict:
        """Train to ``total_steps`` (or until a stop is agreed); returns the summary."""
        started = time.time()
        if self.checkpointer is not None:
            self._init_progress()
            restored = self.checkpointer.restore(self, self.config.checkpoint.resume_from)
            if restored is not None:
                self.agreement.resume_at(restored)
            self._init_progress()
        self.start_step = self.position.step
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl") if self.is_rank0 else None
        self.progress = Progress(self.train.epochs, self.sampler.batches_per_epoch,
                                 self.total_steps, tty=self.env.tty)
        self._meter = Throughput()
        self._window = _Window()
        try:
            status = self._train_epochs()
        except Exception as e:
            self._maybe_emergency_save(e)
            raise
        if status == "finished":
            if self.position.batch and not self.last_eval_is_current():
                self._evaluate_and_log()
            self._save("final", wait=True)
        if self.checkpointer is not None:
            self.checkpointer.close()
        return self._finish(started, status)

    def _train_epochs(self) -> str:
        pos = self.position
        self.model.train()
        while pos.step < self.total_steps:
            self.sampler.set_epoch(pos.epoch, pos.batch)
            if self.is_rank0 and pos.batch == 0:
                self.progress.epoch_begin(pos.epoch)
            for inputs, labels in self.loader:
                self._rng_before_step = capture_rng() if self._emergency_enabled else None
                agree = self.agreement.is_point(pos.step + 1)
                sums = self._step(inputs, labels, agree)
                self.agreement.advance()
                self._rng_before_step = None
                if self.heartbeat is not None:
                    self.heartbeat.beat(pos.step)
                decision = self.agreement.decide(self._log(sums) if agree else None)
                if decision.stop:
                    self._save("preempted", wait=True)
                    return "preempted"
                if pos.step >= self.total_steps:
                    break
                if pos.batch < self.sampler.batches_per_epoch and decision.snapshot:
                    self._save("scheduled")
            if pos.batch >= self.sampler.batches_per_epoch:
                self._end_epoch(pos)
        return "finished"

    def _step(self, inputs, labels, agree: bool):
        """One optimizer step; at an agreement point (``agree``, the same steps on every
        rank) also the window's metric sums and this rank's requests, summed over the ranks."""
        outputs = self.model(inputs)
        loss = self.loss_fn(outputs, labels)
        loss.backward()
        self._window.add(loss, outputs.argmax(axis=-1), labels)
        local = self._window.take() + self.agreement.requests() if agree else None
        summed = None
        if self.grad_sync is not None:  # carries them with the gradients: one all-reduce, not two
            summed = self.grad_sync(local if self._counts_fit_float32 else None)
        if agree and summed is None:
            summed = all_reduce_sums(local) if self.env.world_size > 1 else local
        self.optimizer.step()
        self.optimizer.clear_grad()
        if isinstance(self.lr, paddle.optimizer.lr.LRScheduler):
            self.lr.step()
        return summed

    def _save(self, reason: str, wait: bool = False) -> None:
        if self.checkpointer is None:
            return
        if self.heartbeat is not None:
            self.heartbeat.set_phase("checkpoint")
        self.checkpointer.save(self, reason, wait=wait or not self.config.checkpoint.async_save)
        if self.heartbeat is not None:
            self.heartbeat.beat(self.position.step)

    def _log(self, sums):
        """The agreement point, every ``log_every_steps``: ``sums`` (the window's metric
        sums and the ranks' requests, summed over the ranks) are the same on every rank, so
        every rank logs the global figures; returns the summed requests, to decide on."""
        pos = self.position
        loss_sum, correct, count, batches = sums[:4]
        values = {"loss": loss_sum / max(batches, 1), "acc": correct / max(count, 1)}
        rate, eta = self._meter.update((pos.step - self.start_step) * self.samples_per_step,
                                       pos.step - self.start_step, self.total_steps - pos.step)
        if self.is_rank0:
            self.progress.step(pos.batch, pos.step, values, rate, eta)
            self.metrics.append({"step": pos.step, "epoch": pos.epoch, **values,
                                 "lr": self.optimizer.get_lr(), "samples_per_s": rate,
                                 "time": time.time(), "attempt": self.env.attempt})
        self.last_train = values
        return sums[4:]

    def _maybe_emergency_save(self, error: Exception) -> None:
        """A collective failed because a peer died: the lowest surviving rank saves the
        last completed step, so the crash costs only the step in flight."""
        if not self._emergency_enabled or not is_peer_failure(error):
            return
        # A peer that just died may not look dead for a moment: ask again for a little while.
        deadline = time.time() + 1.0
        while lowest_live_rank(self.run_dir / "heartbeats", self.env.rank) != self.env.rank:
            if time.time() > deadline:
                log.info("a lower rank is alive and writes the emergency snapshot")
                return
            time.sleep(0.05)
        rng = self._rng_before_step or capture_rng()
        if self.heartbeat is not None:  # the supervisor waits for a rank that is saving
            self.heartbeat.set_phase("checkpoint")
        with ignoring_sigterm():
            try:
                path = self.checkpointer.emergency_save(self, rng)
            except StaleGenerationError:
                raise  # the root cause now: this worker's generation is over
            except Exception as e:  # the original error is the one to report
                log.warning("emergency snapshot failed: %s: %s", type(e).__name__, e)
                return
        if path is not None:
            log.warning("a peer failed at step %d; emergency snapshot %s written by rank %d",
                        self.position.step + 1, path, self.env.rank)

    def _end_epoch(self, pos: Position) -> None:
        finished = pos.epoch
        self.agreement.next_epoch()
        if (finished + 1) % self.train.eval_every_epochs == 0:
            self._evaluate_and_log(epoch=finished)
        if pos.step < self.total_steps and self.agreement.decide(None).snapshot:
            self._save("scheduled")

    def last_eval_is_current(self) -> bool:
        return self.last_eval.get("step") == self.position.step

    def _evaluate_and_log(self, epoch: Optional[int] = None) -> None:
        if self.eval_data is None:
            return
        result = self.evaluate()
        self.last_eval = {"step": self.position.step, **result}
        if self.is_rank0:
            self.progress.message(f"Eval after global step {self.position.step}: "
                             f"loss: {result['eval_loss']:.4f} - acc: {result['eval_acc']:.4f} "
                             f"({result['eval_samples']} samples)")
            self.metrics.append({"step": self.position.step,
                                 "epoch": self.position.epoch if epoch is None else epoch,
                                 **result, "time": time.time(), "attempt": self.env.attempt})

    @paddle.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Every rank evaluates a disjoint share; the sums are all-reduced, so all agree."""
        layer = self.layer
        layer.eval()
        if self.heartbeat is not None:
            self.heartbeat.set_phase("eval")
        subset = paddle.io.Subset(self.eval_data,
                                  shard_indices(len(self.eval_data), self.env.world_size, self.env.rank))
        loader = paddle.io.DataLoader(subset, batch_size=max(self.train.global_batch_size // self.env.world_size, 1),
                                      shuffle=False, drop_last=False, return_list=True)
        loss_sum, correct, count = 0.0, 0, 0
        for inputs, labels in loader:
            outputs = layer(inputs)
            loss_sum += float(self.loss_fn(outputs, labels)) * len(labels)
            correct += int((outputs.argmax(axis=-1) == labels.reshape([-1])).astype("int64").sum())
            count += len(labels)
            if self.heartbeat is not None:
                self.heartbeat.beat(self.position.step, "eval")
        sums = paddle.to_tensor([loss_sum, correct, count], dtype="float64")
        if self.env.world_size > 1:
            dist.all_reduce(sums)
        loss_sum, correct, count = sums.numpy().tolist()
        self.model.train()
        return {"eval_loss": loss_sum / max(count, 1), "eval_acc": correct / max(count, 1),
                "eval_samples": int(count)}

    def _finish(self, started: float, status: str) -> Dict:
        wall = time.time() - started
        summary = {
            "status": "succeeded" if status == "finished" else status,
            "global_steps": self.position.step,
            "epochs": self.position.epoch + (self.position.batch > 0),
            "world_size": self.env.world_size,
            "train": self.last_train,
            "eval": {k: v for k, v in self.last_eval.items() if k != "step"},
            "wall_time_s": wall,
            "samples_per_s": (self.position.step - self.start_step) * self.samples_per_step
            / max(wall, 1e-9),
            "device": self.device,
            "digest": params_digest(model_arrays(self.layer)),
        }
        if self.is_rank0:
            self.metrics.close()
            if status == "finished":
                write_json_atomic(self.run_dir / "summary.json", summary)
        return summary


class _Window:
    """Sums of loss, correct and count since the last log step (tensors: no sync per step).

    Predictions are compared with the labels every ``FOLD`` steps, not every step: four
    ops a step (compare, cast, sum, reshape) measured ~17 us, 0.4 % of a LeNet step.
    Folding bounds what a long window keeps alive (on a GPU, in its memory).
    """
    FOLD = 16

    def __init__(self):
        self._losses, self._predicted, self._labels, self._count = [], [], [], 0
        self._correct = []  # one int64 tensor per fold

    def add(self, loss, predicted, labels) -> None:
        self._losses.append(loss.detach())
        self._predicted.append(predicted)
        self._labels.append(labels)
        self._count += labels.shape[0]  # len() of a Tensor is Python in Paddle: 3.6 us, this 0.2
        if len(self._predicted) >= self.FOLD:
            self._fold()

    def _fold(self) -> None:
        hits = paddle.concat(self._predicted) == paddle.concat(self._labels).reshape([-1])
        self._correct.append(hits.astype("int64").sum())
        self._predicted, self._labels = [], []

    def take(self):
        if self._predicted:
            self._fold()
        correct = float(paddle.add_n(self._correct)) if self._correct else 0.0
        values = [float(paddle.add_n(self._losses)) if self._losses else 0.0, correct,
                  float(self._count), float(len(self._losses))]
        self.__init__()
        return values
