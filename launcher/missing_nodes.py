"""Which nodes of a fixed-size job have not joined: Paddle's HTTP rendezvous waits for them
with no timeout of its own, so without this a lost node makes the others wait forever.

Paddle's launcher logs ``Waiting peer start...`` before it registers its node with the
master and ``Run Pod`` once every node has (docs/paddle-behaviour.md#the-launcher). The
master is an HTTP key-value store in one launcher; each node's launcher puts its entry
under ``/JOB_ID/info/POD/NODE_RANK``, so a GET of that prefix names the nodes that joined.
"""
from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Set

WAITING = "Waiting peer start..."
POD_STARTED = "Run Pod"
#: The launcher prints its configuration first, ``job_id`` among it (``--job_id``, default "default").
_JOB_ID = re.compile(r"^LAUNCH INFO .* job_id: (\S+)$", re.MULTILINE)
MASTER_TIMEOUT_S = 2.0


def waiting_for_peers(launch_log: Path) -> bool:
    """Whether the attempt's launcher is still in its rendezvous (it has started no worker)."""
    return _still_waiting(_read(launch_log))


def _read(launch_log: Path) -> str:
    try:
        return launch_log.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _still_waiting(text: str) -> bool:
    waiting = text.rfind(WAITING)
    return waiting >= 0 and POD_STARTED not in text[waiting:]


def joined_nodes(master: str, job_id: str, timeout: float = MASTER_TIMEOUT_S) -> Optional[Set[int]]:
    """The node ranks registered with the master at ``HOST:PORT``; None if it does not answer."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a cluster address
    try:
        with opener.open(f"http://{master}/{job_id}/info", timeout=timeout) as response:
            entries = json.loads(response.read())
    except urllib.error.HTTPError as e:
        return set() if e.code == 404 else None  # 404: nothing under the prefix yet
    except (OSError, ValueError):
        return None
    return {int(key.rsplit("/", 1)[1]) for key in entries if key.rsplit("/", 1)[1].isdigit()}


@dataclass(frozen=True)
class MissingNodes:
    nodes: List[int]
    #: False: the master did not answer, so ``nodes`` is every node but this one.
    master_answered: bool


def missing_nodes(launch_log: Path, nnodes: int, node_rank: int, master: str) -> Optional[MissingNodes]:
    """The node ranks this node's launcher waits for; None if it is not waiting for any."""
    text = _read(launch_log)
    if not _still_waiting(text):
        return None
    found = _JOB_ID.search(text)
    joined = joined_nodes(master, found.group(1) if found else "default")
    present = (joined or set()) | {node_rank}  # this node is here, registered yet or not
    nodes = [rank for rank in range(nnodes) if rank not in present]
    return MissingNodes(nodes, joined is not None) if nodes else None
