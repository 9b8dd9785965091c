"""A ``train.dataset`` factory for tests: paddlerun's MNIST, recording the sample ids each rank reads.

Every ``__getitem__`` of the training split appends its index to
``RUN_DIR/samples/attempt-A-rank-R.txt`` (one line each, in the order the rank's loader
reads them: with ``train.num_workers=0`` that is batch order). A test splits a rank's
list into batches of ``global_batch_size / world_size`` to get the samples of every step.
"""
import os
import time
from pathlib import Path

from paddlerun.trainer.data import mnist
from paddlerun.trainer.rundir.env import WorkerEnv


#: Seconds each sample takes to read (``RECORDING_SAMPLE_DELAY_S``): slows the steps, so a
#: test has time to act between them, without changing what is trained.
DELAY_S = float(os.environ.get("RECORDING_SAMPLE_DELAY_S", "0") or 0)


class Recording:
    def __init__(self, base, path: Path):
        self.base, self.path = base, path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        os.write(self._fd, f"{int(index)}\n".encode())
        if DELAY_S:
            time.sleep(DELAY_S)
        return self.base[index]


def build(split, **kwargs):
    base = mnist(split, **kwargs)
    if split != "train" or base is None:
        return base
    env = WorkerEnv.from_environ()
    return Recording(base, env.run_dir / "samples" / f"attempt-{env.attempt}-rank-{env.rank}.txt")
