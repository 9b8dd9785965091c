"""A plain Paddle training loop (LeNet on MNIST, Adam, data parallel) made fault tolerant
with paddlerun's Session. Lines marked ``# paddlerun`` are what it adds.

    paddlerun run --script examples/train_script.py --nproc-per-node 2 -- --max-steps 200
    python examples/train_script.py --checkpoint-dir ckpts      # one process, no supervisor

Kill a worker, or the whole run, and start it again: it resumes from the newest snapshot,
and the ``digest`` it prints at the end (sha256 of the trained parameters) is the one a
run that never stopped prints.
"""
import argparse

import paddle
import paddle.distributed as dist

from paddlerun.trainer.data import mnist
from paddlerun.trainer.rundir.digest import params_digest
from paddlerun.trainer.models import LeNet
from paddlerun.trainer.session import Session  # paddlerun

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--max-steps", type=int, default=None)
parser.add_argument("--every-steps", type=int, default=20, help="a snapshot every this many steps")
parser.add_argument("--checkpoint-dir", default=None, help="default: $PADDLERUN_CHECKPOINT_DIR")
args = parser.parse_args()

if dist.get_world_size() > 1:
    dist.init_parallel_env()
paddle.seed(2024)  # the same initial weights on every rank and in every run
net = LeNet()
model = paddle.DataParallel(net) if dist.get_world_size() > 1 else net
optimizer = paddle.optimizer.Adam(learning_rate=0.001, parameters=model.parameters())
loss_fn = paddle.nn.CrossEntropyLoss()
train_data = mnist("train")

session = Session(model, optimizer, args.checkpoint_dir, every_steps=args.every_steps,  # paddlerun
                  max_steps=args.max_steps)
start = session.restore()  # paddlerun: model, optimizer and RNG of the newest snapshot
sampler = session.sampler(len(train_data), global_batch_size=64)  # paddlerun: resumable order
loader = paddle.io.DataLoader(train_data, batch_sampler=sampler)
if dist.get_rank() == 0:
    print(f"starting at step {start.step} (epoch {start.epoch}, batch {start.batch})", flush=True)

for epoch in session.epochs(args.epochs):  # paddlerun: from the restored epoch on
    for images, labels in loader:
        loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        if session.step(loss=loss):  # paddlerun: True when preempted (snapshot taken) or done
            break
session.finish()  # paddlerun: final snapshot, then tell the supervisor this rank is done

if dist.get_rank() == 0 and not session.preempted:
    print("digest", params_digest({k: v.numpy() for k, v in net.state_dict().items()}), flush=True)
