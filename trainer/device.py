"""Which device a worker trains on: the one Paddle's launcher assigned it.

``paddle.distributed.launch`` tells each worker its GPU in ``FLAGS_selected_gpus`` -- from
``--devices``, as an index among the visible GPUs; a node's only worker gets the whole list,
comma-separated -- and ``paddle.distributed.ParallelEnv().device_id``, the device that
``init_parallel_env`` and NCCL use, is its first entry. (``ParallelEnv`` itself is no help
on a CPU build: it sets no device id there.) Choosing ``gpu:LOCAL_RANK`` instead trained
``--devices 3`` with one worker on gpu:0.
"""
from __future__ import annotations

import os
from typing import Mapping

SELECTED_GPUS = "FLAGS_selected_gpus"


def choose_device(want: str, has_gpu: bool, environ: Mapping[str, str], local_rank: int) -> str:
    """``"cpu"`` or ``"gpu:N"`` for ``launch.device`` = ``want`` (auto, cpu or gpu): the GPU
    Paddle's launcher selected, else (no launcher) the local rank's."""
    if want == "gpu" and not has_gpu:
        raise RuntimeError("launch.device is 'gpu' but this Paddle has no usable GPU "
                           "(install paddlerun[gpu] and check CUDA_VISIBLE_DEVICES), or set "
                           "launch.device: cpu")
    if want == "cpu" or not has_gpu:
        return "cpu"
    selected = environ.get(SELECTED_GPUS, "").split(",")[0].strip()
    if not selected:
        return f"gpu:{local_rank}"
    if not selected.isdigit():
        raise RuntimeError(f"{SELECTED_GPUS}={environ[SELECTED_GPUS]!r} (set by "
                           f"paddle.distributed.launch from --devices) is not a GPU index")
    return f"gpu:{int(selected)}"


def select_device(want: str, local_rank: int) -> str:
    """Make this worker's device Paddle's current one, and return it (``choose_device``)."""
    import paddle
    has_gpu = paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    device = choose_device(want, has_gpu, os.environ, local_rank)
    paddle.set_device(device)
    return device
