"""A real Checkpointer over a small real model, without the training loop (imports paddle)."""
import dataclasses

import paddle

from paddlerun.trainer.checkpointer import Checkpointer
from paddlerun.trainer.rundir.config import Config
from paddlerun.trainer.rundir.env import WorkerEnv
from paddlerun.trainer.agreement import Position


@dataclasses.dataclass
class FakeTrainer:
    """What Checkpointer reads from a trainer: a real paddle layer and optimizer."""
    layer: paddle.nn.Layer
    optimizer: object
    train: object
    position: Position


def make_checkpointer(run_dir, directory="ckpt", sharded=False, sharded_optimizer=False, generation=None,
                      **checkpoint):
    """(Checkpointer writing to ``run_dir/directory``, a FakeTrainer over Linear(8, 4) + Adam);
    one worker. ``sharded``: the optimizer state is sharded (the Checkpointer's argument);
    ``sharded_optimizer``: the config asks for it. ``generation``: an elastic job's worker's
    (PADDLERUN_GENERATION). ``checkpoint`` overrides keys of the checkpoint config."""
    config = Config()
    config = dataclasses.replace(config, checkpoint=dataclasses.replace(config.checkpoint, **checkpoint),
                                 train=dataclasses.replace(config.train, sharded_optimizer=sharded_optimizer))
    env = WorkerEnv(rank=0, world_size=1, local_rank=0, nnodes=1, attempt=0, restarts=0,
                    run_dir=run_dir, checkpoint_dir=run_dir / directory, config_path=None, tty=False,
                    generation=generation)
    paddle.seed(0)
    with paddle.utils.unique_name.guard():
        layer = paddle.nn.Linear(8, 4)
        opt = paddle.optimizer.Adam(learning_rate=0.01, parameters=layer.parameters())
    trainer = FakeTrainer(layer, opt, config.train, Position())
    return Checkpointer(config, env, run_dir / directory, run_dir, sharded=sharded), trainer


def train_step(trainer, steps: int = 1) -> None:
    for _ in range(steps):
        loss = trainer.layer(paddle.randn([2, 8])).sum()
        loss.backward()
        trainer.optimizer.step()
        trainer.optimizer.clear_grad()
        trainer.position.step += 1
        trainer.position.batch += 1
