"""A node's membership of an elastic job in etcd, and the generations the nodes agree on.

Keys under ``/paddlerun/<job_id>/``:

- ``nodes/<node_id>``: one per node's supervisor, bound to its lease (``node_ttl_s``). A
  node that stops refreshing it -- killed, host gone, network cut -- is gone from etcd
  ``node_ttl_s`` later, which is how the others see the loss.
- ``generation``: the membership the nodes run with: its number, the member nodes in
  node-rank order and the master address. Written only by compare-and-put on its last
  revision, so two proposals can never both win.

A thread refreshes the lease and keeps a :class:`View` of the job's keys fresh (every
``poll_s``): the supervisor's loop reads the view and never waits on etcd, so training
goes on while etcd is away. Decisions that need etcd (a new generation) wait for it.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional, Tuple

from paddlerun.cluster.etcd_client import Etcd, EtcdUnavailable

log = logging.getLogger("paddlerun.membership")

#: How often the view of the job's keys is refreshed: a lost node is seen within
#: ``node_ttl_s`` + etcd's expiry check (about 0.5 s) + this.
POLL_S = 0.25


class NodeState:
    READY = "ready"      # waiting for the next generation
    RUNNING = "running"  # training in generation ``generation``
    DONE = "done"        # training finished: its key going away is no loss
    LEAVING = "leaving"  # stopping (preempted, gave up): its key is about to go


@dataclass(frozen=True)
class Member:
    node_id: str
    host: str
    #: Where the other nodes reach this one (the master address when it leads).
    addr: str
    nproc: int
    state: str = NodeState.READY
    #: The generation it runs (running), or the newest it has seen (ready).
    generation: int = 0
    #: Wall-clock time of its last lease refresh.
    alive_at: float = 0.0
    #: etcd's revision when its key was created: orders nodes by when they joined.
    joined: int = 0


@dataclass(frozen=True)
class Generation:
    number: int
    #: Node ids in node-rank order; the first one's address is the master.
    members: Tuple[str, ...]
    master: str
    formed_at: float

    def node_rank(self, node_id: str) -> int:
        return self.members.index(node_id)


@dataclass(frozen=True)
class View:
    """The job's keys as one poll saw them."""
    members: Dict[str, Member]
    generation: Optional[Generation]
    #: The generation key's mod revision (0: none yet), for compare-and-put.
    generation_revision: int
    #: time.monotonic() of the poll.
    at: float


class Membership:
    def __init__(self, etcd: Etcd, job_id: str, me: Member, ttl_s: int, poll_s: float = POLL_S):
        self.etcd = etcd
        self.prefix = f"/paddlerun/{job_id}/"
        self.me = me
        self.ttl_s = ttl_s
        self.poll_s = poll_s
        self._lease: Optional[int] = None
        self._view: Optional[View] = None
        self._dirty = True
        self._refreshed = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        #: The last record seen of every node (kept after its key is gone: why it went).
        self.last_seen: Dict[str, Member] = {}
        #: time.monotonic() since when etcd has not answered (None: it answers).
        self.unreachable_since: Optional[float] = None

    @property
    def node_key(self) -> str:
        return f"{self.prefix}nodes/{self.me.node_id}"

    @property
    def generation_key(self) -> str:
        return f"{self.prefix}generation"

    def join(self) -> None:
        """Hold a lease-backed key and start the thread. Raises EtcdUnavailable."""
        self._register()
        self._poll()
        self._thread = threading.Thread(target=self._run, name="paddlerun-membership", daemon=True)
        self._thread.start()

    def set_state(self, state: str, generation: int) -> None:
        """Published by the thread within ``poll_s`` (or when etcd is back)."""
        with self._lock:
            self.me = replace(self.me, state=state, generation=generation)
            self._dirty = True

    def publish_now(self) -> None:
        """Publish this node's state before returning (best effort: etcd may be away)."""
        try:
            self._put_me()
        except EtcdUnavailable as e:
            log.warning("%s", e)

    def view(self) -> Optional[View]:
        return self._view

    def propose(self, generation: Generation, expected_revision: int) -> bool:
        """Make ``generation`` the job's, unless another was written since ``expected_revision``."""
        return self.etcd.put_if_unchanged(self.generation_key, asdict(generation), expected_revision)

    def leave(self, revoke: bool) -> None:
        """Stop refreshing. ``revoke``: remove the key now (the others see this node leave at
        once); else it expires after ``ttl_s`` (a node that finished: the others finish too)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if revoke and self._lease is not None:
            try:
                self.set_state(NodeState.LEAVING, self.me.generation)
                self._put_me()
                time.sleep(2 * self.poll_s)  # let the others' views see why it goes
                self.etcd.revoke(self._lease)
            except EtcdUnavailable as e:
                log.warning("could not leave the job's membership in etcd (%s); the key "
                            "expires in %d s", e, self.ttl_s)

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                if self._dirty or time.monotonic() - self._refreshed >= self.ttl_s / 3:
                    self._keep_alive()
                self._poll()
            except EtcdUnavailable as e:
                if self.unreachable_since is None:
                    self.unreachable_since = time.monotonic()
                    log.warning("%s; training goes on, a change of nodes waits for it", e)
                continue
            if self.unreachable_since is not None:
                log.warning("etcd answers again after %.1f s", time.monotonic() - self.unreachable_since)
                self.unreachable_since = None

    def _keep_alive(self) -> None:
        if self._lease is None or not self.etcd.refresh(self._lease):
            if self._lease is not None:
                log.warning("this node's membership lease expired (etcd was away longer than "
                            "%d s); joining again", self.ttl_s)
            self._register()
            return
        self._put_me()

    def _register(self) -> None:
        self._lease = self.etcd.grant(self.ttl_s)
        self._put_me()

    def _put_me(self) -> None:
        with self._lock:
            self.me = replace(self.me, alive_at=time.time())
            value = asdict(self.me)
            self._dirty = False
        del value["joined"]
        self.etcd.put(self.node_key, value, lease_id=self._lease)
        self._refreshed = time.monotonic()

    def _poll(self) -> None:
        nodes = self.etcd.get_prefix(f"{self.prefix}nodes/")
        generation = self.etcd.get(self.generation_key)
        members = {}
        for entry in nodes:
            try:
                member = Member(**entry.value, joined=entry.create_revision)
            except TypeError:
                continue  # not a member record
            members[member.node_id] = member
        current = None
        if generation is not None:
            value = dict(generation.value, members=tuple(generation.value.get("members", ())))
            current = Generation(**value)
        self.last_seen.update(members)
        self._view = View(members, current, generation.mod_revision if generation else 0,
                          time.monotonic())


def ready_in_join_order(view: View) -> List[Member]:
    return sorted((m for m in view.members.values() if m.state == NodeState.READY),
                  key=lambda m: m.joined)
