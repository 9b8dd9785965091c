"""The supervisor's side of an elastic job (``launch.rendezvous: etcd://...``).

Each node's supervisor joins the job's membership in etcd (cluster/membership.py). Before
every attempt the nodes agree on a generation: the oldest ready node proposes it once at
least MIN nodes are ready and no member of the last generation is still running (a lost
one's key expires within ``node_ttl_s``), after ``elastic_wait_s`` for more at the job's
start, at once when MAX are there. While an attempt runs, the supervisor asks
:meth:`ElasticNode.lost` and :meth:`ElasticNode.joiners` every loop: both read the view
the membership thread keeps, so they never wait on etcd.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from paddlerun.cluster.etcd_client import Etcd, EtcdUnavailable
from paddlerun.cluster.membership import (Generation, Member, Membership, NodeState, View,
                                          ready_in_join_order)
from paddlerun.trainer.rundir.config import Config, etcd_endpoints

log = logging.getLogger("paddlerun.supervisor")

#: How often a node waiting for a generation looks, and says what it waits for.
FORM_POLL_S = 0.1
PROGRESS_EVERY_S = 15.0


#: How a member that is alive but left the generation (its attempt ended) is "lost".
LEFT_GENERATION = "left the generation"


class TooFewNodes(RuntimeError):
    """Fewer than MIN nodes were ready within the start timeout."""


@dataclass(frozen=True)
class LostNode:
    node_id: str
    how: str
    #: Seconds from the node's last lease refresh to now (by the hosts' clocks): when it
    #: died, the loss was seen at most this long after.
    latency_s: float


class ElasticNode:
    def __init__(self, config: Config, nproc_per_node: int, fence: Callable[[], int],
                 node_id: Optional[str] = None):
        """``node_id``: default ``<host>-<pid>``, unique per supervisor."""
        launch, sup = config.launch, config.supervisor
        self.low, self.high = launch.node_range
        self.elastic_wait_s = sup.elastic_wait_s
        self.scale_up_min_interval_s = sup.scale_up_min_interval_s
        self.ttl_s = max(2, int(round(sup.node_ttl_s)))
        endpoints = etcd_endpoints(launch.rendezvous)
        self.etcd = Etcd(endpoints)
        host = socket.gethostname()
        me = Member(node_id=node_id or f"{host}-{os.getpid()}", host=host,
                    addr=address_towards(endpoints[0]), nproc=nproc_per_node)
        self.membership = Membership(self.etcd, launch.job_id or config.job.name, me, self.ttl_s)
        #: The generation this node runs in (None before the first).
        self.generation: Optional[Generation] = None
        self.changed_at = time.monotonic()
        #: Nodes of this generation already told as lost.
        self._told: set = set()
        #: The checkpoints directory's fence: generation numbers always go above it.
        self._fence = fence

    @property
    def node_id(self) -> str:
        return self.membership.me.node_id

    @property
    def addr(self) -> str:
        return self.membership.me.addr

    def join(self, deadline: float, stop_asked: Callable[[], bool]) -> bool:
        """Join the job's membership, waiting for etcd until ``deadline``; False if stopped."""
        said = 0.0
        while True:
            try:
                self.membership.join()
                return True
            except EtcdUnavailable as e:
                if stop_asked():
                    return False
                if time.monotonic() >= deadline:
                    raise TooFewNodes(f"cannot join the job in etcd: {e}") from None
                if time.monotonic() - said >= PROGRESS_EVERY_S:
                    log.warning("%s; waiting for it", e)
                    said = time.monotonic()
                time.sleep(1.0)

    # ------------------------------------------------------------ forming

    def form(self, deadline: float, stop_asked: Callable[[], bool],
             on_lost: Callable[[LostNode], None] = lambda node: None) -> Optional[Generation]:
        """Wait until a generation newer than this node's last includes it; propose it when
        this node leads. None when a stop was asked first. Raises TooFewNodes at ``deadline``.
        ``on_lost``: told once of each node of the last generation seen gone meanwhile (the
        attempt may have failed through it before its key expired)."""
        seen = self.generation.number if self.generation else 0
        self.membership.set_state(NodeState.READY, seen)
        enough_since: Optional[float] = None
        said = time.monotonic()
        standby_said = 0
        while True:
            if stop_asked():
                return None
            for node in self.lost():
                if node.how != LEFT_GENERATION:
                    on_lost(node)
            now = time.monotonic()
            view = self.membership.view()
            if view is not None and now - view.at < 1.0:
                gen = view.generation
                if gen is not None and gen.number > seen:
                    if self.node_id in gen.members:
                        return self._adopt(gen)
                    if gen.number != standby_said:
                        log.info("generation %d runs on %d node(s) without this one (launch.nnodes "
                                 "max %d); this node waits to be taken in", gen.number,
                                 len(gen.members), self.high)
                        standby_said = gen.number
                ready = ready_in_join_order(view)
                enough = len(ready) >= self.low
                enough_since = (enough_since or now) if enough else None
                if enough and ready[0].node_id == self.node_id and \
                        self._should_propose(view, ready, now - enough_since):
                    self._propose(view, ready)
            if now >= deadline:
                present = len(view.members) if view else 0
                if view is None or now - view.at >= 1.0:
                    why = (f"etcd at {self.etcd.describe()} did not answer; check that it runs "
                           f"and that launch.rendezvous names it")
                else:
                    why = (f"{present} node(s) present, MIN is {self.low}; start the other nodes "
                           f"with the same launch.rendezvous and launch.job_id, or lower the MIN "
                           f"of launch.nnodes")
                raise TooFewNodes(f"no generation could be formed within the start timeout "
                                  f"(supervisor.start_timeout_s): {why}")
            if now - said >= PROGRESS_EVERY_S:
                log.info("waiting for nodes: %s", self._describe_wait(view))
                said = now
            time.sleep(FORM_POLL_S)

    def _should_propose(self, view: View, ready: List[Member], enough_for: float) -> bool:
        busy = [m for m in view.members.values() if m.state == NodeState.RUNNING]
        if busy:  # still in the last generation: it becomes ready, or its key expires
            return False
        if len(ready) >= self.high:
            return True
        # The job's start: no generation yet, or none of its nodes is left (a rerun).
        first = view.generation is None or not set(view.generation.members) & set(view.members)
        return enough_for >= (self.elastic_wait_s if first else 0.0)

    def _propose(self, view: View, ready: List[Member]) -> None:
        members = tuple(m.node_id for m in ready[:self.high])
        number = max(view.generation.number if view.generation else 0, self._fence(),
                     max(m.generation for m in view.members.values())) + 1
        gen = Generation(number, members, f"{self.addr}:{free_port(self.addr)}", time.time())
        try:
            if self.membership.propose(gen, view.generation_revision):
                log.info("proposed generation %d: %s", number, ", ".join(members))
        except EtcdUnavailable as e:
            log.warning("%s; the generation waits for it", e)

    def _adopt(self, gen: Generation) -> Generation:
        self.generation = gen
        self._told = set()
        self.changed_at = time.monotonic()
        self.membership.set_state(NodeState.RUNNING, gen.number)
        self.membership.publish_now()
        return gen

    def _describe_wait(self, view: Optional[View]) -> str:
        if view is None:
            return f"etcd at {self.etcd.describe()} has not answered yet"
        states = ", ".join(f"{m.node_id} {m.state}" for m in view.members.values())
        return f"{len(view.members)} present ({states}); MIN {self.low}, MAX {self.high}"

    # ------------------------------------------------------------ watching

    def lost(self) -> List[LostNode]:
        """Members of this generation that are gone (lease expired, or left) or have left it
        (ready for the next one: their workers are gone), each told once. Empty while etcd
        is away."""
        view = self.membership.view()
        if self.generation is None or view is None or time.monotonic() - view.at >= 1.0:
            return []  # no news is no loss
        lost = []
        for node_id in self.generation.members:
            if node_id == self.node_id or node_id in self._told:
                continue
            member = view.members.get(node_id)
            if member is not None:
                if member.state == NodeState.READY and member.generation >= self.generation.number:
                    lost.append(LostNode(node_id, LEFT_GENERATION, 0.0))
                continue
            last = self.membership.last_seen.get(node_id)
            if last is not None and last.state == NodeState.DONE:
                continue  # it finished training
            how = "left" if last is not None and last.state == NodeState.LEAVING else "lease expired"
            latency = time.time() - last.alive_at if last is not None else float("nan")
            lost.append(LostNode(node_id, how, round(latency, 2)))
        self._told.update(node.node_id for node in lost)
        return lost

    def joiners(self) -> List[str]:
        """Ready nodes outside this generation, when taking them in is due (below MAX, and
        ``scale_up_min_interval_s`` after the last change)."""
        view = self.membership.view()
        if self.generation is None or view is None or len(self.generation.members) >= self.high:
            return []
        if time.monotonic() - self.changed_at < self.scale_up_min_interval_s:
            return []
        return [m.node_id for m in ready_in_join_order(view) if m.node_id not in self.generation.members]

    def finish(self, succeeded: bool) -> None:
        if succeeded:
            self.membership.set_state(NodeState.DONE, self.generation.number if self.generation else 0)
            self.membership.publish_now()
        self.membership.leave(revoke=not succeeded)


def address_towards(endpoint: Tuple[str, int]) -> str:
    """This host's address on the route to ``endpoint`` (no packet is sent): where the
    other nodes, which reach the same etcd, can reach this one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((socket.gethostbyname(endpoint[0]), endpoint[1]))
            return s.getsockname()[0]
        except OSError:
            return socket.gethostbyname(socket.gethostname())


def free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]
