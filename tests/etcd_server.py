"""A real etcd (Debian's ``etcd-server``) for the tests: one member on free ports, its data
in a temporary directory, stopped by its pid. ``kill()`` then ``start()`` again is an etcd
crash and restart with its data kept (same ports, same data directory).

etcd grants no lease shorter than about 2 s (1.5 x its election timeout, rounded up) and
looks for expired leases every 0.5 s, so a key of a 2 s lease is gone 2.0-2.5 s after its
last refresh (measured 2.43 s on etcd 3.4.23).
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import List, Optional, Sequence

from helpers import free_port


def etcd_missing() -> Optional[str]:
    return None if shutil.which("etcd") else "needs the etcd binary (apt install etcd-server)"


class EtcdServer:
    def __init__(self, data_dir: Path, hosts: Sequence[str] = ("127.0.0.1",)):
        self.data_dir = Path(data_dir)
        self.hosts = list(hosts)
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"

    @property
    def url(self) -> str:
        """The paddlerun ``launch.rendezvous`` of this etcd, on its first host."""
        return f"etcd://{self.hosts[0]}:{self.client_port}"

    def start(self, timeout: float = 30) -> "EtcdServer":
        clients = ",".join(f"http://{h}:{self.client_port}" for h in self.hosts)
        peer = f"http://127.0.0.1:{self.peer_port}"
        argv = ["etcd", "--name", "test", "--data-dir", str(self.data_dir),
                "--listen-client-urls", clients, "--advertise-client-urls", clients,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"test={peer}", "--log-level", "warn"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() >= deadline:
                self.stop()
                raise RuntimeError(f"etcd did not start: {self.log_tail()}")
            time.sleep(0.05)
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.hosts[0]}:{self.client_port}/health", timeout=1) as r:
                return b'"true"' in r.read()
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: a crash (its data directory stays)."""
        self.stop(signal.SIGKILL)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self.proc = None

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text()[-3000:]
        except OSError:
            return "(no log)"


def endpoints(server: EtcdServer) -> List[tuple]:
    return [(h, server.client_port) for h in server.hosts]
