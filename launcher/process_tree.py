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
* So a tree remembers every process it has ever seen by ``(pid, create_time)``
  -- a pid alone may be reused -- and marks its environment with a variable
  unique to the tree (``PADDLERUN_TREE_<id>=1``), which every descendant
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
import time
import uuid
from typing import Dict, IO, List, Optional, Set, Tuple, Union

import psutil

__all__ = [
    "ProcessTree",
    "become_subreaper",
    "describe_exit",
    "is_subreaper",
    "signal_name",
]

# <linux/prctl.h>
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37

#: psutil's create_time comes from /proc/PID/stat in clock ticks (1/100 s); two
#: readings of the same process may differ by float rounding only.
_CREATE_TIME_TOLERANCE_S = 0.01
#: How often close() looks whether the processes it signalled are gone.
_POLL_INTERVAL_S = 0.02

_ProcKey = Tuple[int, float]


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


def _process_table() -> Dict[int, Tuple[int, float]]:
    """``{pid: (parent pid, create_time)}`` of every process, from one pass over /proc."""
    table = {}
    for proc in psutil.process_iter(["ppid", "create_time"]):
        ppid, ctime = proc.info["ppid"], proc.info["create_time"]
        if ppid is not None and ctime is not None:
            table[proc.pid] = (ppid, ctime)
    return table


def _is_alive(proc: psutil.Process) -> bool:
    """Running, sleeping or stopped -- not gone and not a zombie (zombies are dead)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _describe(proc: psutil.Process) -> Tuple[str, List[str]]:
    try:
        name = proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        name = "?"
    try:
        cmdline = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        cmdline = []
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
    ) -> None:
        if not argv:
            raise ValueError("ProcessTree needs a non-empty argv (the launch command)")
        self.argv = [str(a) for a in argv]
        self.cwd = cwd
        self._stdout = stdout
        self._stderr = stderr
        #: The environment variable that marks this tree's processes.
        self.marker = f"PADDLERUN_TREE_{uuid.uuid4().hex[:16].upper()}"
        self.env = dict(env)
        self.env[self.marker] = "1"
        self._popen: Optional[subprocess.Popen] = None
        self.pid: int = 0
        self.create_time: float = 0.0
        #: Wall-clock time just before the launch process was started.
        self.start_time: float = 0.0
        # Every process ever seen as part of the tree, by (pid, create_time).
        self._known: Dict[_ProcKey, psutil.Process] = {}
        # Processes whose environment was read and lacks the marker.
        self._unmarked: Set[_ProcKey] = set()
        # close() reports a launch process that exited by itself once, not per call.
        self._launch_reported = False

    # ---------------------------------------------------------------- start/poll

    def start(self) -> None:
        """Start the launch process in a new session (its own process group)."""
        if self._popen is not None:
            raise RuntimeError(f"ProcessTree already started (launch pid {self.pid})")
        self.start_time = time.time()
        self._popen = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdout=self._stdout,
            stderr=self._stderr,
            start_new_session=True,
        )
        self.pid = self._popen.pid
        try:
            proc = psutil.Process(self.pid)
            self.create_time = proc.create_time()
            self._known[(self.pid, self.create_time)] = proc
        except psutil.NoSuchProcess:  # already exited and reaped: nothing to track
            pass

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

    def add_known(self, pid: int, create_time: float) -> None:
        """Register a process of this tree (e.g. a worker pid from its heartbeat file).

        Ignored if ``pid`` is gone or is now a different process (pid reuse).
        Like every member, it is reaped by :meth:`close` if it is our child: do not
        register a child whose ``Popen`` you still want to ``wait`` for (its return
        code would read 0).
        """
        if any(k[0] == pid and abs(k[1] - create_time) <= _CREATE_TIME_TOLERANCE_S for k in self._known):
            return  # every supervisor tick registers the workers again: keep that cheap
        proc = self._lookup(pid, create_time)
        if proc is not None:
            self._known[(proc.pid, proc.create_time())] = proc

    def members(self) -> List[psutil.Process]:
        """Every live process of this tree, the launch process first if alive.

        Live means not gone and not a zombie; stopped (SIGSTOP) processes are live.
        Every call refreshes the set of known processes, so call it regularly
        (each supervisor tick): a process seen once is found again by
        ``(pid, create_time)`` after its parent died. Never includes this process.

        One pass over ``/proc`` per call (pid, parent, start time of every process),
        and each process's environment is read once in its life: a supervisor calls
        this several times a second on a machine whose cores are all training.
        """
        if self._popen is None:
            return []
        table = _process_table()
        found: Dict[_ProcKey, psutil.Process] = {}

        def add(proc: psutil.Process) -> None:
            if proc.pid == os.getpid():
                return
            try:
                key = (proc.pid, proc.create_time())
            except psutil.NoSuchProcess:
                return
            if key not in found and _is_alive(proc):
                found[key] = proc

        for proc in list(self._known.values()):
            add(proc)
        for proc in self._marked_processes(table):
            add(proc)
        # Descendants of everything found so far (the launch process's workers,
        # an orphaned worker's own children, ...).
        children: Dict[int, List[int]] = {}
        for pid, (ppid, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        todo = [key[0] for key in found]
        while todo:
            for pid in children.get(todo.pop(), ()):
                try:
                    child = psutil.Process(pid)
                except psutil.NoSuchProcess:
                    continue
                before = len(found)
                add(child)
                if len(found) > before:
                    todo.append(pid)
        self._known.update(found)
        # Forget processes that are gone (zombies stay known until reaped so that
        # reap_orphans can recognise them).
        for key, proc in list(self._known.items()):
            if not proc.is_running():
                del self._known[key]
        self._unmarked = {key for key in self._unmarked if table.get(key[0], (0, None))[1] == key[1]}
        ordered = sorted(found.values(), key=lambda p: (p.pid != self.pid, p.pid))
        return ordered

    def _marked_processes(self, table: Dict[int, Tuple[int, float]]) -> List[psutil.Process]:
        """Processes started after this tree whose environment carries its marker."""
        out = []
        # create_time has clock-tick resolution; allow a little slack.
        not_before = self.start_time - 1.0
        my_pid = os.getpid()
        for pid, (_, ctime) in table.items():
            if ctime < not_before or pid == my_pid or (pid, ctime) in self._unmarked:
                continue
            try:
                proc = psutil.Process(pid)
                if proc.environ().get(self.marker) == "1":
                    out.append(proc)
                else:  # an environment never gains the marker later: do not read it again
                    self._unmarked.add((pid, ctime))
            except psutil.AccessDenied:  # another user's process: never ours, never readable
                self._unmarked.add((pid, ctime))
            except (psutil.NoSuchProcess, psutil.ZombieProcess, OSError):
                continue
        return out

    @staticmethod
    def _lookup(pid: int, create_time: float) -> Optional[psutil.Process]:
        try:
            proc = psutil.Process(int(pid))
            if abs(proc.create_time() - float(create_time)) > _CREATE_TIME_TOLERANCE_S:
                return None
            return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
            return None

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
        for (pid, _), proc in list(self._known.items()):
            if pid == self.pid:
                continue
            try:
                if proc.ppid() != my_pid or proc.status() != psutil.STATUS_ZOMBIE:
                    continue
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            self._waitpid_nohang(pid)

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

        Each member and its process group get SIGTERM (``os.killpg``; never our own
        group), then SIGCONT, so that a stopped (SIGSTOPped) process wakes up and
        handles its pending SIGTERM instead of sitting out the whole timeout.
        (Without a handler SIGTERM kills even a stopped process; with one it stays
        pending until SIGCONT. SIGKILL works on stopped processes regardless.)
        Survivors after ``term_timeout_s`` get SIGKILL. New members that appear
        while tearing down (a launcher restarting a worker) get the same treatment.

        Returns one dict per process handled in this call: ``pid``,
        ``create_time``, ``name``, ``cmdline``, ``how`` -- ``"exited"`` (gone before
        any signal), ``"SIGTERM"`` (gone after SIGTERM), ``"SIGKILL"`` or, only if
        a process survives SIGKILL for ``kill_timeout_s`` (uninterruptible sleep
        in the kernel), ``"unkillable"``. The launch process's return code stays
        available from :meth:`poll`. Idempotent: a second call finds no member and
        returns ``[]``. Supervisor only.
        """
        if self._popen is None:
            return []
        report: Dict[_ProcKey, dict] = {}
        signalled: Set[_ProcKey] = set()
        # New members can appear during teardown; a few rounds catch them.
        for _ in range(5):
            pending = self._new_targets(report)
            if not pending:
                break
            self._signal_all(pending, signal.SIGTERM, also_cont=True)
            signalled.update(pending)
            for key in pending:
                report[key]["how"] = "SIGTERM"
            survivors = self._wait_gone(pending, term_timeout_s)
            if survivors:
                self._signal_all(survivors, signal.SIGKILL)
                for key in survivors:
                    report[key]["how"] = "SIGKILL"
                for key in self._wait_gone(survivors, kill_timeout_s):
                    report[key]["how"] = "unkillable"
                    print(
                        f"paddlerun: pid {key[0]} ({report[key]['name']}) survived SIGKILL "
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
        self._known = {k: p for k, p in self._known.items() if _is_alive(p)}
        return list(report.values())

    def _new_targets(self, report: Dict[_ProcKey, dict]) -> Dict[_ProcKey, psutil.Process]:
        """Members not handled yet; also notes the launch process if it already exited."""
        if not self._launch_reported and self._popen.poll() is not None and self.create_time:
            self._launch_reported = True
            key = (self.pid, self.create_time)
            report[key] = {
                "pid": self.pid, "create_time": self.create_time,
                "name": os.path.basename(self.argv[0]), "cmdline": list(self.argv),
                "how": "exited",
            }
        pending: Dict[_ProcKey, psutil.Process] = {}
        for proc in self.members():
            try:
                key = (proc.pid, proc.create_time())
            except psutil.NoSuchProcess:
                continue
            if key in report:
                continue
            if proc.pid == self.pid:
                self._launch_reported = True
            name, cmdline = _describe(proc)
            report[key] = {"pid": proc.pid, "create_time": key[1], "name": name,
                           "cmdline": cmdline, "how": "exited"}
            pending[key] = proc
        return pending

    def _signal_all(self, procs: Dict[_ProcKey, psutil.Process], sig: int,
                    also_cont: bool = False) -> None:
        own_group = os.getpgrp()
        groups: Set[int] = set()
        for proc in procs.values():
            try:
                pgid = os.getpgid(proc.pid)
                if not proc.is_running():  # pid reused since members() saw it
                    continue
            except (ProcessLookupError, PermissionError):
                pgid = None
            if pgid is not None and pgid > 1 and pgid != own_group:
                groups.add(pgid)
        sigs = [sig, signal.SIGCONT] if also_cont else [sig]
        for s in sigs:
            for pgid in groups:
                try:
                    os.killpg(pgid, s)
                except (ProcessLookupError, PermissionError):
                    pass
            for proc in procs.values():
                try:
                    # psutil checks (pid, create_time) first: never a reused pid.
                    proc.send_signal(s)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass

    def _wait_gone(self, procs: Dict[_ProcKey, psutil.Process],
                   timeout_s: float) -> Dict[_ProcKey, psutil.Process]:
        """Wait until every process in ``procs`` is gone or a zombie; return the rest.

        Reaps our own children on the way, except the launch process, which is
        left to ``Popen`` (poll) so that its return code is kept.
        """
        remaining = dict(procs)
        deadline = time.monotonic() + max(0.0, timeout_s)
        my_pid = os.getpid()
        while True:
            for key, proc in list(remaining.items()):
                if key[0] == self.pid:
                    if self._popen.poll() is not None:
                        del remaining[key]
                        continue
                else:
                    try:
                        if proc.ppid() == my_pid:
                            self._waitpid_nohang(proc.pid)
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
                if not _is_alive(proc):
                    del remaining[key]
            if not remaining or time.monotonic() >= deadline:
                return remaining
            time.sleep(_POLL_INTERVAL_S)

    def __repr__(self) -> str:
        state = "not started" if self._popen is None else (
            "running" if self.poll() is None else describe_exit(self.poll()))
        return f"ProcessTree(pid={self.pid}, {state}, argv={self.argv[:3]}...)"
