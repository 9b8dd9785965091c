"""Run by test_shm_reduce.py under paddle.distributed.launch with 2 workers.

    python -m paddle.distributed.launch --nproc_per_node 2 shm_connect_job.py share|refuse

``refuse``: rank 1 acts as if it could not take part (another host, say). Each rank then
averages the gradients of a model with several buckets, one over 1 MiB (several rounds),
through what ``connect_host_sum`` gave it and through gloo, and prints
``RESULT rank shared same-bits``.
"""
import sys

import numpy as np
import paddle
import paddle.distributed as dist

from paddlerun.trainer import grad_sync, shm_reduce
from paddlerun.trainer.grad_sync import GradientSync

dist.init_parallel_env()
rank = dist.get_rank()
if sys.argv[1] == "refuse" and rank == 1:
    shm_reduce.unsupported_reason = lambda world: "told to refuse"
host_sum, how = grad_sync.connect_host_sum(rank, dist.get_world_size())
print(f"HOW {rank} {how}", flush=True)

paddle.seed(0)
model = paddle.nn.Sequential(paddle.nn.Linear(700, 700), paddle.nn.ReLU(), paddle.nn.Linear(700, 10))
results = []
for transport in (host_sum, None):
    paddle.seed(100 + rank)  # different data, so different gradients, on each rank
    x = paddle.randn([16, 700])
    model(x).square().mean().backward()
    GradientSync(model.parameters(), 2, bucket_bytes=1 << 20, host_sum=transport)()
    results.append([p.grad.numpy().copy() for p in model.parameters()])
    model.clear_gradients()
same = all(np.array_equal(a, b) for a, b in zip(*results))
print(f"RESULT {rank} {host_sum is not None} {same}", flush=True)
