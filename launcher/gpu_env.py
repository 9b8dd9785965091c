"""The environment a GPU job's workers start with: determinism flags and the collective timeout.

Supervisor only (paddle-free). Set only when the workers will run on GPUs (a CPU build of
Paddle does not define the GPU flags), and only where the user has not set them: a user
who trades bit-exact resume for speed can export ``FLAGS_cudnn_deterministic=0``.

docs/install.md ("GPUs: determinism and dead peers") says what each one does and what
Paddle does not do with the timeout.
"""
from __future__ import annotations

from typing import Dict, Mapping

from paddlerun.trainer.rundir.config import Config

#: Bit-exact resume on GPUs needs kernels that give the same bits every run: cuDNN picks
#: deterministic algorithms (no autotuning, no atomics-based backward), embedding gradients
#: are summed in a fixed order, and cuBLAS gets a fixed workspace (its split-K reductions
#: otherwise depend on the workspace available).
DETERMINISM = {
    "FLAGS_cudnn_deterministic": "1",
    "FLAGS_cudnn_exhaustive_search": "0",
    "FLAGS_embedding_deterministic": "1",
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
}
#: Paddle's NCCL process-group timeout, in milliseconds (default 30 minutes).
PG_TIMEOUT = "PADDLE_PG_TIMEOUT"


def gpu_worker_env(config: Config, base: Mapping[str, str]) -> Dict[str, str]:
    """The variables to add to the launch environment of a GPU job; ``base``'s own values
    win (the launch scrubs PADDLE_* from it, so the user's timeout is handed back here).
    The process-group timeout is the supervisor's hang timeout: no collective should wait
    longer than the supervisor would before it restarts the job anyway."""
    env = {k: v for k, v in DETERMINISM.items() if k not in base}
    env[PG_TIMEOUT] = base.get(PG_TIMEOUT, str(int(config.supervisor.hang_timeout_s * 1000)))
    return env
