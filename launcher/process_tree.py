"""The launch process tree: start it, watch it, tear every last process of it down.

Process handling only, no policy (like torch elastic's process context): the
supervisor decides *when* to stop a tree; this module makes sure that stopping
it leaves nothing behind.

Why this is harder than ``Popen.kill()``:

* ``paddle.distributed.launch`` starts every worker with ``setsid``: each worker
  is its own session and process group, so killing the launch process's group
  does not reach them.
* When the launch process is SIGKILLed its workers are orphaned and keep
  training. They are re-parented to the nearest *child subreaper*
  (:func:`become_subreaper`; the supervisor calls it once) or to init.
* So a tree remembers every process it has ever seen by ``(pid, start_ticks)``
  (``ProcessIdentity``: a pid alone may be reused) and marks its environment
  with a variable unique to the tree (``PADDLERUN_TREE_<id>=1``), which every descendant
  inherits unless it deliberately scrubs its environment. :meth:`ProcessTree.members`
  finds a process by any of: descendant of the launch process, descendant of a
  process seen before, registered with :meth:`ProcessTree.add_known` (worker
  pids from heartbeat files), or carrying the marker. That finds orphans even
  after the launch process is gone and even if nobody looked at them while it
  was alive.

Supervisor only: workers never import this module.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Dict, IO, Iterable, List, Optional, Set, Tuple, Union

import psutil

from paddlerun.launcher import parent_death
from paddlerun.trainer.rundir.process_identity import ProcessIdentity, TICKS_PER_S, process_table, ticks_now

__all__ = [
    "ProcessTree",
    "become_subreaper",
    "describe_exit",
    "is_subreaper",
    "signal_name",
    "signal_processes",
]

# <linux/prctl.h>
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37

#: How often close() looks whether the processes it signalled are gone.
_POLL_INTERVAL_S = 0.02


def _prctl():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    prctl = libc.prctl
    prctl.restype = ctypes.c_int
    return prctl


def become_subreaper(enable: bool = True) -> bool:
    """Make this process the child subreaper of its descendants (Linux >= 3.4).

    Orphans anywhere below it (workers of a SIGKILLed launch process) are then
    re-parented to this process instead of init, so they stay visible as our
    children and we can reap them. (Init may not reap either: in a container
    without an init, a killed orphan stays a zombie forever.) Returns False,
    without raising, where unsupported. Supervisor only, once, before starting a
    tree; a process that calls it must reap what it inherits
    (:meth:`ProcessTree.reap_orphans`, :meth:`ProcessTree.close`).
    ``enable=False`` turns it off again (tests).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        prctl = _prctl()
        return prctl(_PR_SET_CHILD_SUBREAPER, 1 if enable else 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def is_subreaper() -> bool:
    """Whether this process is a child subreaper (False where unsupported)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        prctl = _prctl()
        flag = ctypes.c_int(0)
        if prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) != 0:
            return False
        return bool(flag.value)
    except (OSError, AttributeError):
        return False


def signal_name(returncode_or_signum: int) -> str:
    """``-9`` or ``9`` -> ``"SIGKILL"``; a number with no name -> ``"signal 77"``."""
    signum = abs(int(returncode_or_signum))
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def describe_exit(returncode: int) -> str:
    """``3`` -> ``"exit code 3"``, ``-9`` -> ``"killed by SIGKILL"``.

    A shell (or a launcher that exits with its child's status) reports a child
    killed by signal N as exit code 128 + N; that is named too, because it is the
    usual way a SIGKILLed worker shows up one level up:
    ``137`` -> ``"exit code 137 (128 + SIGKILL)"``.
    """
    returncode = int(returncode)
    if returncode < 0:
        return f"killed by {signal_name(returncode)}"
    text = f"exit code {returncode}"
    if 128 < returncode < 128 + signal.NSIG:
        try:
            text += f" (128 + {signal.Signals(returncode - 128).name})"
        except ValueError:
            pass
    return text


def _describe(identity: ProcessIdentity) -> Tuple[str, List[str]]:
    try:
        proc = psutil.Process(identity.pid)
        name, cmdline = proc.name(), proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "?", []
    if not identity.exists():  # pid reused meanwhile: not what we describe
        return "?", []
    return name, cmdline


class ProcessTree:
    """One launch process and every process it (transitively) starts.

    Typical supervisor use::

        become_subreaper()                       # once per supervisor
        tree = ProcessTree(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        tree.start()
        while tree.poll() is None and not hung:
            tree.reap_orphans()
            ...
        report = tree.close(term_timeout_s=5.0)  # nothing of the tree is alive after this

    Not thread-safe: one thread (the supervisor loop) owns a tree.
    """

    def __init__(
        self,
        argv: List[str],
        *,
        env: Dict[str, str],
        cwd: Optional[str] = None,
        stdout: Union[None, int, IO] = None,
        stderr: Union[None, int, IO] = None,
        parent_death_signal: Optional[int] = None,
    ) -> None:
        """``parent_death_signal``: the kernel sends it to the launch process when the thread
        that started it exits (launcher/parent_death.py); then :meth:`start` must be called
        from the main thread."""
        if not argv:
            raise ValueError("ProcessTree needs a non-empty argv (the launch command)")
        self.argv = [str(a) for a in argv]
        self.cwd = cwd
        self._stdout = stdout
        self._stderr = stderr
        self.parent_death_signal = parent_death_signal
        #: The environment variable that marks this tree's processes.
        self.marker = f"PADDLERUN_TREE_{uuid.uuid4().hex[:16].upper()}"
        self.env = dict(env)
        self.env[self.marker] = "1"
        self._popen: Optional[subprocess.Popen] = None
        self.pid: int = 0
        #: The launch process, by (pid, start ticks); None until started.
        self.identity: Optional[ProcessIdentity] = None
        #: Boot-relative clock ticks just before the launch process was started.
        self.start_ticks: int = 0
        # Every process ever seen as part of the tree.
        self._known: Set[ProcessIdentity] = set()
        # Processes whose environment was read and lacks the marker.
        self._unmarked: Set[ProcessIdentity] = set()
        # close() reports a launch process that exited by itself once, not per call.
        self._launch_reported = False

    # ---------------------------------------------------------------- start/poll

    def start(self) -> None:
        """Start the launch process in a new session (its own process group)."""
        if self._popen is not None:
            raise RuntimeError(f"ProcessTree already started (launch pid {self.pid})")
        argv = self.argv
        if self.parent_death_signal is not None:
            # The signal comes when the forking *thread* exits: from any thread but the
            # main one, the launch process would die with that thread.
            if threading.current_thread() is not threading.main_thread():
                raise RuntimeError("a ProcessTree with a parent_death_signal must be started "
                                   "from the main thread")
            # setpriv execs the launch command in place: self.pid, self.identity and the
            # environment are the launch process's own.
            argv = parent_death.command(self.argv, self.parent_death_signal,
                                        path=self.env.get("PATH"), cwd=self.cwd)
        self.start_ticks = ticks_now()
        self._popen = subprocess.Popen(
            argv,
            env=self.env,
            cwd=self.cwd,
            stdout=self._stdout,
            stderr=self._stderr,
            start_new_session=True,
        )
        self.pid = self._popen.pid
        # Our child: its pid cannot be reused before we reap it, so this is the launch process.
        self.identity = ProcessIdentity.of(self.pid)
        if self.identity is not None:
            self._known.add(self.identity)

    def poll(self) -> Optional[int]:
        """The launch process's return code (negative: killed by that signal); None while running."""
        if self._popen is None:
            return None
        return self._popen.poll()

    def signal_launch(self, sig: int) -> bool:
        """Send ``sig`` to the launch process alone (not its workers); False if it has
        exited. Its ``Popen`` has not reaped it then, so the pid is not a reused one."""
        if self._popen is None or self._popen.poll() is not None:
            return False
        self._popen.send_signal(sig)
        return True

    @property
    def returncode(self) -> Optional[int]:
        return None if self._popen is None else self._popen.returncode

    def wait(self, timeout_s: float) -> Optional[int]:
        """Wait up to ``timeout_s`` for the launch process; its return code or None."""
        if self._popen is None:
            return None
        try:
            return self._popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    # ------------------------------------------------------------------ members

    def add_known(self, identity: ProcessIdentity) -> None:
        """Register a process of this tree (e.g. a worker from its heartbeat file).

        Ignored if it is gone already (or its pid now names another process).
        Like every member, it is reaped by :meth:`close` if it is our child: do not
        register a child whose ``Popen`` you still want to ``wait`` for (its return
        code would read 0).
        """
        if identity not in self._known and identity.alive():
            self._known.add(identity)

    def members(self) -> List[ProcessIdentity]:
        """Every live process of this tree, the launch process first if alive.

        Live means not gone and not a zombie; stopped (SIGSTOP) processes are live.
        Every call refreshes the set of known processes, so call it regularly
        (each supervisor tick): a process seen once is found again by
        ``(pid, start_ticks)`` after its parent died. Never includes this process.

        One pass over ``/proc`` per call (pid, parent, start time of every process),
        and each process's environment is read once in its life: a supervisor calls
        this several times a second on a machine whose cores are all training.
        """
        if self._popen is None:
            return []
        table = process_table()
        me = os.getpid()
        found: Set[ProcessIdentity] = {i for i in self._known if i.pid != me and i.alive()}
        found.update(self._marked_processes(table))
        # Descendants of everything found so far (the launch process's workers,
        # an orphaned worker's own children, ...).
        children: Dict[int, List[ProcessIdentity]] = {}
        for identity, ppid in table.items():
            children.setdefault(ppid, []).append(identity)
        todo = [identity.pid for identity in found]
        while todo:
            for child in children.get(todo.pop(), ()):
                if child not in found and child.pid != me and child.alive():
                    found.add(child)
                    todo.append(child.pid)
        self._known.update(found)
        # Forget processes that are gone (zombies stay known until reaped so that
        # reap_orphans can recognise them).
        self._known = {i for i in self._known if i.exists()}
        self._unmarked = {i for i in self._unmarked if i in table}
        return sorted(found, key=lambda i: (i.pid != self.pid, i.pid))

    def _marked_processes(self, table: Dict[ProcessIdentity, int]) -> List[ProcessIdentity]:
        """Processes started after this tree whose environment carries its marker."""
        out = []
        # Start ticks have clock-tick resolution; allow a little slack.
        not_before = self.start_ticks - TICKS_PER_S
        my_pid = os.getpid()
        for identity in table:
            if identity.start_ticks < not_before or identity.pid == my_pid \
                    or identity in self._unmarked or identity in self._known:
                continue
            try:
                environ = psutil.Process(identity.pid).environ()
            except psutil.AccessDenied:  # another user's process: never ours, never readable
                self._unmarked.add(identity)
                continue
            except (psutil.NoSuchProcess, psutil.ZombieProcess, OSError):
                continue
            if not identity.alive():  # the pid was reused while we looked
                continue
            if environ.get(self.marker) == "1":
                out.append(identity)
            else:  # an environment never gains the marker later: do not read it again
                self._unmarked.add(identity)
        return out

    # --------------------------------------------------------------- reaping

    def reap_orphans(self) -> None:
        """``waitpid`` this tree's zombies that were re-parented to us.

        Only processes known to belong to the tree are reaped (never some other
        child of the supervisor whose status a ``Popen`` is waiting for), and never
        the launch process itself: its status belongs to ``Popen`` -- stealing it
        would turn its return code into 0. A zombie that died before the tree ever
        saw it alive stays a zombie until the supervisor exits (harmless: it holds
        a pid, nothing else); calling this every few seconds (the supervisor's
        ``TREE_SCAN_S``) makes that rare.
        """
        self.members()  # refresh: learn about live orphans before they die
        my_pid = os.getpid()
        for identity in list(self._known):
            if identity.pid == self.pid:
                continue
            if identity.parent() == my_pid and not identity.alive():
                self._waitpid_nohang(identity.pid)

    @staticmethod
    def _waitpid_nohang(pid: int) -> bool:
        """Reap ``pid`` if it is our exited child; True if it is gone."""
        try:
            reaped, _ = os.waitpid(pid, os.WNOHANG)
            return reaped == pid
        except ChildProcessError:
            return True
        except OSError as exc:
            if exc.errno == errno.ECHILD:
                return True
            raise

    # ----------------------------------------------------------------- close

    def close(self, term_timeout_s: float = 5.0, kill_timeout_s: float = 5.0) -> List[dict]:
        """Stop every member: SIGTERM (+ SIGCONT), wait ``term_timeout_s``, SIGKILL, reap.

        Each member gets SIGTERM and then SIGCONT, so that a stopped (SIGSTOPped)
        process wakes up and handles its pending SIGTERM instead of sitting out the
        whole timeout. (Without a handler SIGTERM kills even a stopped process; with
        one it stays pending until SIGCONT. SIGKILL works on stopped processes
        regardless.) Signals go to the members themselves, by pidfd
        (:class:`ProcessIdentity`), never to a process group: a group id is a number
        that may be freed and reused by another session between two signals.
        Survivors after ``term_timeout_s`` get SIGKILL. New members that appear
        while tearing down (a launcher restarting a worker) get the same treatment.

        Returns one dict per process handled in this call: ``pid``,
        ``start_ticks``, ``name``, ``cmdline``, ``how`` -- ``"exited"`` (gone before
        any signal), ``"SIGTERM"`` (gone after SIGTERM), ``"SIGKILL"`` or, only if
        a process survives SIGKILL for ``kill_timeout_s`` (uninterruptible sleep
        in the kernel), ``"unkillable"``. The launch process's return code stays
        available from :meth:`poll`. Idempotent: a second call finds no member and
        returns ``[]``. Supervisor only.
        """
        if self._popen is None:
            return []
        report: Dict[ProcessIdentity, dict] = {}
        # New members can appear during teardown; a few rounds catch them.
        for _ in range(5):
            pending = self._new_targets(report)
            if not pending:
                break
            signal_processes(pending, signal.SIGTERM, signal.SIGCONT)
            for identity in pending:
                report[identity]["how"] = "SIGTERM"
            survivors = self._wait_gone(pending, term_timeout_s)
            if survivors:
                signal_processes(survivors, signal.SIGKILL)
                for identity in survivors:
                    report[identity]["how"] = "SIGKILL"
                for identity in self._wait_gone(survivors, kill_timeout_s):
                    report[identity]["how"] = "unkillable"
                    print(
                        f"paddlerun: pid {identity.pid} ({report[identity]['name']}) survived SIGKILL "
                        f"for {kill_timeout_s:.1f} s (uninterruptible sleep?)",
                        file=sys.stderr,
                    )
        # Make sure the launch process is reaped by Popen (keeps its return code).
        if self._popen.poll() is None:
            try:
                self._popen.wait(timeout=kill_timeout_s)
            except subprocess.TimeoutExpired:
                pass
        self.reap_orphans()
        self._known = {i for i in self._known if i.alive()}
        return list(report.values())

    def _new_targets(self, report: Dict[ProcessIdentity, dict]) -> List[ProcessIdentity]:
        """Members not handled yet; also notes the launch process if it already exited."""
        if not self._launch_reported and self._popen.poll() is not None and self.identity:
            self._launch_reported = True
            report[self.identity] = {
                "pid": self.pid, "start_ticks": self.identity.start_ticks,
                "name": os.path.basename(self.argv[0]), "cmdline": list(self.argv),
                "how": "exited",
            }
        pending: List[ProcessIdentity] = []
        for identity in self.members():
            if identity in report:
                continue
            if identity.pid == self.pid:
                self._launch_reported = True
            name, cmdline = _describe(identity)
            report[identity] = {"pid": identity.pid, "start_ticks": identity.start_ticks,
                                "name": name, "cmdline": cmdline, "how": "exited"}
            pending.append(identity)
        return pending

    def _wait_gone(self, identities: Iterable[ProcessIdentity],
                   timeout_s: float) -> List[ProcessIdentity]:
        """Wait until every one of ``identities`` is gone or a zombie; return the rest.

        Reaps our own children on the way, except the launch process, which is
        left to ``Popen`` (poll) so that its return code is kept.
        """
        remaining = list(identities)
        deadline = time.monotonic() + max(0.0, timeout_s)
        my_pid = os.getpid()
        while True:
            for identity in list(remaining):
                if identity.pid == self.pid:
                    if self._popen.poll() is not None:
                        remaining.remove(identity)
                        continue
                elif identity.parent() == my_pid:
                    self._waitpid_nohang(identity.pid)
                if not identity.alive():
                    remaining.remove(identity)
            if not remaining or time.monotonic() >= deadline:
                return remaining
            time.sleep(_POLL_INTERVAL_S)

    def __repr__(self) -> str:
        state = "not started" if self._popen is None else (
            "running" if self.poll() is None else describe_exit(self.poll()))
        return f"ProcessTree(pid={self.pid}, {state}, argv={self.argv[:3]}...)"


def signal_processes(identities: Iterable[ProcessIdentity], *signals: int) -> None:
    """Send each of ``signals``, in order, to each process that is still the one named.

    One pidfd per process is held across all the signals: a SIGCONT after a SIGTERM
    reaches the same process or none, even if the pid is freed and reused in between.
    """
    handles = [h for h in (i.open() for i in identities) if h is not None]
    try:
        for sig in signals:
            for handle in handles:
                handle.send_signal(sig)
    finally:
        for handle in handles:
            handle.close()
