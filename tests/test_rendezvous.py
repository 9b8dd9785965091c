"""Waiting for rank 0's store to listen, before Paddle's client connects (and would sleep 3 s)."""
import socket
import threading
import time

import pytest

from helpers import free_port
from paddlerun.trainer.rendezvous import master_endpoint, wait_for_master


@pytest.mark.parametrize("environ, expected", [
    ({"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "6170", "PADDLE_MASTER": "h:1"}, ("10.0.0.1", 6170)),
    ({"PADDLE_MASTER": "127.0.0.1:51317", "PADDLE_TRAINER_ENDPOINTS": "127.0.0.1:9"}, ("127.0.0.1", 51317)),
    ({"PADDLE_TRAINER_ENDPOINTS": "node-a:6170,node-b:6170"}, ("node-a", 6170)),
    ({}, None),
    ({"PADDLE_MASTER": "no-port"}, None),
])
def test_the_endpoint_is_the_one_paddle_connects_to(environ, expected):
    assert master_endpoint(environ) == expected


def test_waits_until_the_port_listens():
    port = free_port()
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def listen_later():
        time.sleep(0.3)
        server.bind(("127.0.0.1", port))
        server.listen()

    thread = threading.Thread(target=listen_later)
    thread.start()
    started = time.monotonic()
    try:
        assert wait_for_master(10, {"PADDLE_TRAINER_ID": "1", "PADDLE_MASTER": f"127.0.0.1:{port}"})
        waited = time.monotonic() - started
    finally:
        thread.join(timeout=5)
        server.close()
    assert 0.25 <= waited < 5


def test_gives_up_after_the_timeout_and_rank_0_never_waits():
    port = free_port()  # nothing listens there
    started = time.monotonic()
    assert not wait_for_master(0.2, {"PADDLE_TRAINER_ID": "1", "PADDLE_MASTER": f"127.0.0.1:{port}"})
    assert time.monotonic() - started < 3
    assert wait_for_master(0.2, {"PADDLE_TRAINER_ID": "0", "PADDLE_MASTER": f"127.0.0.1:{port}"})
