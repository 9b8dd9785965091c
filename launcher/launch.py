"""The ``python -m paddle.distributed.launch`` command line and environment of one attempt.

Paddle's launcher lets environment variables override its flags
(docs/paddle-behaviour.md#the-launcher): an inherited ``PADDLE_TRAINER_ID`` or
``PADDLE_MASTER`` silently changes the job. So
the environment handed to it is scrubbed of every ``PADDLE_*`` and ``POD_*``
variable, then given paddlerun's own ``PADDLERUN_*`` ones (see ``trainer/rundir/env.py``).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from paddlerun.launcher import gpu_env
from paddlerun.trainer.rundir import env as worker_env
from paddlerun.trainer.rundir.config import Config
from paddlerun.trainer.rundir.process_identity import ProcessIdentity

CPU_WORKERS_DEFAULT = 2
_SCRUBBED_PREFIXES = ("PADDLE_", "POD_", "PADDLERUN_")
# Kept: the log level, and the test-only fault injection points (PADDLERUN_TEST_*).
_KEPT = ("PADDLERUN_LOG_LEVEL", "PADDLERUN_TEST_")


@dataclass(frozen=True)
class LaunchSpec:
    """Everything that differs between attempts is an argument of :meth:`argv` / :meth:`env`."""
    config: Config
    run_dir: Path
    #: A user's own script (script mode) instead of paddlerun's worker.
    script: Optional[Path] = None
    script_args: Sequence[str] = ()
    #: This node's address for the other nodes (``--host``); elastic jobs, where the
    #: address etcd is reached from is the one the other nodes can reach.
    host: Optional[str] = None

    @property
    def nproc_per_node(self) -> int:
        return resolve_nproc(self.config.launch.nproc_per_node, self.config.launch.device)

    @property
    def node_dir(self) -> Path:
        """Where this node keeps the files that are its own (logs, supervisor record, its
        summary): the run directory on node 0, ``RUN_DIR/nodes/node-K`` on node K, so that
        the nodes of a job can share one run directory (docs/slurm.md)."""
        rank = self.config.launch.node_rank
        if rank == 0 or self.config.launch.rendezvous is not None:  # elastic: a run dir per node
            return self.run_dir
        return self.run_dir / "nodes" / f"node-{rank}"

    @property
    def local_ranks(self) -> range:
        """The global ranks of this node's workers (Paddle numbers them node by node)."""
        first = self.config.launch.node_rank * self.nproc_per_node
        return range(first, first + self.nproc_per_node)

    def log_dir(self, attempt: int) -> Path:
        return self.node_dir / "logs" / f"attempt-{attempt}"

    def argv(self, attempt: int) -> List[str]:
        launch = self.config.launch
        argv = [launch.python or sys.executable, "-m", "paddle.distributed.launch",
                "--nproc_per_node", str(self.nproc_per_node),
                "--log_dir", str(self.log_dir(attempt))]
        if launch.nnodes > 1:
            argv += ["--nnodes", str(launch.nnodes), "--master", launch.master,
                     "--rank", str(launch.node_rank)]
            if self.host is not None:
                argv += ["--host", self.host]
        argv += list(launch.extra_args)
        if self.script is not None:
            argv += [str(self.script), *self.script_args]
        else:
            argv += [str(worker_script()), "--config", str(self.run_dir / "config.yaml"),
                     "--run-dir", str(self.run_dir)]
        return argv

    def env(self, attempt: int, restarts: int, base: Mapping[str, str] = os.environ,
            tty: bool = False, supervisor: Optional[ProcessIdentity] = None,
            generation: Optional[int] = None) -> Dict[str, str]:
        """``supervisor``: the process the workers watch; they stop when it is gone.
        ``generation``: elastic jobs: the workers' commits are fenced by it."""
        env = scrub(base)
        checkpoint_dir = self.config.checkpoint.dir or str(self.run_dir / "checkpoints")
        env.update({
            worker_env.RUN_DIR: str(self.run_dir),
            worker_env.CHECKPOINT_DIR: str(checkpoint_dir),
            worker_env.CONFIG: str(self.run_dir / "config.yaml"),
            worker_env.ATTEMPT: str(attempt),
            worker_env.RESTARTS: str(restarts),
            worker_env.HEARTBEAT_INTERVAL: str(self.config.supervisor.heartbeat_interval_s),
            worker_env.TTY: "1" if tty else "0",
            "PYTHONUNBUFFERED": "1",
        })
        if supervisor is not None:
            env[worker_env.SUPERVISOR] = str(supervisor)
        if generation is not None:
            env[worker_env.GENERATION] = str(generation)
        if self.host is not None and "GLOO_SOCKET_IFNAME" not in base:
            # gloo's default is the address the host name resolves to, often 127.0.x.1: the
            # other nodes could not connect. The interface of this node's own address can.
            interface = interface_of(self.host)
            if interface is not None:
                env["GLOO_SOCKET_IFNAME"] = interface
        if self.uses_gpus:
            env.update(gpu_env.gpu_worker_env(self.config, base))
        return env

    @property
    def uses_gpus(self) -> bool:
        """Whether the workers will run on GPUs (``launch.device`` allows it and this node has
        some), found without importing paddle."""
        return self.config.launch.device != "cpu" and visible_gpus() > 0


def scrub(base: Mapping[str, str]) -> Dict[str, str]:
    """``base`` without the variables that would silently override the launch's flags."""
    return {k: v for k, v in base.items()
            if k.startswith(_KEPT) or not k.startswith(_SCRUBBED_PREFIXES)}


def worker_script() -> Path:
    """``trainer/worker.py`` of the installed package: located, not imported (it imports paddle)."""
    return Path(importlib.util.find_spec("paddlerun.trainer.worker").origin).resolve()


def resolve_nproc(nproc, device: str) -> int:
    if nproc != "auto":
        return int(nproc)
    gpus = 0 if device == "cpu" else visible_gpus()
    return gpus or CPU_WORKERS_DEFAULT


def visible_gpus() -> int:
    """GPUs this node may use, without importing paddle: CUDA_VISIBLE_DEVICES, else nvidia-smi."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def interface_of(address: str) -> Optional[str]:
    """The network interface that holds ``address`` on this host, if one does."""
    import psutil
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == address for a in addrs):
            return name
    return None
