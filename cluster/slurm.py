"""Where a ``paddlerun run`` stands inside a Slurm job, from the ``SLURM_*`` variables.

``srun`` starts one task per node; each task's environment says which job it is in
(``SLURM_JOB_ID``), which node of the step it is on (``SLURM_NODEID``), how many nodes
the step has (``SLURM_STEP_NUM_NODES``) and which nodes the job holds
(``SLURM_JOB_NODELIST``, compressed: ``n[1-2]``). ``SLURM_RESTART_COUNT`` is unset on a
job's first start and 1, 2, ... after each requeue. Outside a step (an ``salloc`` or batch
shell) a command runs on one node, so only a step spreads a run over several nodes.

The rendezvous master is the first node of the job list, at its address as Slurm knows it
(``scontrol show node``'s ``NodeAddr``: the host name on most clusters, an IP where the
node names do not resolve), on a port derived from the job id and restart count: every
node computes the same one without talking to the others, and a requeued job does not
bind the port its last start may still hold in TIME_WAIT.

Paddle-free and quick: the supervisor imports it before anything starts.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import List, Mapping, Optional

#: Master ports are drawn from [PORT_BASE, PORT_BASE + PORT_SPAN): below Linux's default
#: ephemeral range (32768-60999), so a connection's local port never takes it.
PORT_BASE = 20000
PORT_SPAN = 10000
SCONTROL_TIMEOUT_S = 30


class SlurmError(RuntimeError):
    """A Slurm command failed or the environment is not one Slurm sets; the message says which."""


@dataclass(frozen=True)
class SlurmPlace:
    """This task's place in its Slurm job."""
    job_id: int
    #: 0 on the first start, n after the n-th requeue (SLURM_RESTART_COUNT).
    restart_count: int
    node_rank: int
    nnodes: int
    nodelist: str

    @property
    def master_port(self) -> int:
        return PORT_BASE + (self.job_id * 31 + self.restart_count) % PORT_SPAN


def place_from_environ(environ: Mapping[str, str] = os.environ) -> Optional[SlurmPlace]:
    """The place of this process, or None outside a Slurm job."""
    job_id = environ.get("SLURM_JOB_ID")
    if not job_id:
        return None
    try:
        in_step = "SLURM_STEP_NUM_NODES" in environ and "SLURM_NODEID" in environ
        return SlurmPlace(
            job_id=int(job_id),
            restart_count=int(environ.get("SLURM_RESTART_COUNT") or 0),
            node_rank=int(environ["SLURM_NODEID"]) if in_step else 0,
            nnodes=int(environ["SLURM_STEP_NUM_NODES"]) if in_step else 1,
            nodelist=environ.get("SLURM_STEP_NODELIST" if in_step else "SLURM_JOB_NODELIST",
                                 environ.get("SLURM_JOB_NODELIST", "")),
        )
    except ValueError as e:
        raise SlurmError(f"a SLURM_* variable is not a number ({e}); is this a Slurm job?") from None


def hostnames(nodelist: str) -> List[str]:
    """``n[1-2]`` -> ``['n1', 'n2']``, as Slurm expands it (``scontrol show hostnames``)."""
    return scontrol("show", "hostnames", nodelist).split()


def node_address(node: str) -> str:
    """The address Slurm reaches ``node`` at (``NodeAddr``), else its name."""
    for item in scontrol("show", "node", "-o", node).split():
        key, _, value = item.partition("=")
        if key == "NodeAddr" and value:
            return value
    return node


def master_address(place: SlurmPlace) -> str:
    """``host:port`` of the rendezvous master: the first node of the step."""
    nodes = hostnames(place.nodelist)
    if not nodes:
        raise SlurmError(f"SLURM node list {place.nodelist!r} names no node")
    return f"{node_address(nodes[0])}:{place.master_port}"


def scontrol(*args: str) -> str:
    try:
        proc = subprocess.run(["scontrol", *args], capture_output=True, text=True,
                              timeout=SCONTROL_TIMEOUT_S)
    except FileNotFoundError:
        raise SlurmError("scontrol is not on PATH: run paddlerun on a node with Slurm's "
                         "client commands") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"scontrol {' '.join(args)} did not answer in {SCONTROL_TIMEOUT_S} s "
                         f"(is slurmctld up?)") from None
    if proc.returncode != 0:
        raise SlurmError(f"scontrol {' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout
