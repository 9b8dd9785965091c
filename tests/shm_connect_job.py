"""Run by test_shm_reduce.py under paddle.distributed.launch with 2 workers.

    python -m paddle.distributed.launch --nproc_per_node 2 shm_connect_job.py share|refuse

``refuse``: rank 1 acts as if on another host (it cannot map the segment). Each rank
prints ``RESULT rank shared sum`` after one gradient-sized sum through what it got.
"""
import sys

import numpy as np
import paddle
import paddle.distributed as dist

from paddlerun.trainer import grad_sync, shm_reduce

dist.init_parallel_env()
rank = dist.get_rank()
if sys.argv[1] == "refuse" and rank == 1:
    shm_reduce.supported = lambda: False
host_sum = grad_sync.connect_host_sum(rank, dist.get_world_size())
values = np.full(1000, rank + 1, dtype=np.float32)
if host_sum is not None:
    host_sum.all_reduce(values)
else:
    tensor = paddle.to_tensor(values)
    dist.all_reduce(tensor)
    values = tensor.numpy()
print(f"RESULT {rank} {host_sum is not None} {values.sum():g}", flush=True)
