"""Where a ``paddlerun run`` stands inside a pod of ``paddlerun k8s render``'s Indexed Job.

The manifest gives every pod the same two variables, and Kubernetes adds a third:

- ``PADDLERUN_K8S_NNODES``: the number of pods (nodes) of the job;
- ``PADDLERUN_K8S_MASTER``: ``HOST:PORT`` of the rendezvous master, where HOST is pod 0's
  stable DNS name through the job's headless Service (``<job>-0.<service>``);
- ``JOB_COMPLETION_INDEX``: this pod's index, 0 .. N-1, set by the Job controller in
  every pod of an Indexed Job. It is the node rank.

Outside such a pod (``PADDLERUN_K8S_NNODES`` unset) nothing is looked up and nothing
changes. Paddle-free and quick: the CLI calls it before anything starts.
"""
from __future__ import annotations

import os
from typing import List, Mapping

from paddlerun.trainer.rundir.config import ConfigError

NNODES = "PADDLERUN_K8S_NNODES"
MASTER = "PADDLERUN_K8S_MASTER"
INDEX = "JOB_COMPLETION_INDEX"

#: What pod 0 hands Paddle's launcher as the master's host. Its launcher starts the
#: rendezvous server only when the master's host is literally 127.0.0.1 or the IP it
#: found for this machine -- never for a DNS name, even its own -- and then serves on
#: every interface, where the other pods reach it through the DNS name.
SELF = "127.0.0.1"


def launch_overrides(environ: Mapping[str, str] = os.environ) -> List[str]:
    """``--set`` style overrides of ``launch.nnodes``, ``node_rank`` and ``master`` for this
    pod, or ``[]`` outside a pod of a rendered job. Raises ConfigError (exit 2) naming the
    variable when the environment is only half there or malformed."""
    if NNODES not in environ:
        return []
    nnodes = _integer(environ, NNODES, minimum=1)
    if INDEX not in environ:
        raise ConfigError(f"{NNODES} is set but {INDEX} is not: the pod must belong to an "
                          f"Indexed Job (completionMode: Indexed), as `paddlerun k8s render` "
                          f"writes it")
    rank = _integer(environ, INDEX, minimum=0)
    if rank >= nnodes:
        raise ConfigError(f"{INDEX}={rank} but {NNODES}={nnodes}: the Job's completions must "
                          f"equal the number of nodes")
    overrides = [f"launch.nnodes={nnodes}", f"launch.node_rank={rank}"]
    if nnodes > 1:
        host, port = _master(environ)
        overrides.append(f"launch.master={SELF if rank == 0 else host}:{port}")
    return overrides


def _integer(environ: Mapping[str, str], key: str, minimum: int) -> int:
    text = environ[key].strip()
    if not text.isdigit() or int(text) < minimum:
        raise ConfigError(f"{key}={environ[key]!r}: expected an integer >= {minimum}")
    return int(text)


def _master(environ: Mapping[str, str]):
    value = environ.get(MASTER, "")
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{MASTER}={value!r}: expected HOST:PORT (pod 0's name through the "
                          f"job's headless Service, e.g. myjob-0.myjob:29500)")
    return host, int(port)
