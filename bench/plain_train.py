"""LeNet on MNIST the way a Paddle user writes it: DataParallel, no checkpoints (overhead_bench's baseline).

    python -m paddle.distributed.launch --nproc_per_node 2 bench/plain_train.py --steps 600 --warmup 50
    python -m paddle.distributed.launch --nproc_per_node 2 bench/plain_train.py --json /tmp/plain.json

Same model, data, global batch (64: 32 a rank), optimizer (Adam 0.001) and seed as
``paddlerun run configs/mnist_lenet.yaml``. Rank 0 prints (and with --json writes) the
samples/s between the end of step ``--warmup`` and the end of step ``--steps``.
"""
import argparse
import json
import time

import paddle
import paddle.distributed as dist

from paddlerun.trainer.data import mnist
from paddlerun.trainer.models import LeNet

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=600)
parser.add_argument("--warmup", type=int, default=50)
parser.add_argument("--json", default=None)
parser.add_argument("--progress", default=None,
                    help="rank 0 appends 'STEP TIME' here every 10 steps (timeslice_bench.py)")
args = parser.parse_args()

paddle.seed(2024)
dist.init_parallel_env()
model = paddle.DataParallel(LeNet())
data = mnist("train")
sampler = paddle.io.DistributedBatchSampler(data, batch_size=64 // dist.get_world_size(), shuffle=True)
loader = paddle.io.DataLoader(data, batch_sampler=sampler, return_list=True)
opt = paddle.optimizer.Adam(learning_rate=0.001, parameters=model.parameters())
loss_fn = paddle.nn.CrossEntropyLoss()

step, epoch, times = 0, 0, {}
progress = open(args.progress, "a", buffering=1) if args.progress and dist.get_rank() == 0 else None
while step < args.steps:
    sampler.set_epoch(epoch)
    for images, labels in loader:
        loss = loss_fn(model(images), labels)
        loss.backward()
        opt.step()
        opt.clear_grad()
        step += 1
        if step in (args.warmup, args.steps):
            times[step] = time.time()
        if progress is not None and step % 10 == 0:
            progress.write(f"{step} {time.time()}\n")
        if step >= args.steps:
            break
    epoch += 1

if dist.get_rank() == 0:
    rate = (args.steps - args.warmup) * 64 / (times[args.steps] - times[args.warmup])
    result = {"steps": args.steps, "warmup": args.warmup, "samples_per_s": rate,
              "seconds": times[args.steps] - times[args.warmup], "final_loss": float(loss)}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)
