"""The supervisor: one per node; starts the launch tree, watches it, restarts it.

Its whole policy is here, as a state machine whose transitions are all in
:data:`TRANSITIONS` and all recorded in ``RUN_DIR/events.jsonl``. Process handling
is in :mod:`process_tree`, restart policy in :mod:`restart_policy`, root causes in
:mod:`root_cause`. Never imports paddle.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Callable, Dict, List, Optional

from filelock import FileLock, Timeout

from paddlerun.launcher import early_signals, exit_codes, root_cause
from paddlerun.launcher.console_log import LaunchLogForwarder, unshown_lines
from paddlerun.launcher.elastic import LEFT_GENERATION, ElasticNode, TooFewNodes
from paddlerun.launcher.exit_watch import ExitWatch
from paddlerun.launcher.launch import LaunchSpec
from paddlerun.launcher.leftovers import find_leftovers, stop_leftovers
from paddlerun.launcher.missing_nodes import missing_nodes
from paddlerun.launcher.process_tree import ProcessTree, become_subreaper
from paddlerun.launcher.restart_policy import Failure, FailureKind, RestartPolicy
from paddlerun.launcher.scheduler import NoScheduler, StopNotice
from paddlerun.launcher.spot_watch import SpotWatch, resolve_provider
from paddlerun.trainer.rundir import control
from paddlerun.trainer.checkpoint import CheckpointStore
from paddlerun.trainer.rundir.config import dump_config
from paddlerun.trainer.rundir.events import EventLog, read_events
from paddlerun.trainer.rundir.heartbeat import clear_heartbeats, heartbeat_path, read_heartbeats, stale_ranks
from paddlerun.trainer.rundir.metrics import write_json_atomic
from paddlerun.trainer.rundir.process_identity import ProcessIdentity

log = logging.getLogger("paddlerun.supervisor")


class State(str, Enum):
    """The supervisor's states, and what it does in each.

    STARTING   start the launch process tree of the next attempt
    RUNNING    watch it: launch exit, dead workers, stale heartbeats, signals
    FAILED     tear the whole tree down, find the root cause, ask the restart policy
    RESTARTING wait the backoff, then start again (the workers resume from the newest snapshot)
    SUCCEEDED  training finished: exit 0
    GAVE_UP    not retriable, or the restart budget is spent: report the root cause, exit 1
    PREEMPTED  a signal asked to stop: snapshot, stop everything, exit with the requeue code
    """
    STARTING = "starting"
    RUNNING = "running"
    FAILED = "failed"
    RESTARTING = "restarting"
    SUCCEEDED = "succeeded"
    GAVE_UP = "gave_up"
    PREEMPTED = "preempted"


TRANSITIONS = {
    # STARTING -> GAVE_UP: earlier starts of the same scheduler job spent the budget.
    # STARTING -> PREEMPTED: stopped while waiting for a generation (elastic).
    State.STARTING: {State.RUNNING, State.FAILED, State.GAVE_UP, State.PREEMPTED},
    # RUNNING -> RESTARTING: the nodes change (elastic): no failure, a new generation.
    State.RUNNING: {State.SUCCEEDED, State.FAILED, State.PREEMPTED, State.RESTARTING},
    State.FAILED: {State.RESTARTING, State.GAVE_UP, State.PREEMPTED},
    State.RESTARTING: {State.STARTING, State.PREEMPTED},
}
TERMINAL = {State.SUCCEEDED, State.GAVE_UP, State.PREEMPTED}

#: How often the supervisor checks heartbeats, hangs and the console while nothing exits.
#: Exits and signals wake it at once (launcher/exit_watch.py), but only for workers it
#: has seen a heartbeat of: until every local rank has sent one it looks every POLL_S.
#: (With only CHECK_S, at 1 s, a worker killed just after its first heartbeat was found
#: late, already reaped by the launcher, its exit signal lost to the failure report: 1 of
#: 3 runs of test_script_mode's kill test.)
CHECK_S = 0.5
#: How often it looks when it cannot be woken by an exit (no pidfds), and while it waits
#: for a dying worker's error file or for workers to exit.
POLL_S = 0.1
#: How often the whole process table is scanned for the tree's orphans (to reap them).
#: Dead workers are found from their heartbeat pids (at once, or every POLL_S), not from this scan,
#: which costs ~30 us per process on the machine (measured): every tick would take ~2 %
#: of a core from training on a small host and far more on a busy one. At 1 s the scan
#: was still 70 % of the supervisor's CPU (py-spy). Teardown scans again in any case,
#: so all a longer period delays is reaping a zombie orphan.
TREE_SCAN_S = 30.0
#: SIGTERM -> SIGKILL grace when tearing a failed attempt down.
TEARDOWN_TERM_S = 5.0
#: The same, when preempted with nothing to save: a worker ignores SIGTERM until its next
#: agreement point, which a rendezvous or a restore may be far from.
NOTHING_TO_SAVE_TERM_S = 0.5
#: After a worker died: how long paddle's launcher gets to stop the others itself (it
#: SIGTERMs them ~1 s after the death and SIGKILLs 3 s later; docs/paddle-behaviour.md#the-launcher).
LAUNCH_EXIT_GRACE_S = 6.0


class RunDirBusy(RuntimeError):
    """Another supervisor owns this run directory."""


class Supervisor:
    def __init__(self, spec: LaunchSpec, stream=None, scheduler=None):
        self.spec = spec
        self.scheduler = scheduler or NoScheduler()
        self.node_dir = spec.node_dir
        self.multi_node = spec.config.launch.node_range[1] > 1 and spec.config.launch.rendezvous is None
        self.config = spec.config
        self.run_dir = spec.run_dir
        self.stream = stream or sys.stdout
        self.state = State.STARTING
        self.policy = RestartPolicy(self.config.supervisor)
        self.failures: List[Failure] = []
        self.attempt = 0
        self.first_attempt = 0
        self.tree: Optional[ProcessTree] = None
        self.exits = ExitWatch(POLL_S)
        self.attempt_started = 0.0
        self.signals: List[int] = []
        #: Why the run is stopping (a signal to this process or the scheduler's notice).
        self.stop: Optional[StopNotice] = None
        self.events: Optional[EventLog] = None
        self.console = LaunchLogForwarder(self.stream)
        self._dead: Dict[int, tuple] = {}
        self._pending: Optional[Failure] = None
        self._lock: Optional[FileLock] = None
        self._backoff_until = 0.0
        self.host = socket.gethostname()
        self.spot: Optional[SpotWatch] = None
        self._spot_stop_at: Optional[float] = None
        #: With launch.rendezvous: this node's membership and its generation (launcher/elastic.py).
        self.elastic: Optional[ElasticNode] = None
        self._scale_up_asked = False

    # ------------------------------------------------------------ main loop

    def run(self) -> int:
        # First: from here on a preemption signal is a clean exit 75, also while the run
        # directory is prepared and leftovers are stopped (which may take seconds).
        previous = self._install_signal_handlers()
        self.signals[:0] = early_signals.take()
        try:
            self._prepare()
        except RunDirBusy as e:
            self._restore_signal_handlers(previous)
            print(f"paddlerun: {e}", file=sys.stderr)
            return exit_codes.BAD_CONFIG
        self._stop_leftovers()
        become_subreaper()
        self.exits.wake_on_signals()
        if self.config.launch.rendezvous is not None:
            self.elastic = ElasticNode(self.config, self.spec.nproc_per_node, self._checkpoints().fence)
        provider = resolve_provider(self.config.supervisor)
        if provider is not None:
            self.spot = SpotWatch(provider, self.config.supervisor).start()
        handlers: Dict[State, Callable[[], State]] = {
            State.STARTING: self._start, State.RUNNING: self._watch,
            State.FAILED: self._fail, State.RESTARTING: self._restart,
        }
        if len(self.failures) > self.config.supervisor.max_restarts:
            self._transition(State.GAVE_UP)
            reason = (f"restart budget spent by earlier starts of this job: {len(self.failures)} "
                      f"failures, supervisor.max_restarts={self.config.supervisor.max_restarts}")
            self._emit("gave_up", reason=reason, root_cause=self.failures[-1].cause)
            print(f"paddlerun: giving up: {reason}", file=sys.stderr)
        try:
            while self.state not in TERMINAL:
                self._transition(handlers[self.state]())
        finally:
            if self.elastic is not None:
                self.elastic.finish(succeeded=self.state is State.SUCCEEDED)
            if self.spot is not None:
                self.spot.close()
            self.exits.close()
            if self.tree is not None:
                self.tree.close(TEARDOWN_TERM_S)
            self._restore_signal_handlers(previous)
            self._write_summary()
            self.scheduler.before_exit(self.run_dir, self.state is State.PREEMPTED)
            self._lock.release()
        return self._exit_code()

    def _transition(self, new: State) -> None:
        if new not in TRANSITIONS[self.state]:
            raise RuntimeError(f"supervisor bug: no transition {self.state.value} -> {new.value}")
        self.state = new

    def _emit(self, event: str, **details) -> None:
        if self.multi_node:
            details["node"] = self.config.launch.node_rank
        self.events.emit(event, self.attempt, state=self.state.value,
                         **self.scheduler.event_fields(), **details)

    def _stop_asked(self) -> bool:
        """A signal or the scheduler's notice asked this run to stop (remembered in self.stop)."""
        if self.stop is None:
            if self.signals:
                name = signal.Signals(self.signals[0]).name
                self.stop = StopNotice(self.scheduler.cause_of(name), name)
            else:
                self.stop = self.scheduler.notice()
            if self.stop is None and self._notice_due():
                self.stop = StopNotice("preemption_notice", None,
                                       f"{self.spot.notice.provider} preemption notice")
        return self.stop is not None

    # ------------------------------------------------------------ states

    def _prepare(self) -> None:
        self.node_dir.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.node_dir / ".supervisor.lock"))
        owner_file = self.node_dir / "supervisor.json"
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            owner = owner_file.read_text() if owner_file.is_file() else "unknown"
            raise RunDirBusy(f"run directory {self.run_dir} is in use by another supervisor "
                             f"({owner.strip()}); stop it or pick another --run-dir") from None
        write_json_atomic(owner_file, {"host": socket.gethostname(), "pid": os.getpid(),
                                       "start_ticks": ProcessIdentity.me().start_ticks,
                                       "started": time.time()})
        dump_config(self.config, self.run_dir / "config.yaml")
        self.events = EventLog(self.run_dir / "events.jsonl")
        self.attempt = self.first_attempt = next_attempt_number(self.node_dir)
        self.failures = self.scheduler.earlier_failures(read_events(self.run_dir / "events.jsonl"))
        control.clear(self.run_dir)

    def _stop_leftovers(self) -> None:
        """Stop what an earlier supervisor of this run directory left running (it was killed)."""
        left = find_leftovers(self.run_dir)
        if not left:
            return
        pids = ", ".join(str(i.pid) for i in left)
        print(f"paddlerun: {len(left)} process(es) of an earlier supervisor of {self.run_dir} "
              f"still run (pids {pids}; that supervisor is gone): stopping them first",
              file=sys.stderr)
        killed = stop_leftovers(left, TEARDOWN_TERM_S)
        self._emit("leftovers_stopped", pids=[i.pid for i in left],
                   sigkilled=[i.pid for i in killed])

    def _start(self) -> State:
        if self._stop_asked():
            return self._stopped_waiting("stopped before the attempt started")
        if self.elastic is not None:
            formed = self._next_generation()
            if formed is not State.STARTING:
                return formed
        self._clear_local_heartbeats()
        control.clear(self.run_dir)
        log_dir = self.spec.log_dir(self.attempt)
        log_dir.mkdir(parents=True, exist_ok=True)
        launch_log = open(log_dir / "launch.log", "ab")
        self.console.follow(log_dir / "launch.log", launch_log.tell())
        argv = self.spec.argv(self.attempt)
        env = self.spec.env(self.attempt, restarts=len(self.failures),
                            tty=self.stream.isatty() if hasattr(self.stream, "isatty") else False,
                            supervisor=ProcessIdentity.me(),
                            generation=self.elastic.generation.number if self.elastic else None)
        # If this process is SIGKILLed, the kernel kills the launch process: a launcher with
        # no worker yet (waiting in the rendezvous for another node) would wait forever.
        # SIGKILL, not SIGTERM: Paddle's launcher would pass a SIGTERM on to the workers, as
        # a preemption nobody supervises, and a launcher held with SIGSTOP (launch_held)
        # would keep a SIGTERM pending forever. Its workers stop at their next heartbeat,
        # as they do when the launcher alone is killed. (This loop runs in the main thread,
        # as ProcessTree requires: the signal comes when the forking thread exits.)
        self.tree = ProcessTree(argv, env=env, stdout=launch_log, stderr=launch_log,
                                parent_death_signal=signal.SIGKILL)
        self._dead.clear()
        try:
            self.tree.start()
        except OSError as e:
            self._pending = Failure(self.attempt, time.time(), FailureKind.LAUNCH_EXIT,
                                    f"cannot start {argv[0]}: {e}", retriable=False, progressed=False)
            return State.FAILED
        finally:
            launch_log.close()
        self.attempt_started = time.time()
        self.exits.forget()  # the last attempt's processes; the signal wake-up stays
        if self.tree.identity is not None:
            self.exits.watch(self.tree.identity)
        self._emit("started", pid=self.tree.pid, nproc_per_node=self.spec.nproc_per_node,
                   restarts=len(self.failures), argv=argv)
        log.info("attempt %d started (launch pid %d, %d workers)", self.attempt, self.tree.pid,
                 self.spec.nproc_per_node)
        return State.RUNNING

    def _watch(self) -> State:
        hb_dir = self.run_dir / "heartbeats"
        hang_timeout = self.config.supervisor.hang_timeout_s
        start_timeout = max(self.config.supervisor.start_timeout_s, hang_timeout)
        scanned_at = 0.0
        while True:
            self.console.forward()
            if self._stop_asked():
                return self._preempt()
            if self.elastic is not None:
                lost = self.elastic.lost()
                if lost:
                    return self._node_lost(lost)
                self._maybe_scale_up()
            now = time.time()
            beats = self._local(read_heartbeats(hb_dir, attempt=self.attempt))
            local = {r: hb for r, hb in beats.items() if hb.host == self.host}
            for hb in local.values():
                self.tree.add_known(hb.identity)
                self.exits.watch(hb.identity)
            if now - scanned_at >= TREE_SCAN_S:
                self.tree.reap_orphans()
                scanned_at = now
            returncode = self.tree.poll()
            if returncode is not None:
                self.console.forward()
                if returncode == 0:
                    stopped = stopped_ranks(self._local(read_heartbeats(hb_dir, attempt=self.attempt)))
                    self._teardown("finished")
                    if stopped and self.elastic is not None:  # the nodes change: regroup
                        self._emit("regrouping", ranks=stopped, scale_up=self._scale_up_asked)
                        self._backoff_until = 0.0
                        return State.RESTARTING
                    if stopped:  # an agreed stop another node (or a scheduler's signal) asked for
                        self.stop = StopNotice("peer_stop", None, "a stop asked on another node "
                                               "or by a signal to the workers")
                        self._emit("preempted", clean=True, how="workers stopped on a request "
                                   "from another node or a signal to them", ranks=stopped,
                                   **self._stop_fields())
                        return State.PREEMPTED
                    self._emit("succeeded")
                    return State.SUCCEEDED
                self._pending = self._diagnose(FailureKind.LAUNCH_EXIT, beats, returncode=returncode)
                return State.FAILED
            for rank, code in dead_ranks(local).items():
                seen = self._dead.setdefault(rank, (now, code))
                if seen[1] is None and code is not None:
                    self._dead[rank] = (seen[0], code)
            if self._dead:
                # Give a dying worker's error file a moment to appear.
                first_seen = min(t for t, _ in self._dead.values())
                if now - first_seen >= 2 * POLL_S:
                    self._pending = self._diagnose(
                        FailureKind.WORKER_DIED, beats, noticed_at=first_seen,
                        dead={rank: code for rank, (_, code) in self._dead.items()})
                    return State.FAILED
            stale = stale_ranks(beats, now, hang_timeout, phase_timeouts={"init": start_timeout})
            # Every local rank must have beaten once within the start timeout (the nodes of
            # an elastic generation are watched for each other by ElasticNode instead).
            late = now - self.attempt_started > start_timeout
            missing = [r for r in self.spec.local_ranks if r not in beats] \
                if late and (self.elastic is None or not self.multi_node) else []
            if missing and self.multi_node:  # a fixed-size job's nodes
                # Not a hang if the launcher still waits in its rendezvous for another node.
                peers = self._missing_peers()
                if peers is not None:
                    self._pending = root_cause.peer_missing(
                        self.attempt, peers, self.config.launch.nnodes, self.config.launch.node_rank,
                        self.config.launch.master, now - self.attempt_started)
                    return State.FAILED
            if stale or missing:
                reasons = stale or {r: f"never sent a heartbeat in {start_timeout:g} s" for r in missing}
                self._emit("hang_detected", ranks={str(k): v for k, v in reasons.items()})
                self._pending = self._diagnose(FailureKind.HANG, beats, reasons=reasons)
                return State.FAILED
            # Until every local rank has sent a heartbeat, look often: a worker that dies
            # before its pid is watched is found only at the next look, maybe reaped by the
            # launcher already, and its exit signal is then lost to the failure report.
            starting = len(local) < self.spec.nproc_per_node and now - self.attempt_started < start_timeout
            # Elastic: a lost node is in the membership view within POLL_S of its expiry.
            self.exits.sleep(POLL_S if self._dead or starting or self.elastic else CHECK_S)

    def _fail(self) -> State:
        failure = self._pending
        self.failures.append(failure)
        self._emit("worker_failed", **failure_details(failure))
        if self._dead:
            # Keyed on what was seen, not on the diagnosis: a worker died (of a signal or
            # of an exception) and a survivor may be writing its emergency snapshot.
            self._let_survivors_finish()
        self._teardown("failure")
        self._print_report(failure)
        if self._stop_asked():
            return State.PREEMPTED
        decision = self.policy.decide(self.failures, time.time())
        if not decision.restart:
            self._emit("gave_up", reason=decision.reason, root_cause=failure.cause)
            print(f"paddlerun: giving up: {decision.reason}", file=sys.stderr)
            return State.GAVE_UP
        self._emit("restarting", delay_s=decision.delay_s, restarts=len(self.failures))
        when = f"in {decision.delay_s:.1f} s" if decision.delay_s else "now"
        print(f"paddlerun: restarting {when} "
              f"(restart {len(self.failures)} of {self.config.supervisor.max_restarts})",
              file=sys.stderr)
        self._backoff_until = time.time() + decision.delay_s
        return State.RESTARTING

    def _restart(self) -> State:
        while time.time() < self._backoff_until:
            if self._stop_asked():
                self._emit("preempted", during="backoff", **self._stop_fields())
                return State.PREEMPTED
            # A signal wakes it at once; a scheduler's notice file is seen within CHECK_S.
            self.exits.sleep(min(max(self._backoff_until - time.time(), 0), CHECK_S))
        self.attempt += 1
        return State.STARTING

    def _preempt(self) -> State:
        """Ask the workers for a snapshot, give them the grace period, then stop everything.

        When no worker has trained since the newest snapshot (start-up, a rendezvous waiting
        for a peer, restoring), a snapshot would add nothing: stop at once instead of
        letting a scheduler's own grace period (Kubernetes: 30 s) run out first.
        """
        stop = self.stop
        grace = self.config.supervisor.preempt_grace_s
        if stop.signal is None:  # the cloud's notice: the machine goes at its deadline
            grace = min(grace, max(self.spot.notice.deadline - time.time(), 1.0))
        self._emit("preempt_requested", grace_s=grace, **self._stop_fields())
        nothing = self._nothing_to_save()
        if nothing is not None:
            log.info("%s: %s: stopping at once", stop.reason, nothing)
            self.tree.close(NOTHING_TO_SAVE_TERM_S)
            self._teardown("preempted")
            self._emit("preempted", clean=True, how=f"nothing to save: {nothing}", **self._stop_fields())
            if self.spot is not None and self.spot.notice is not None:
                self.spot.acknowledge()
            return State.PREEMPTED
        log.info("%s (%s): asking the workers for a snapshot (grace %.0f s; signal again to stop "
                 "at once)", stop.reason, stop.cause, grace)
        control.request_stop(self.run_dir, reason=stop.reason)
        deadline = time.time() + grace
        while time.time() < deadline and len(self.signals) < 2 and self.tree.poll() is None:
            self.console.forward()
            self.exits.sleep(POLL_S)  # a second signal or the launcher's exit wakes it at once
        self.console.forward()
        code = self.tree.poll()
        # Clean when every local worker said it saved and is done, whatever the launcher is
        # doing: Paddle's launcher exits 15 when it got the scheduler's SIGTERM too, and it
        # may still be noticing its workers' exit (it looks every 2 s) when a second signal
        # comes -- under srun --kill-on-bad-exit, when another node, already done, exited 75.
        clean = code == 0 or self._local_workers_done()
        self._teardown("preempted")
        self._emit("preempted", clean=clean, **self._stop_fields(),
                   how="workers saved and exited" if clean else
                   "second signal" if len(self.signals) > 1 else
                   "grace period ran out" if code is None else
                   f"the launch ended with exit code {code} before a clean stop")
        if clean and self.spot is not None and self.spot.notice is not None:
            self.spot.acknowledge()
        return State.PREEMPTED

    # ------------------------------------------------------------ elastic

    def _next_generation(self) -> State:
        """Wait for the nodes to agree on the next generation, and run with it: RUNNING's
        spec is this generation's (nnodes, node rank, master); the fence of the checkpoints
        directory goes up to it, so no worker of an older one can commit any more."""
        sup = self.config.supervisor
        deadline = time.monotonic() + max(sup.start_timeout_s, sup.elastic_wait_s + sup.node_ttl_s)
        try:
            if self.elastic.generation is None and not self.elastic.membership.view():
                if not self.elastic.join(deadline, self._stop_asked):
                    return self._stopped_waiting()
            before = self.elastic.generation
            gen = self.elastic.form(deadline, self._stop_asked, on_lost=self._emit_node_lost)
        except TooFewNodes as e:
            self._pending = Failure(self.attempt, time.time(), FailureKind.TOO_FEW_NODES, str(e),
                                    retriable=False, progressed=False)
            return State.FAILED
        if gen is None:
            return self._stopped_waiting()
        self._checkpoints().raise_fence(gen.number)
        self._use_generation(gen)
        world = sum(self.spec.nproc_per_node for _ in gen.members)
        self._emit("generation", number=gen.number, members=list(gen.members), world_size=world,
                   node_id=self.elastic.node_id, master=gen.master)
        if before is not None and len(gen.members) != len(before.members):
            grown = len(gen.members) > len(before.members)
            self._emit("scaled_up" if grown else "scaled_down", generation=gen.number,
                       nodes_before=len(before.members), nodes=len(gen.members), world_size=world)
        log.info("generation %d: %d node(s), this one is node %d (%s), master %s", gen.number,
                 len(gen.members), gen.node_rank(self.elastic.node_id), self.elastic.node_id, gen.master)
        self._scale_up_asked = False
        return State.STARTING

    def _use_generation(self, gen) -> None:
        launch = dataclasses.replace(self.spec.config.launch, nnodes=len(gen.members),
                                     node_rank=gen.node_rank(self.elastic.node_id),
                                     master=gen.master if len(gen.members) > 1 else None)
        self.config = dataclasses.replace(self.spec.config, launch=launch)
        self.spec = dataclasses.replace(self.spec, config=self.config, host=self.elastic.addr)
        self.multi_node = len(gen.members) > 1

    def _stopped_waiting(self, how: str = "stopped while waiting for a generation") -> State:
        self._emit("preempted", clean=True, how=how, **self._stop_fields())
        return State.PREEMPTED

    def _node_lost(self, lost) -> State:
        """A node of this generation is gone: stop this node's workers (a survivor already
        writing its emergency snapshot may finish it) and regroup without it."""
        gone = [node for node in lost if node.how != LEFT_GENERATION]
        for node in gone:
            self._emit_node_lost(node)
        if not gone:
            self._emit("regrouping", left=[node.node_id for node in lost],
                       generation=self.elastic.generation.number)
        if any(hb.phase == "checkpoint" for hb in self._local_beats().values() if not hb.ended):
            self._let_survivors_finish()
        # The workers wait in a collective for the lost node: SIGTERM cannot reach them
        # until it fails, and there is nothing left they could save.
        self._teardown("node_lost" if gone else "regrouping", NOTHING_TO_SAVE_TERM_S)
        self._backoff_until = 0.0
        return State.RESTARTING

    def _emit_node_lost(self, node) -> None:
        self._emit("node_lost", lost_node=node.node_id, how=node.how, latency_s=node.latency_s,
                   generation=self.elastic.generation.number)
        log.warning("node %s is lost (%s, %.1f s after its last sign of life): regrouping",
                    node.node_id, node.how, node.latency_s)

    def _maybe_scale_up(self) -> None:
        """A node joined: ask the workers for a snapshot at their next agreement step; their
        agreed stop ends the attempt, and the next generation takes the new node in."""
        if self._scale_up_asked:
            return
        joiners = self.elastic.joiners()
        if not joiners:
            return
        self._scale_up_asked = True
        self._emit("scale_up_requested", joiners=joiners, generation=self.elastic.generation.number)
        log.info("node(s) %s joined: snapshot at the next agreement step, then a restart with "
                 "them", ", ".join(joiners))
        control.request_stop(self.run_dir, reason=f"scale up: {', '.join(joiners)} joined")

    def _checkpoints(self) -> CheckpointStore:
        return CheckpointStore(self.config.checkpoint.dir or self.run_dir / "checkpoints",
                               self.config.checkpoint.lock_timeout_s)

    def _stop_fields(self) -> dict:
        """What every preemption event says of the stop: its cause, its signal (if one), and
        in words why (``SIGTERM``, ``aws preemption notice``)."""
        fields = {"cause": self.stop.cause, "reason": self.stop.reason}
        if self.stop.signal is not None:
            fields["signal"] = self.stop.signal
        return fields

    def _notice_due(self) -> bool:
        """Whether the cloud's preemption notice says to stop now; records the notice once."""
        if self.spot is None or self.spot.notice is None:
            return False
        notice = self.spot.notice
        if self._spot_stop_at is None:
            self._spot_stop_at = self.spot.stop_at(self.run_dir, self.config.train.log_every_steps)
            self._emit("preempt_notice", provider=notice.provider, action=notice.action,
                       deadline=notice.deadline, seen_at=self.spot.seen_at,
                       stop_at=self._spot_stop_at, event_id=notice.event_id)
            log.info("%s preemption notice: the machine goes in %.0f s; training on for %.0f s, "
                     "then a snapshot", notice.provider, notice.deadline - time.time(),
                     max(self._spot_stop_at - time.time(), 0))
        return time.time() >= self._spot_stop_at

    # ------------------------------------------------------------ helpers

    def _nothing_to_save(self) -> Optional[str]:
        """Why a snapshot now would save nothing, by the heartbeats of this attempt; None when
        some rank may have trained since the newest complete snapshot: its step is past the
        snapshot's, or it has left phase ``init`` (start-up, rendezvous, restore), so that it
        may have trained steps its file (written every heartbeat interval) does not show yet."""
        beats = read_heartbeats(self.run_dir / "heartbeats", attempt=self.attempt)
        directory = self.config.checkpoint.dir or self.run_dir / "checkpoints"
        newest = CheckpointStore(directory).newest_complete(verify=False)
        newest_step = newest.step if newest is not None else 0
        if any(hb.phase != "init" or hb.step > newest_step for hb in beats.values()):
            return None
        where = f"the newest snapshot (step {newest_step})" if newest else "the start (no snapshot yet)"
        if not beats:
            return f"no worker has sent a heartbeat yet; training would start from {where}"
        return f"no worker has trained since {where}"

    def _let_survivors_finish(self) -> None:
        """After a local worker died: wait until every local worker has exited (a survivor
        writing its emergency snapshot exits when done), or the launch process has.

        Paddle's launcher notices a dead worker only after ~1 s, SIGTERMs the rest (a
        survivor ignores that while it saves) and SIGKILLs them 3 s later, however long
        the snapshot needs. So while a live survivor says it is saving (heartbeat phase
        ``checkpoint``), the launch process is held with SIGSTOP (the teardown's SIGCONT
        wakes it) and the wait may last ``supervisor.preempt_grace_s``, the time a snapshot
        on the way out is given. Otherwise it ends after ``LAUNCH_EXIT_GRACE_S``: with no
        snapshot to wait for, waiting for the launcher only adds to the recovery time.
        """
        hb_dir = self.run_dir / "heartbeats"
        sup = self.config.supervisor
        started = time.time()
        held = False
        while self.tree.poll() is None and len(self.signals) < 2:
            self.console.forward()
            now = time.time()
            local = {r: hb for r, hb in self._local(read_heartbeats(hb_dir, attempt=self.attempt)).items()
                     if hb.host == self.host}
            dead = dead_ranks(local)
            alive = {r: hb for r, hb in local.items() if r not in dead and not hb.ended}
            if local and not alive:
                break
            saving = sorted(r for r, hb in alive.items()
                            if hb.phase == "checkpoint" and hb.age(now) < sup.hang_timeout_s)
            if saving and not held and self.tree.signal_launch(signal.SIGSTOP):
                held = True
                self._emit("launch_held", saving_ranks=saving)
                log.info("rank %s is writing a snapshot: the launch process is held until it "
                         "is done (at most %.0f s)", ",".join(map(str, saving)), sup.preempt_grace_s)
            if now - started >= (sup.preempt_grace_s if held else LAUNCH_EXIT_GRACE_S):
                break
            self.exits.sleep(POLL_S)  # the survivor's exit wakes it at once

    def _local_beats(self) -> dict:
        return {r: hb for r, hb in self._local(read_heartbeats(self.run_dir / "heartbeats",
                                                               attempt=self.attempt)).items()
                if hb.host == self.host}

    def _local_workers_done(self) -> bool:
        beats = {r: hb for r, hb in self._local(read_heartbeats(self.run_dir / "heartbeats",
                                                                attempt=self.attempt)).items()
                 if hb.host == self.host}
        return bool(beats) and len(beats) == self.spec.nproc_per_node and \
            all(hb.ended for hb in beats.values())

    def _local(self, beats) -> dict:
        """This node's ranks only: the nodes of a job may share the run directory (and, in
        tests, the host), and each supervisor watches and stops its own workers alone."""
        if not self.multi_node:
            return beats
        return {r: hb for r, hb in beats.items() if r in self.spec.local_ranks}

    def _clear_local_heartbeats(self) -> None:
        hb_dir = self.run_dir / "heartbeats"
        if not self.multi_node:
            clear_heartbeats(hb_dir)
            return
        hb_dir.mkdir(parents=True, exist_ok=True)
        for rank in self.spec.local_ranks:
            try:
                heartbeat_path(hb_dir, rank).unlink()
            except FileNotFoundError:
                pass

    def _teardown(self, why: str, term_s: float = TEARDOWN_TERM_S) -> None:
        if self.tree is None:  # no attempt started (an elastic job that found too few nodes)
            return
        killed = self.tree.close(term_s)
        self.console.forward()
        if why != "finished":  # a launcher that finished has shown everything
            self._show_unshown_worker_lines()
        self.tree.reap_orphans()
        left = [p.pid for p in self.tree.members()]
        self._emit("teardown", why=why, processes=len(killed),
                   how=sorted({k["how"] for k in killed}), left_alive=left)

    def _diagnose(self, kind: str, beats, **facts) -> Failure:
        self.console.forward()
        launch = self.config.launch
        return root_cause.diagnose(kind, self.run_dir, self.attempt, self.spec.log_dir(self.attempt),
                                   beats, first_rank=launch.node_rank * self.spec.nproc_per_node, **facts)

    def _missing_peers(self):
        """The nodes this node's launcher still waits for in its rendezvous, if it waits."""
        launch = self.config.launch
        return missing_nodes(self.spec.log_dir(self.attempt) / "launch.log", launch.nnodes,
                             launch.node_rank, launch.master)

    def _print_report(self, failure: Failure) -> None:
        print(root_cause.report(failure), file=sys.stderr)

    def _show_unshown_worker_lines(self) -> None:
        """After a teardown: the end of local rank 0's log that the launcher had not shown."""
        log_dir = self.spec.log_dir(self.attempt)
        lines = unshown_lines(log_dir / "workerlog.0", log_dir / "launch.log")
        if lines:
            header = f"paddlerun: the launcher stopped before showing the end of {log_dir / 'workerlog.0'}:\n"
            self.console.write((header + "\n".join(lines) + "\n").encode())

    def _install_signal_handlers(self):
        def on_signal(signum, frame):
            self.signals.append(signum)

        names = list(self.config.supervisor.preempt_signals) + ["SIGINT"]
        previous = {}
        for name in dict.fromkeys(names):
            sig = getattr(signal, name)
            previous[sig] = signal.signal(sig, on_signal)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _exit_code(self) -> int:
        if self.state is State.SUCCEEDED:
            return exit_codes.SUCCESS
        if self.state is State.PREEMPTED:
            return exit_codes.INTERRUPTED if self.stop.signal == "SIGINT" else exit_codes.REQUEUE
        return exit_codes.FAILED

    def _write_summary(self) -> None:
        path = self.node_dir / "summary.json"
        summary = {}
        if self.state is State.SUCCEEDED and path.is_file():
            try:
                summary = json.loads(path.read_text())
            except ValueError:
                summary = {}
        summary.update({
            "status": self.state.value,
            "attempts": self.attempt - self.first_attempt + 1,
            "first_attempt": self.first_attempt,
            "restarts": len(self.failures) if self.state is not State.GAVE_UP else len(self.failures) - 1,
            "failures": [{"attempt": f.attempt, **failure_details(f)} for f in self.failures],
        })
        if self.state is not State.SUCCEEDED:
            last = self.failures[-1] if self.failures else None
            summary["root_cause"] = {"attempt": last.attempt, **failure_details(last)} if last else None
        write_json_atomic(path, summary)


def stopped_ranks(beats) -> List[int]:
    """Ranks whose last heartbeat says they stopped early on an agreed request."""
    return sorted(rank for rank, hb in beats.items() if hb.phase == "stopped")


def dead_ranks(beats) -> Dict[int, Optional[int]]:
    """Ranks whose process is gone or a zombie without having said it was done, with the
    return code when it can still be read (negative: killed by that signal)."""
    dead: Dict[int, Optional[int]] = {}
    for rank, hb in beats.items():
        if hb.ended:
            continue
        if not hb.identity.exists():
            dead[rank] = None  # gone (or its pid reused): its exit status is lost
        elif not hb.identity.alive():
            dead[rank] = zombie_returncode(hb.pid)
    return dead


def zombie_returncode(pid: int) -> Optional[int]:
    """A zombie's exit status, from /proc/PID/stat's exit_code field (Linux >= 3.5).

    The workers are the launch process's children, not ours, so waitpid cannot tell us
    how one died; until its parent reaps it, the kernel still can.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        status = int(fields[49])
    except (OSError, IndexError, ValueError):
        return None
    return -(status & 0x7F) if status & 0x7F else status >> 8


def failure_details(f: Failure) -> dict:
    return {"kind": f.kind, "cause": f.cause, "rank": f.rank, "pid": f.pid, "host": f.host,
            "failed_at": f.time, "retriable": f.retriable,
            "progressed": f.progressed, "detail": f.detail[-2000:]}


def next_attempt_number(run_dir: Path) -> int:
    """Attempts are numbered across reruns of the same run directory, so logs never mix."""
    numbers = [int(p.name.split("-", 1)[1]) for p in (run_dir / "logs").glob("attempt-*")
               if p.name.split("-", 1)[1].isdigit()]
    return max(numbers) + 1 if numbers else 0
