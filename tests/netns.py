"""A second "host" for the tests: a network namespace joined to this one by a veth pair,
with addresses that exist only inside the test. Taking its end of the link down cuts it
off silently -- no process exits, nothing is closed: packets just stop.

Needs root and iproute2's ``ip``. Names and addresses are random per test, so parallel
runs do not meet; ``close()`` deletes the namespace, which deletes the veth pair too.
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
from typing import List, Optional


def netns_missing() -> Optional[str]:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "needs iproute2's ip"
    return None


class Netns:
    def __init__(self):
        tag = f"{random.randrange(16 ** 6):06x}"
        self.name = f"prt-{tag}"
        self.outer_if, self.inner_if = f"prv{tag}a", f"prv{tag}b"
        subnet = random.randrange(1, 250)
        self.outer_ip, self.inner_ip = f"10.213.{subnet}.1", f"10.213.{subnet}.2"

    def open(self) -> "Netns":
        for cmd in (["ip", "netns", "add", self.name],
                    ["ip", "link", "add", self.outer_if, "type", "veth", "peer", "name", self.inner_if],
                    ["ip", "link", "set", self.inner_if, "netns", self.name],
                    ["ip", "addr", "add", f"{self.outer_ip}/24", "dev", self.outer_if],
                    ["ip", "link", "set", self.outer_if, "up"],
                    self.inside(["ip", "addr", "add", f"{self.inner_ip}/24", "dev", self.inner_if]),
                    self.inside(["ip", "link", "set", self.inner_if, "up"]),
                    self.inside(["ip", "link", "set", "lo", "up"])):
            subprocess.run(cmd, check=True, capture_output=True, timeout=30)
        return self

    def inside(self, argv: List[str]) -> List[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def cut(self) -> None:
        """Take the namespace's end of the link down: it reaches nothing outside any more."""
        subprocess.run(self.inside(["ip", "link", "set", self.inner_if, "down"]), check=True,
                       capture_output=True, timeout=30)

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.outer_if], capture_output=True, timeout=30)
