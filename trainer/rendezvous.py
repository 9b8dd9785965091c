"""Wait until rank 0's TCP store listens before Paddle's own client connects to it.

Paddle's TCP store client (3.3.1, C++) sleeps 3 s before it retries a refused connect.
A rank that reaches ``init_parallel_env`` before rank 0 has its store listening --
about every other start on 2 CPUs, since the ranks import Paddle side by side -- so
waits 3 s: measured ``init_parallel_env`` 0.3-0.5 s or 3.2-3.3 s, and 3.0 s exactly
for rank 1 when rank 0 was held back by 0.5 s. Those 3 s were half the cold start and
of every restart. Probing the port every 20 ms first makes Paddle's first connect
succeed. A user's own script (``--script``) calls ``init_parallel_env`` itself and does
not get this.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Mapping, Optional, Tuple

log = logging.getLogger("paddlerun.worker")

POLL_S = 0.02


def master_endpoint(environ: Mapping[str, str] = os.environ) -> Optional[Tuple[str, int]]:
    """The store endpoint as ``paddle.distributed.init_parallel_env`` picks it: MASTER_ADDR and
    MASTER_PORT, else PADDLE_MASTER, else the first of PADDLE_TRAINER_ENDPOINTS."""
    if environ.get("MASTER_ADDR") and environ.get("MASTER_PORT"):
        endpoint = f"{environ['MASTER_ADDR']}:{environ['MASTER_PORT']}"
    else:
        endpoint = environ.get("PADDLE_MASTER") or environ.get("PADDLE_TRAINER_ENDPOINTS", "").split(",")[0]
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host, int(port)


def wait_for_master(timeout_s: float, environ: Mapping[str, str] = os.environ) -> bool:
    """On every rank but 0 (which serves the store), wait until the store accepts a TCP
    connection. False after ``timeout_s``: Paddle's own connect then reports the problem."""
    if environ.get("PADDLE_TRAINER_ID", "0") == "0":
        return True
    endpoint = master_endpoint(environ)
    if endpoint is None:
        return False
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(endpoint, timeout=1.0):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                log.warning("the rendezvous store %s:%d did not accept a connection within %g s",
                            *endpoint, timeout_s)
                return False
            time.sleep(POLL_S)
