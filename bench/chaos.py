"""Chaos run: attack a real paddlerun job with random faults, then prove nothing was lost.

    python bench/chaos.py                                      # 9 faults, one of each kind, seed 1 (~4-5 min on 2 cores)
    python bench/chaos.py --faults 4 --seed 1 --json out.json  # fewer faults; the figures as JSON too
    python bench/chaos.py --faults 50 --seed 2024 --hang-timeout 15 --json chaos-50.json   # the soak (~15-25 min)
    python bench/chaos.py --faults 8 --seed 3 --reference-digest SHA256  # skip the uninterrupted run
    python bench/chaos.py --faults 12 --seed 7 --plan          # print the schedule only; start nothing

It trains the default job (``configs/mnist_lenet.yaml``, 2 CPU workers) for a few hundred
steps (``--max-steps``, default max(300, 100 + 20 x faults)) in a fresh run directory, once
without faults (the reference digest and wall time) and once under attack: ``--faults K``
faults at moments drawn from ``--seed S``. The same seed (and ``--faults``, ``--max-steps``,
``--nproc``) gives the same schedule: the kind, the victim rank and the trigger step of
every fault. A fault fires when the heartbeats of the running attempt show every rank past
its trigger step (polled every 50 ms) and the attempt has trained at least one step;
heartbeats are written every 0.25 s (~10 steps), so the step a fault actually lands on
(rank 0's last step in ``metrics.jsonl``, written every step) is a few steps later and
varies with timing. Both are reported. The supervisor runs with ``hang_timeout_s``
``--hang-timeout`` (default 8 s; it also bounds a worker's start-up, which takes more than
8 s on a busy 2-core machine), ``max_restarts`` and ``max_failures_in_window`` K + 3 and a
0.2 s backoff.

The kinds (each block of len(Kind) faults in the schedule is a shuffled set of all of them):

==============  ==================================================  ==============================
kind            what is done                                        what must be in events.jsonl
==============  ==================================================  ==============================
worker_kill     SIGKILL the victim rank (pid from its heartbeat)    worker_failed "rank R killed by SIGKILL"
launch_kill     SIGKILL the launch process (pid from the newest     worker_failed naming the launch
                ``started`` event)                                  process and SIGKILL
worker_stop     SIGSTOP the victim rank: a hang                     hang_detected naming the rank
preempt         SIGTERM the supervisor; expect exit 75, rerun       preempted
persist_kill    when a ``.staging-step-*`` directory appears:       worker_failed "rank 0 killed by SIGKILL"
                SIGSTOP rank 0, check the staging directory is
                still there (the commit has not happened), SIGKILL
                it (else SIGCONT and wait for the next snapshot)
corrupt         as preempt; while the run is stopped, flip a byte   preempted; the rerun's workers log
                in ``model.safetensors`` of the newest complete     "skipping snapshot" naming the file
                snapshot, then rerun                                and resume from an older one
supervisor_kill SIGKILL the supervisor only; every process of the   exit -9; a worker logs "its
                run must be gone within 15 s (its workers watch     supervisor, pid P, is gone"
                it), then rerun
startup_preempt SIGKILL a worker (rank: salt % nproc); the moment   worker_failed "rank R killed by
                the restart's attempt has started (no heartbeat     SIGKILL"; the next attempt's
                yet), SIGTERM the supervisor; expect exit 75 (it    preempted "nothing to save ...",
                has nothing to save: no grace), rerun               exit 75
second_job      start a second ``paddlerun run`` (run dir           (in ``second-N.log``) the second
                ``second-N/``, one worker) on the same              job fails with WriterBusyError
                checkpoints directory, its rank 0 held at a test    naming rank 0's pid; the staging
                gate before its claim; freeze the run (SIGSTOP      directory is still there when it
                rank 0 the moment a ``.staging-step-*`` directory   has failed; the run goes on
                appears, as persist_kill, then the supervisor and   (a snapshot committed later)
                the rest), open the gate, thaw the run once the
                second job's rank 0 failed. No restart
==============  ==================================================  ==============================

At the end every check must pass for exit 0: the run succeeded; every scheduled fault was
injected; the final digest equals the uninterrupted run's; no process whose command line
names the run directory is left (also checked after every exit 75); no corrupted snapshot
was ever resumed from (until a new snapshot of its step replaced it), and each was skipped
with a warning naming the file; every fault is in ``events.jsonl`` with its cause (and an
interrupted persist's staging directory was removed with a warning). The table also gives,
per fault, the step its attempt reached (its last step in ``metrics.jsonl``) and the step
the next attempt resumed from; the steps redone (their difference, summed); the restarts,
the reruns and the wall time against the uninterrupted run. Listed apart, failing no
check: failures no fault explains (e.g. a slow start-up taken for a hang) and root causes
that name another rank than the one attacked.

Everything the run leaves is kept in ``--work-dir`` (default: a new directory under $TMPDIR):
``reference/`` and ``run/`` (run directories), ``supervisor-N.log`` (the output of each
``paddlerun run``). Ctrl-C (or SIGTERM) stops the chaos run and kills every process of it.
Imports no paddle.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import psutil

from paddlerun.trainer.checkpoint import CheckpointStore
from paddlerun.trainer.rundir.events import read_events
from paddlerun.trainer.rundir.heartbeat import Heartbeat, read_heartbeats
from paddlerun.trainer.rundir.process_identity import ProcessIdentity

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "mnist_lenet.yaml"

POLL_S = 0.05
#: How often the checkpoints directory is looked at while waiting for a persist.
PERSIST_POLL_S = 0.002
EVERY_STEPS = 10
#: second_job: the longest the run stays frozen while the second job starts.
FREEZE_S = 20.0
HEARTBEAT_S = 0.25
#: Exit code of a preempted ``paddlerun run`` (docs/failures.md#preemption-and-exit-codes).
REQUEUE = 75
#: No trigger before this step (two snapshots exist, so a corrupted newest one has a
#: fallback) nor within this many steps of the end (the heartbeats lag ~10 steps).
FIRST_TRIGGER = 25
END_MARGIN = 40
STEPS_PER_EPOCH = 63  # 4,000 MNIST digits, global batch 64

_RESUMED = re.compile(r"resumed from (\S+): step (\d+)")
_SKIPPED = re.compile(r"skipping snapshot (\S+?):? (.*)")


class Kind(str, Enum):
    """The faults; the module docstring says how each is injected and what must show."""
    WORKER_KILL = "worker_kill"
    LAUNCH_KILL = "launch_kill"
    WORKER_STOP = "worker_stop"
    PREEMPT = "preempt"
    PERSIST_KILL = "persist_kill"
    CORRUPT = "corrupt"
    SUPERVISOR_KILL = "supervisor_kill"
    STARTUP_PREEMPT = "startup_preempt"
    SECOND_JOB = "second_job"


#: Faults after which the run is stopped (exit 75, or the supervisor is killed) and the
#: same command is run again.
RERUN_KINDS = {Kind.PREEMPT, Kind.CORRUPT, Kind.SUPERVISOR_KILL, Kind.STARTUP_PREEMPT}
#: How long the job of a SIGKILLed supervisor may take to stop by itself.
ORPHAN_EXIT_S = 15.0


@dataclass(frozen=True)
class Fault:
    """One planned fault: what, to which rank, from which step; ``salt`` seeds any later choice."""
    index: int
    kind: Kind
    trigger_step: int
    rank: Optional[int]
    salt: int


@dataclass
class Injection:
    """What happened when a fault was injected (filled in as the run goes)."""
    fault: Fault
    attempt: int = -1
    at: float = 0.0
    trigger_seen: int = -1      # the heartbeat step that fired it
    landed_step: int = -1       # rank 0's last logged step when it was injected
    pid: Optional[int] = None
    exit_code: Optional[int] = None   # preempt / corrupt: the supervisor's exit code
    mid_persist: Optional[bool] = None
    staging: Optional[str] = None
    corrupted: Optional[str] = None   # corrupt: the file altered
    corrupted_offset: Optional[int] = None
    corrupted_at: Optional[float] = None
    #: supervisor_kill: seconds until no process of the run was left; startup_preempt:
    #: seconds from the SIGTERM to the supervisor's exit.
    stopped_s: Optional[float] = None
    second_refused: Optional[bool] = None  # second_job: it failed naming rank 0's pid
    staging_kept: Optional[bool] = None    # second_job: the staging dir survived it
    note: str = ""


@dataclass(frozen=True)
class Job:
    """The job both runs train: the default config with a few sets (the same for both)."""
    max_steps: int
    nproc: int
    max_restarts: int
    hang_timeout_s: float

    def sets(self) -> List[str]:
        return [
            "job.name=chaos",
            f"launch.nproc_per_node={self.nproc}",
            f"train.max_steps={self.max_steps}",
            f"train.epochs={self.max_steps // (STEPS_PER_EPOCH - 1) + 1}",
            "train.log_every_steps=1",
            f"checkpoint.every_steps={EVERY_STEPS}",
            f"supervisor.heartbeat_interval_s={HEARTBEAT_S}",
            f"supervisor.hang_timeout_s={self.hang_timeout_s:g}",
            "supervisor.backoff_s=0.2",
            "supervisor.backoff_max_s=1",
            f"supervisor.max_restarts={self.max_restarts}",
            f"supervisor.max_failures_in_window={self.max_restarts}",
            "supervisor.preempt_grace_s=60",
        ]

    def argv(self, run_dir: Path) -> List[str]:
        argv = [sys.executable, "-m", "paddlerun.launcher.cli", "run", str(CONFIG),
                "--run-dir", str(run_dir)]
        for item in self.sets():
            argv += ["--set", item]
        return argv


class ChaosError(RuntimeError):
    """The chaos run itself could not go on (a timeout, a run that will not start)."""


# ---------------------------------------------------------------------------- schedule

def default_max_steps(faults: int) -> int:
    """Room for the faults: each attempt trains a heartbeat or two (~10-25 steps) before the
    next fault can fire, so triggers closer than that drift later and later."""
    return max(300, 100 + 20 * faults)


def plan(seed: int, faults: int, max_steps: int, nproc: int = 2) -> List[Fault]:
    """The schedule: a pure function of its arguments (no clock, no processes)."""
    lo, hi = FIRST_TRIGGER, max_steps - END_MARGIN
    if faults < 0:
        raise ValueError(f"--faults must be >= 0, got {faults}")
    if hi - lo + 1 < faults:
        raise ValueError(f"--max-steps {max_steps} leaves room for {max(hi - lo + 1, 0)} trigger "
                         f"steps, not {faults}; raise --max-steps to at least "
                         f"{faults + FIRST_TRIGGER + END_MARGIN}")
    rng = random.Random(seed)
    kinds: List[Kind] = []
    while len(kinds) < faults:
        block = list(Kind)
        rng.shuffle(block)
        kinds += block
    steps = sorted(rng.sample(range(lo, hi + 1), faults))
    schedule = []
    for i, (kind, step) in enumerate(zip(kinds, steps)):
        rank = rng.randrange(nproc) if kind in (Kind.WORKER_KILL, Kind.WORKER_STOP) else \
            0 if kind is Kind.PERSIST_KILL else None
        schedule.append(Fault(i + 1, kind, step, rank, rng.getrandbits(32)))
    return schedule


# ---------------------------------------------------------------------------- the run directory

def events(run_dir: Path) -> List[dict]:
    return read_events(run_dir / "events.jsonl")


def latest_started(run_dir: Path) -> Optional[dict]:
    started = [e for e in events(run_dir) if e["event"] == "started"]
    return started[-1] if started else None


def last_logged_step(run_dir: Path, attempt: Optional[int] = None) -> int:
    """Rank 0's last training step in metrics.jsonl (of ``attempt``, if given); -1 if none."""
    best = -1
    for record in metrics(run_dir):
        if "loss" in record and (attempt is None or record.get("attempt") == attempt):
            best = max(best, record["step"])
    return best


def last_metrics_record(run_dir: Path) -> Optional[dict]:
    """The last complete line of metrics.jsonl (read from the end: the file grows)."""
    try:
        with open(run_dir / "metrics.jsonl", "rb") as f:
            f.seek(0, 2)
            f.seek(max(f.tell() - 4096, 0))
            lines = f.read().split(b"\n")[:-1]  # the last piece is partial or empty
    except FileNotFoundError:
        return None
    for raw in reversed(lines):
        try:
            return json.loads(raw)
        except ValueError:
            continue
    return None


def metrics(run_dir: Path) -> List[dict]:
    out = []
    try:
        text = (run_dir / "metrics.jsonl").read_text(errors="replace")
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line being written
    return out


def worker_log_lines(run_dir: Path, attempt: int) -> Dict[int, List[str]]:
    """rank -> the lines of logs/attempt-N/workerlog.RANK."""
    out = {}
    for path in sorted((run_dir / "logs" / f"attempt-{attempt}").glob("workerlog.*")):
        suffix = path.name.split(".", 1)[1]
        if suffix.isdigit():
            out[int(suffix)] = path.read_text(errors="replace").splitlines()
    return out


def resumed_from(run_dir: Path, attempt: int) -> Dict[int, Tuple[str, int]]:
    """rank -> (snapshot path, step) from the "resumed from" lines of an attempt."""
    out = {}
    for rank, lines in worker_log_lines(run_dir, attempt).items():
        for line in lines:
            m = _RESUMED.search(line)
            if m:
                out[rank] = (m.group(1), int(m.group(2)))
    return out


def processes_of(path: Path) -> List[psutil.Process]:
    """Every live process whose command line names ``path`` (supervisor, launch, workers);
    never this process or its ancestors (a ``timeout`` or shell that started us)."""
    found, needle = [], str(path)
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid in mine:
                continue
            if any(needle in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def kill_all(path: Path, timeout_s: float = 15.0) -> List[int]:
    """SIGKILL every process of ``path`` (supervisors first, so nothing restarts); returns
    the pids killed. SIGKILL also ends a SIGSTOPped process."""
    killed: List[int] = []
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        procs = processes_of(path)
        if not procs:
            break
        procs.sort(key=lambda p: 0 if "paddlerun.launcher.cli" in " ".join(p.cmdline()) else 1)
        for proc in procs:
            try:
                proc.kill()
                killed.append(proc.pid)
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=2)
    return sorted(set(killed))


def wait_until(predicate, timeout_s: float, what: str, interval: float = POLL_S):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise ChaosError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def flip_byte(path: Path, salt: int) -> int:
    """XOR one byte of a safetensors file's tensor data with 0xFF (size unchanged); returns
    its offset. The header (8-byte length + JSON) is left alone so the file still parses:
    only the sha256 in the manifest can tell."""
    data_start = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    size = path.stat().st_size
    offset = data_start + random.Random(salt).randrange(size - data_start)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())
    return offset


# ---------------------------------------------------------------------------- the attack

class Chaos:
    """Runs the job in ``run_dir`` and injects ``schedule``, one fault per attempt."""

    def __init__(self, job: Job, schedule: Sequence[Fault], work_dir: Path, timeout_s: float,
                 say=print):
        self.job = job
        self.schedule = list(schedule)
        self.work_dir = work_dir
        self.run_dir = work_dir / "run"
        self.deadline = time.time() + timeout_s
        self.say = say
        self.proc: Optional[subprocess.Popen] = None
        self.invocations = 0
        self.exit_codes: List[int] = []
        self.injections: List[Injection] = []
        self.leftovers: List[str] = []
        self.stopped_pids: List[Tuple[int, int]] = []  # (pid, start_ticks)
        self.started_at = 0.0
        self.wall_s = 0.0
        self.error: Optional[str] = None
        #: second_job faults: their second ``paddlerun run``, started ahead (by fault index).
        self.second_jobs: Dict[int, subprocess.Popen] = {}

    # -- processes

    def _start(self) -> None:
        log = open(self.work_dir / f"supervisor-{self.invocations}.log", "ab")
        try:
            self.proc = subprocess.Popen(self.job.argv(self.run_dir), cwd=REPO, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        self.invocations += 1

    def _remaining(self, cap: float) -> float:
        left = self.deadline - time.time()
        if left <= 0:
            raise ChaosError("the chaos run ran out of time (--timeout)")
        return min(cap, left)

    def _wait_exit(self, cap: float, what: str) -> int:
        timeout = self._remaining(cap)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            why = "" if timeout == cap else " (the rest of --timeout)"
            raise ChaosError(f"paddlerun did not exit within {timeout:.0f} s{why} {what}") from None
        self.exit_codes.append(code)
        return code

    def _check_nothing_left(self, when: str) -> None:
        try:
            wait_until(lambda: not processes_of(self.run_dir), 15, "the run's processes to end")
        except ChaosError:
            left = processes_of(self.run_dir)
            self.leftovers.append(f"{when}: " + ", ".join(
                f"pid {p.pid} ({' '.join(p.cmdline())[:100]})" for p in left))
            kill_all(self.run_dir)

    # -- the main loop

    def run(self) -> None:
        self.run_dir.mkdir(parents=True)
        self.started_at = time.time()
        try:
            self._start()
            for fault in self.schedule:
                inj = Injection(fault)
                if fault.kind is Kind.SECOND_JOB:
                    self._start_second_job(fault)  # it starts up while the run trains
                while True:
                    fired = self._wait_for_trigger(fault)
                    if fired is None:
                        break
                    inj.attempt, beats = fired
                    try:
                        self._inject(inj, beats)
                        break
                    except psutil.NoSuchProcess as e:  # the attempt failed on its own meanwhile
                        self.say(f"chaos: fault {fault.index}: pid {e.pid} vanished before it "
                                 f"was hit; waiting for the next attempt")
                        self._wait_for_next_attempt(inj.attempt)
                if fired is None:
                    self.error = (f"fault {fault.index} ({fault.kind.value} at step "
                                  f"{fault.trigger_step}) was never injected: paddlerun exited "
                                  f"with {self.proc.returncode} first")
                    self.say(f"chaos: {self.error}")
                    break
                inj.trigger_seen = min(hb.step for hb in beats.values())
                self.injections.append(inj)
                inj.landed_step = max(last_logged_step(self.run_dir, inj.attempt), inj.landed_step)
                self.say(f"chaos: fault {fault.index}/{len(self.schedule)} {fault.kind.value}"
                         f"{'' if fault.rank is None else f' rank {fault.rank}'}: attempt "
                         f"{inj.attempt}, trigger step {fault.trigger_step}, landed at step "
                         f"{inj.landed_step}{f' ({inj.note})' if inj.note else ''}")
                if fault.kind in RERUN_KINDS:
                    self._stop_and_rerun(inj)
                elif fault.kind is not Kind.SECOND_JOB:  # that one must not stop the run
                    self._wait_for_next_attempt(inj.attempt)
            else:
                code = self._wait_exit(1800, "after the last fault")
                self.say(f"chaos: paddlerun exited with {code}")
        finally:
            self.wall_s = time.time() - self.started_at
            if self.proc is not None and self.proc.poll() is None:
                self.say("chaos: stopping the run")
            kill_all(self.run_dir)

    def _wait_for_trigger(self, fault: Fault) -> Optional[Tuple[int, Dict[int, Heartbeat]]]:
        """Wait until the heartbeats of every rank of the running attempt are past the
        trigger step, and the attempt has trained a step (its own line in metrics.jsonl);
        None if paddlerun exits first."""
        hb_dir = self.run_dir / "heartbeats"
        deadline = time.time() + self._remaining(900)
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.exit_codes.append(self.proc.returncode)
                return None
            started = latest_started(self.run_dir)
            if started is not None:
                attempt = started["attempt"]
                beats = read_heartbeats(hb_dir, attempt=attempt)
                if len(beats) == self.job.nproc and all(hb.phase not in ("init", "done")
                                                        for hb in beats.values()) \
                        and min(hb.step for hb in beats.values()) >= fault.trigger_step:
                    last = last_metrics_record(self.run_dir)
                    if last is not None and last.get("attempt") == attempt and "loss" in last:
                        return attempt, beats
            time.sleep(POLL_S)
        raise ChaosError(f"fault {fault.index}: step {fault.trigger_step} not reached in time")

    def _wait_for_next_attempt(self, attempt: int) -> None:
        def next_started():
            if self.proc.poll() is not None:
                return True
            started = latest_started(self.run_dir)
            return started is not None and started["attempt"] > attempt
        wait_until(next_started, self._remaining(120), f"attempt {attempt + 1} to start")

    def _stop_and_rerun(self, inj: Injection) -> None:
        inj.exit_code = self._wait_exit(120, "after SIGTERM")
        if inj.fault.kind is Kind.STARTUP_PREEMPT:
            inj.stopped_s = time.time() - inj.at
            inj.note = f"exit {inj.exit_code} {inj.stopped_s:.1f} s after SIGTERM in attempt {inj.attempt + 1}"
        if inj.fault.kind is Kind.SUPERVISOR_KILL:
            try:
                wait_until(lambda: not processes_of(self.run_dir), ORPHAN_EXIT_S,
                           "the killed supervisor's job to stop by itself")
                inj.stopped_s = time.time() - inj.at
                inj.note = f"its job was gone {inj.stopped_s:.1f} s after the SIGKILL"
            except ChaosError:
                inj.note = f"its job was still running {ORPHAN_EXIT_S:.0f} s after the SIGKILL"
        self._check_nothing_left(f"after the exit of attempt {inj.attempt} (code {inj.exit_code})")
        if inj.fault.kind is Kind.CORRUPT:
            self._corrupt_newest(inj)
        before = latest_started(self.run_dir)
        self._start()
        # The next fault waits for the rerun's own attempt: until it starts one, the heartbeats
        # are the last run's, and a signal sent on them would hit the rerun while it starts up.
        self._wait_for_next_attempt(before["attempt"] if before else -1)

    # -- the faults

    def _inject(self, inj: Injection, beats: Dict[int, Heartbeat]) -> None:
        fault = inj.fault
        inj.at = time.time()
        if fault.kind in (Kind.WORKER_KILL, Kind.WORKER_STOP):
            hb = beats[fault.rank]
            inj.pid = hb.pid
            sig = signal.SIGKILL if fault.kind is Kind.WORKER_KILL else signal.SIGSTOP
            if not hb.identity.send_signal(sig):
                raise psutil.NoSuchProcess(hb.pid)  # rank gone (its pid perhaps reused)
            if fault.kind is Kind.WORKER_STOP:
                self.stopped_pids.append((hb.pid, hb.start_ticks))
        elif fault.kind is Kind.LAUNCH_KILL:
            started = latest_started(self.run_dir)
            proc = psutil.Process(started["pid"])
            if not any(str(self.run_dir) in part for part in proc.cmdline()):
                raise ChaosError(f"pid {started['pid']} is not this run's launch process")
            inj.pid = proc.pid
            proc.send_signal(signal.SIGKILL)
        elif fault.kind is Kind.SUPERVISOR_KILL:
            inj.pid = self.proc.pid
            self.proc.send_signal(signal.SIGKILL)
        elif fault.kind is Kind.STARTUP_PREEMPT:
            hb = beats[fault.salt % self.job.nproc]
            inj.pid = hb.pid
            if not hb.identity.send_signal(signal.SIGKILL):
                raise psutil.NoSuchProcess(hb.pid)
            self._wait_for_next_attempt(inj.attempt)  # started: no heartbeat of it yet
            inj.at = time.time()
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
        elif fault.kind in RERUN_KINDS:
            inj.pid = self.proc.pid
            self.proc.send_signal(signal.SIGTERM)
        elif fault.kind is Kind.PERSIST_KILL:
            self._kill_mid_persist(inj, beats[0])
        elif fault.kind is Kind.SECOND_JOB:
            self._second_job_mid_persist(inj, beats[0])
        inj.landed_step = last_logged_step(self.run_dir, inj.attempt)

    def _rank0(self, inj: Injection, hb: Heartbeat) -> psutil.Process:
        proc = psutil.Process(hb.pid)  # psutil checks the process's start time before each signal
        if not hb.identity.alive():
            raise psutil.NoSuchProcess(hb.pid)  # rank 0 gone (its pid perhaps reused)
        inj.pid = hb.pid
        return proc

    def _kill_mid_persist(self, inj: Injection, hb: Heartbeat) -> None:
        """SIGKILL rank 0 while it is writing a snapshot: stop it the moment a staging
        directory appears, make sure the commit has not happened yet, then kill it."""
        proc = self._rank0(inj, hb)
        staging, misses = self._stop_mid_persist(proc)
        if staging is not None:
            proc.send_signal(signal.SIGKILL)
            inj.mid_persist, inj.staging = True, staging
            inj.note = f"killed while writing {staging}" + (f" after {misses} missed" if misses else "")
            return
        inj.mid_persist = False
        if not proc.is_running():
            raise psutil.NoSuchProcess(hb.pid)
        proc.send_signal(signal.SIGKILL)  # no persist caught in time: still kill rank 0, say so
        inj.note = f"no persist caught ({misses} missed): killed rank 0 outside a persist"

    def _second_job_paths(self, fault: Fault) -> Tuple[Path, Path, Path]:
        return (self.work_dir / f"second-{fault.index}", self.work_dir / f"second-{fault.index}.log",
                self.work_dir / f"second-{fault.index}.gate")

    def _start_second_job(self, fault: Fault) -> None:
        """Start the second job of ``fault`` (one worker; no start-up or hang timeout of its
        own): its rank 0 waits at the gate before its claim until the fault fires."""
        second_dir, log_path, gate = self._second_job_paths(fault)
        argv = self.job.argv(second_dir) + [
            "--set", f"checkpoint.dir={self.run_dir / 'checkpoints'}", "--set", "launch.nproc_per_node=1",
            "--set", "supervisor.hang_timeout_s=3600", "--set", "supervisor.start_timeout_s=3600"]
        with open(log_path, "wb") as log:
            self.second_jobs[fault.index] = subprocess.Popen(
                argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PADDLERUN_TEST_GATE_BEFORE_CLAIM": str(gate)})

    def _second_job_mid_persist(self, inj: Injection, hb: Heartbeat) -> None:
        """A second ``paddlerun run`` on this run's checkpoints directory claims it while rank
        0 is in the middle of a persist: it must fail naming rank 0's pid before it removes
        anything (the staging directory must survive it), and the run must go on.

        The second job (one worker) was started when the fault before this one fired; its
        rank 0 waits before its claim at a test gate (PADDLERUN_TEST_GATE_BEFORE_CLAIM).
        Here the run is frozen (SIGSTOP: rank 0 the moment a staging directory appears, then
        the supervisor and the rest, as a paused VM) and the gate opened. Its start-up
        (import paddle: 3-30 s on a busy machine) thus never counts against the run; the
        run is frozen only from the persist to the second job's failure (about a second),
        at most FREEZE_S (a rank in an all-reduce times out after 30 s of wall time), and
        the supervisor is thawed only once both ranks have stepped on."""
        proc = self._rank0(inj, hb)
        ckpt = self.run_dir / "checkpoints"
        second_dir, log_path, gate = self._second_job_paths(inj.fault)
        second = self.second_jobs[inj.fault.index]
        failed_file = second_dir / "errors" / "attempt-0" / "rank-0.json"
        frozen: List[psutil.Process] = []
        staging, thawed, misses, killed = None, False, 0, False
        try:
            wait_until(lambda: second.poll() is not None or Path(f"{gate}.waiting").exists(),
                       self._remaining(300), "the second job's rank 0 to reach its claim")
            staging, misses = self._stop_mid_persist(proc)
            if staging is None:
                proc.send_signal(signal.SIGSTOP)  # freeze the run all the same
            steps = {r: b.step for r, b in read_heartbeats(self.run_dir / "heartbeats",
                                                           attempt=inj.attempt).items()}
            frozen = [proc] + self._freeze_the_rest(proc.pid)
            gate.touch()
            try:
                wait_until(lambda: second.poll() is not None or failed_file.exists(),
                           self._remaining(FREEZE_S), "the second job's rank 0 to fail")
            except ChaosError:
                kill_all(second_dir)  # before the thaw: it must never find the directory free
                killed = True
                inj.note = f"the second job did not fail within {FREEZE_S:g} s of its claim: killed; "
            inj.staging_kept = staging is None or (ckpt / staging).is_dir()
            self._thaw(frozen, steps)
            thawed = True
            try:
                code = second.wait(timeout=self._remaining(120))
                inj.exit_code = None if killed else code
            except subprocess.TimeoutExpired:
                inj.note += "the second job did not exit within 120 s; "
        finally:
            if not thawed:
                for p in frozen:
                    with contextlib.suppress(psutil.Error):
                        p.send_signal(signal.SIGCONT)
            left = kill_all(second_dir)
            if left and inj.exit_code is not None:
                self.leftovers.append(f"after the second job of fault {inj.fault.index} exited: "
                                      f"pids {left} of {second_dir}")
        out = log_path.read_text(errors="replace")
        inj.second_refused = inj.exit_code not in (None, 0) and "WriterBusyError" in out \
            and f"pid {hb.pid}," in out
        inj.mid_persist, inj.staging = staging is not None, staging
        inj.note += (f"second job claimed while rank 0 was stopped writing {staging}" if staging
                     else f"no persist caught ({misses} missed): second job claimed outside one")
        inj.note += f"; it exited {inj.exit_code}" + ("" if inj.staging_kept else
                                                       f"; {staging} was REMOVED by it")

    def _freeze_the_rest(self, rank0_pid: int) -> List[psutil.Process]:
        """SIGSTOP the run's supervisor first (so it sees nothing), then its other processes."""
        second = str(self.work_dir / "second-")  # a second job names the run's checkpoints too
        procs = []
        for p in processes_of(self.run_dir):
            with contextlib.suppress(psutil.Error):
                if p.pid != rank0_pid and not any(second in part for part in p.cmdline()):
                    procs.append(p)
        procs.sort(key=lambda p: p.pid != self.proc.pid)
        stopped = []
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGSTOP)
                stopped.append(p)
        return stopped

    def _thaw(self, frozen: List[psutil.Process], steps: Dict[int, int]) -> None:
        """SIGCONT the workers and the launcher, wait until every rank has stepped on (fresh
        heartbeats, fresh progress), then the supervisor."""
        supervisor = [p for p in frozen if p.pid == self.proc.pid]
        for p in frozen:
            if p.pid != self.proc.pid:
                with contextlib.suppress(psutil.Error):
                    p.send_signal(signal.SIGCONT)

        def stepped_on():
            beats = read_heartbeats(self.run_dir / "heartbeats")
            return all(r in beats and (beats[r].step > s or beats[r].phase == "done")
                       for r, s in steps.items())
        try:
            wait_until(stepped_on, self._remaining(60), "the ranks to step on after the thaw")
        except ChaosError:
            pass  # the supervisor judges it
        for p in supervisor:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGCONT)

    def _stop_mid_persist(self, proc: psutil.Process) -> Tuple[Optional[str], int]:
        """SIGSTOP rank 0 the moment a new staging directory appears while its commit has not
        happened; returns that directory's name (rank 0 left stopped) and how many persists
        committed before it could be stopped; (None, misses) after 60 s without one."""
        ckpt = self.run_dir / "checkpoints"

        def staging_dirs():
            try:
                return {e.name for e in os.scandir(ckpt) if e.name.startswith(".staging-step-")}
            except FileNotFoundError:
                return set()

        ignore = staging_dirs()
        misses = 0
        deadline = time.time() + self._remaining(60)
        while time.time() < deadline and proc.is_running():
            new = sorted(staging_dirs() - ignore)
            if new:
                proc.send_signal(signal.SIGSTOP)
                staging = ckpt / new[0]
                final = ckpt / new[0].replace(".staging-", "", 1)
                if staging.is_dir() and not (final / "manifest.json").exists():
                    return new[0], misses
                proc.send_signal(signal.SIGCONT)  # the commit beat us: try the next snapshot
                ignore.update(new)
                misses += 1
            time.sleep(PERSIST_POLL_S)
        return None, misses

    def _corrupt_newest(self, inj: Injection) -> None:
        store = CheckpointStore(self.run_dir / "checkpoints")
        complete = [i for i in store.snapshots(verify=True) if i.complete]
        if len(complete) < 2:
            inj.note = f"only {len(complete)} complete snapshot(s): nothing older to fall back to"
        if not complete:
            return
        target = complete[-1].path / "model.safetensors"
        inj.corrupted = str(target)
        inj.corrupted_offset = flip_byte(target, inj.fault.salt)
        inj.corrupted_at = time.time()
        inj.note = f"flipped byte {inj.corrupted_offset} of {complete[-1].path.name}/model.safetensors"
        self.say(f"chaos: {inj.note}")


# ---------------------------------------------------------------------------- what survived

@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class Report:
    seed: int
    faults: int
    job: Job
    schedule: List[Fault]
    injections: List[Injection]
    reference_digest: Optional[str]
    reference_wall_s: Optional[float]
    digest: Optional[str]
    wall_s: float
    exit_codes: List[int]
    restarts: int
    reruns: int
    attempts: int
    steps_redone: int
    redone_by_attempt: Dict[int, Tuple[int, int]]
    causes: Dict[int, str]
    recovered: Dict[int, bool]
    unplanned: List[str]
    root_cause_mismatches: List[str]
    checks: List[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)


def expected_evidence(inj: Injection, evs: List[dict], run_dir: Path) -> Tuple[bool, str]:
    """Whether events.jsonl shows this fault with its cause; and the evidence found."""
    fault, a = inj.fault, inj.attempt
    failed = [e for e in evs if e["event"] == "worker_failed" and e["attempt"] == a]
    cause = failed[0]["cause"] if failed else ""
    if fault.kind in (Kind.WORKER_KILL, Kind.PERSIST_KILL):
        want = f"rank {fault.rank} killed by SIGKILL"
        ok, evidence = cause == want, f"worker_failed: {cause}" if failed else "no worker_failed"
        if fault.kind is Kind.PERSIST_KILL and inj.mid_persist:
            # The interrupted persist left its staging directory: either the survivor's
            # emergency snapshot of that very step completed it, or it is removed, with a
            # warning, when rank 0 starts again; never read as a snapshot.
            step = int(inj.staging.rsplit("-", 1)[1])
            completed = any(e["event"] == "snapshot_committed" and e.get("reason") == "emergency"
                            and e.get("step") == step and e["attempt"] == a for e in evs)
            cleaned = any(inj.staging in line and "removing stale" in line
                          for b in range(a + 1, a + 20)
                          for line in worker_log_lines(run_dir, b).get(0, ()))
            ok = ok and (completed or cleaned) and not (run_dir / "checkpoints" / inj.staging).exists()
            evidence += f"; {inj.staging} " + ("completed by the emergency snapshot" if completed
                                                else "removed with a warning" if cleaned
                                                else "NOT cleaned")
        return ok, evidence
    if fault.kind is Kind.SECOND_JOB:
        # Refused, nothing of this run's removed, and the run went on (no failure of its own).
        went_on = any(e["event"] in ("snapshot_committed", "succeeded") and e["time"] > inj.at
                      for e in evs)
        ok = bool(inj.second_refused) and bool(inj.staging_kept) and went_on
        return ok, ("second job refused (WriterBusyError naming rank 0)" if inj.second_refused
                    else f"second job NOT refused (exit {inj.exit_code})") + \
            (f"; {inj.staging} kept" if inj.staging and inj.staging_kept else
             f"; {inj.staging} REMOVED" if inj.staging else "") + \
            ("" if went_on else "; the run did not go on")
    if fault.kind is Kind.LAUNCH_KILL:
        ok = "launch process" in cause and "SIGKILL" in cause
        return ok, f"worker_failed: {cause}" if failed else "no worker_failed"
    if fault.kind is Kind.SUPERVISOR_KILL:
        said = any(f"its supervisor, pid {inj.pid}, is gone" in line
                   for lines in worker_log_lines(run_dir, a).values() for line in lines)
        ok = inj.exit_code == -signal.SIGKILL and said
        return ok, (f"exit {inj.exit_code}; " + ("a worker logged that its supervisor was gone"
                                                  if said else "NO worker logged its supervisor gone"))
    if fault.kind is Kind.STARTUP_PREEMPT:
        preempted = [e for e in evs if e["event"] == "preempted" and e["attempt"] == a + 1]
        how = preempted[0].get("how", "") if preempted else ""
        ok = cause.startswith("rank ") and "killed by SIGKILL" in cause and \
            how.startswith("nothing to save") and inj.exit_code == REQUEUE
        return ok, (f"worker_failed: {cause}; attempt {a + 1} preempted ({how}), exit {inj.exit_code}"
                    if preempted else f"worker_failed: {cause}; no preempted event in attempt {a + 1}")
    if fault.kind is Kind.WORKER_STOP:
        hangs = [e for e in evs if e["event"] == "hang_detected" and e["attempt"] == a]
        ranks = hangs[0].get("ranks", {}) if hangs else {}
        ok = str(fault.rank) in ranks
        return ok, (f"hang_detected: rank {', '.join(sorted(ranks))}" if hangs
                    else "no hang_detected")
    preempted = [e for e in evs if e["event"] == "preempted" and e["attempt"] == a]
    ok = bool(preempted) and inj.exit_code == REQUEUE
    how = preempted[0].get("how", "") if preempted else ""
    return ok, (f"preempted ({how}), exit {inj.exit_code}" if preempted
                else f"no preempted event, exit {inj.exit_code}")


def root_cause_mismatch(inj: Injection, evs: List[dict]) -> Optional[str]:
    """For a fault with a victim rank: the worker_failed root cause if it names another rank."""
    if inj.fault.rank is None:
        return None
    failed = [e for e in evs if e["event"] == "worker_failed" and e["attempt"] == inj.attempt]
    if failed and failed[0].get("rank") != inj.fault.rank:
        return (f"fault {inj.fault.index} ({inj.fault.kind.value} of rank {inj.fault.rank}, "
                f"attempt {inj.attempt}): the root cause names rank {failed[0].get('rank')}: "
                f"{failed[0].get('cause')}")
    return None


def attempt_steps(run_dir: Path, attempts: Sequence[int]) -> Dict[int, Tuple[Optional[int], int]]:
    """attempt -> (the step it resumed from: 0 from scratch, None if it never got that far;
    the last step it reached: its last logged step, else where it resumed, else -1)."""
    out = {}
    logged: Dict[int, int] = {}
    for record in metrics(run_dir):
        if "loss" in record:
            logged[record["attempt"]] = max(logged.get(record["attempt"], -1), record["step"])
    for a in attempts:
        lines = worker_log_lines(run_dir, a).get(0, [])
        start: Optional[int] = None
        for line in lines:
            m = _RESUMED.search(line)
            if m:
                start = int(m.group(2))
        if start is None and (a in logged or any("snapshots found" in line for line in lines)):
            start = 0
        out[a] = (start, logged.get(a, start if start is not None else -1))
    return out


def analyse(chaos: Chaos, seed: int, reference_digest: Optional[str],
            reference_wall_s: Optional[float]) -> Report:
    run_dir = chaos.run_dir
    evs = events(run_dir)
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    started = sorted({e["attempt"] for e in evs if e["event"] == "started"})
    ended = {e["attempt"]: e for e in evs if e["event"] in ("worker_failed", "preempted")}
    steps = attempt_steps(run_dir, started)

    # Steps redone: whenever an attempt resumes, the steps between where the last attempt
    # that trained got to and where this one starts are trained again. An attempt that
    # failed before restoring (a slow start) neither adds nor redoes anything.
    redone: Dict[int, Tuple[int, int]] = {}  # failed attempt -> (step reached, step resumed)
    reached, reached_in = 0, None
    for a in started:
        start, end = steps[a]
        if start is None:
            continue
        if reached_in is not None:
            redone[reached_in] = (reached, start)
        reached, reached_in = max(end, start), a
    steps_redone = sum(max(c - r, 0) for c, r in redone.values())

    causes, recovered, mismatches = {}, {}, []
    by_attempt = {inj.attempt: inj for inj in chaos.injections}
    for inj in chaos.injections:
        ok, evidence = expected_evidence(inj, evs, run_dir)
        causes[inj.fault.index] = evidence
        resumed = redone.get(inj.attempt, (0, None))[1]
        # Recovered: its cause is on record, and a later attempt resumed and trained on
        # (or had nothing left to train and succeeded).
        succeeded = any(e["event"] == "succeeded" and e["attempt"] > inj.attempt for e in evs)
        recovered[inj.fault.index] = ok and resumed is not None and (succeeded or any(
            steps[b][1] > resumed for b in started if b > inj.attempt and steps[b][0] is not None))
        if inj.fault.kind is Kind.SECOND_JOB:  # the run is not restarted: it must just go on
            recovered[inj.fault.index] = ok
        mismatch = root_cause_mismatch(inj, evs)
        if mismatch:
            mismatches.append(mismatch)
    unplanned = []
    for a, e in sorted(ended.items()):
        startup = by_attempt.get(a - 1)  # a startup_preempt ends the attempt after its own
        if a not in by_attempt and not (startup and startup.fault.kind is Kind.STARTUP_PREEMPT):
            what = e.get("cause") if e["event"] == "worker_failed" else f"preempted ({e.get('how')})"
            unplanned.append(f"attempt {a}: {e['event']}: {what}")

    report = Report(
        seed=seed, faults=len(chaos.schedule), job=chaos.job, schedule=chaos.schedule,
        injections=chaos.injections, reference_digest=reference_digest,
        reference_wall_s=reference_wall_s, digest=summary.get("digest"), wall_s=chaos.wall_s,
        exit_codes=chaos.exit_codes,
        restarts=sum(1 for e in evs if e["event"] == "restarting"),
        reruns=max(chaos.invocations - 1, 0), attempts=len(started),
        steps_redone=steps_redone, redone_by_attempt=redone, causes=causes, recovered=recovered,
        unplanned=unplanned, root_cause_mismatches=mismatches)
    report.checks = run_checks(chaos, report, evs, summary, steps)
    return report


def run_checks(chaos: Chaos, r: Report, evs: List[dict], summary: dict,
               steps: Dict[int, Tuple[Optional[int], int]]) -> List[Check]:
    run_dir = chaos.run_dir
    checks = []
    final = chaos.exit_codes[-1] if chaos.exit_codes else None
    checks.append(Check("run succeeded", final == 0 and summary.get("status") == "succeeded"
                        and (not evs or evs[-1]["event"] == "succeeded"),
                        f"last exit code {final}, summary status {summary.get('status')}"
                        + (f"; {chaos.error}" if chaos.error else "")))
    checks.append(Check("every fault injected", len(r.injections) == len(r.schedule),
                        f"{len(r.injections)} of {len(r.schedule)}"))
    checks.append(Check("final digest equals the uninterrupted run's",
                        r.digest is not None and r.digest == r.reference_digest,
                        f"{(r.digest or 'none')[:16]} vs {(r.reference_digest or 'none')[:16]}"))
    left = [f"at the end: pid {p.pid} ({' '.join(p.cmdline())[:100]})"
            for p in processes_of(run_dir)]
    left += [f"the SIGSTOPped pid {pid} is still there" for pid, created in chaos.stopped_pids
             if ProcessIdentity(pid, created).alive()]
    checks.append(Check("no process of the run left", not (chaos.leftovers or left),
                        "; ".join(chaos.leftovers + left) or "none (also checked after every exit 75)"))

    # No corrupted snapshot was ever resumed from, and each was skipped with a warning
    # naming the file by the first attempt after the corruption that got to restore.
    # A corrupted snapshot stops counting once a new snapshot of its step replaces it
    # ("replacing corrupt snapshot"): attempts started after that may resume from it.
    problems, corrupted = [], [i for i in r.injections if i.corrupted]
    started_at = {e["attempt"]: e["time"] for e in evs if e["event"] == "started"}
    for inj in corrupted:
        snapshot = str(Path(inj.corrupted).parent)
        replaced = min((e["time"] for e in evs if e["event"] == "snapshot_committed"
                        and e.get("path") == snapshot and e["time"] > inj.corrupted_at),
                       default=math.inf)
        later = [a for a in sorted(steps) if a > inj.attempt and started_at[a] < replaced]
        for a in later:
            for rank, (path, _) in resumed_from(run_dir, a).items():
                if path == snapshot:
                    problems.append(f"attempt {a} rank {rank} resumed from corrupted {snapshot}")
        first = next((a for a in later if steps[a][0] is not None), None)
        warned = first is not None and any(
            (m := _SKIPPED.search(line)) and m.group(1) == snapshot and "model.safetensors" in line
            for line in worker_log_lines(run_dir, first).get(0, ()))
        if not warned:
            problems.append(f"attempt {first}: no 'skipping snapshot' warning naming "
                            f"{Path(snapshot).name}/model.safetensors")
    checks.append(Check("no corrupted snapshot loaded", not problems,
                        "; ".join(problems) or f"{len(corrupted)} corrupted, each skipped with a "
                                               f"warning naming model.safetensors"))
    missing = [f"fault {i.fault.index} ({i.fault.kind.value}, attempt {i.attempt}): "
               f"{r.causes[i.fault.index]}" for i in r.injections
               if not expected_evidence(i, evs, run_dir)[0]]
    checks.append(Check("every fault in events.jsonl with its cause", not missing,
                        "; ".join(missing) or f"{len(r.injections)} of {len(r.injections)}"))
    return checks


# ---------------------------------------------------------------------------- output

def machine() -> str:
    try:
        from importlib.metadata import version
        paddle = version("paddlepaddle")
    except Exception:  # not installed under that name
        paddle = "?"
    return (f"{platform.node()}: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
            f"{psutil.virtual_memory().total / 2**30:.0f} GB, Linux {platform.release()}, "
            f"Python {platform.python_version()}, Paddle {paddle}")


def render(r: Report, command: str) -> str:
    lines = [f"chaos: {r.faults} faults, seed {r.seed}, max_steps {r.job.max_steps}, "
             f"{r.job.nproc} workers, hang timeout {r.job.hang_timeout_s:g} s",
             "",
             f"  {'#':>3}  {'fault':<18} {'trigger':>7} {'landed':>6} {'attempt':>7} "
             f"{'reached':>7} {'resumed':>7} {'redone':>6}  recovered  cause in events.jsonl"]
    for inj in r.injections:
        f = inj.fault
        crash, resumed = r.redone_by_attempt.get(inj.attempt, (None, None))
        name = f.kind.value + ("" if f.rank is None else f" r{f.rank}")
        lines.append(
            f"  {f.index:>3}  {name:<18} {f.trigger_step:>7} {inj.landed_step:>6} {inj.attempt:>7} "
            f"{'-' if crash is None else crash:>7} {'-' if resumed is None else resumed:>7} "
            f"{'-' if resumed is None else max(crash - resumed, 0):>6}  "
            f"{'yes' if r.recovered.get(f.index) else 'NO':<9}  {r.causes.get(f.index, '')}"
            + (f"  [{inj.note}]" if inj.note else ""))
    for f in r.schedule[len(r.injections):]:
        lines.append(f"  {f.index:>3}  {f.kind.value:<18} {f.trigger_step:>7}  never injected")
    lines += ["", f"  {'kind':<16} {'injected':>8} {'recovered':>9}"]
    for kind in Kind:
        inj = [i for i in r.injections if i.fault.kind is kind]
        lines.append(f"  {kind.value:<16} {len(inj):>8} "
                     f"{sum(r.recovered.get(i.fault.index, False) for i in inj):>9}")
    lines.append(f"  {'total':<16} {len(r.injections):>8} {sum(r.recovered.values()):>9}")
    ratio = f" (x{r.wall_s / r.reference_wall_s:.1f})" if r.reference_wall_s else ""
    ref = f"{r.reference_wall_s:.0f} s" if r.reference_wall_s else "n/a (--reference-digest)"
    lines += ["",
              f"  attempts {r.attempts}: {r.restarts} restarts by the supervisor, "
              f"{r.reruns} reruns after exit 75",
              f"  steps redone {r.steps_redone} (training {r.job.max_steps} steps)",
              f"  wall time {r.wall_s:.0f} s under chaos, {ref} uninterrupted{ratio}"]
    if r.unplanned:
        lines.append(f"  failures no fault explains ({len(r.unplanned)}; they fail no check):")
        lines += [f"    {u[:300]}" for u in r.unplanned]
    if r.root_cause_mismatches:
        lines.append(f"  root causes that name another rank than the victim "
                     f"({len(r.root_cause_mismatches)}; they fail no check):")
        lines += [f"    {m[:300]}" for m in r.root_cause_mismatches]
    lines += ["", "checks:"]
    for c in r.checks:
        lines.append(f"  [{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}")
    lines += ["", f"{'PASSED' if r.passed else 'FAILED'}   (reproduce: {command})"]
    return "\n".join(lines)


def to_json(r: Report, command: str, work_dir: Path) -> dict:
    return {
        "command": command, "machine": machine(), "work_dir": str(work_dir),
        "seed": r.seed, "faults": r.faults, "job": dataclasses.asdict(r.job),
        "passed": r.passed,
        "checks": [dataclasses.asdict(c) for c in r.checks],
        "injected_by_kind": {k.value: sum(i.fault.kind is k for i in r.injections) for k in Kind},
        "recovered_by_kind": {k.value: sum(r.recovered.get(i.fault.index, False)
                                           for i in r.injections if i.fault.kind is k) for k in Kind},
        "attempts": r.attempts, "restarts": r.restarts, "reruns": r.reruns,
        "steps_redone": r.steps_redone, "wall_s": r.wall_s, "reference_wall_s": r.reference_wall_s,
        "digest": r.digest, "reference_digest": r.reference_digest, "exit_codes": r.exit_codes,
        "unplanned_failures": r.unplanned,
        "root_cause_mismatches": r.root_cause_mismatches,
        "faults_detail": [{
            **{k: (v.value if isinstance(v, Enum) else v)
               for k, v in dataclasses.asdict(i.fault).items()},
            "attempt": i.attempt, "injected_at": i.at, "trigger_seen": i.trigger_seen,
            "landed_step": i.landed_step,
            "pid": i.pid, "exit_code": i.exit_code, "mid_persist": i.mid_persist,
            "corrupted": i.corrupted, "corrupted_offset": i.corrupted_offset,
            "stopped_s": i.stopped_s, "note": i.note,
            "second_refused": i.second_refused, "staging_kept": i.staging_kept,
            "cause": r.causes.get(i.fault.index), "recovered": r.recovered.get(i.fault.index),
            "crash_step": r.redone_by_attempt.get(i.attempt, (None, None))[0],
            "resumed_step": r.redone_by_attempt.get(i.attempt, (None, None))[1],
        } for i in r.injections],
    }


# ---------------------------------------------------------------------------- main

def run_reference(job: Job, work_dir: Path, timeout_s: float, say=print) -> Tuple[str, float]:
    run_dir = work_dir / "reference"
    say(f"chaos: uninterrupted reference run in {run_dir}")
    started = time.time()
    with open(work_dir / "reference.log", "wb") as log:
        proc = subprocess.Popen(job.argv(run_dir), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise ChaosError(f"the reference run did not finish in {timeout_s:.0f} s "
                             f"(see {work_dir / 'reference.log'})") from None
        finally:
            kill_all(run_dir)
    wall = time.time() - started
    if code != 0:
        raise ChaosError(f"the reference run exited with {code} (see {work_dir / 'reference.log'})")
    digest = json.loads((run_dir / "summary.json").read_text())["digest"]
    say(f"chaos: reference digest {digest[:16]}, {wall:.0f} s")
    return digest, wall


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faults", type=int, default=len(Kind),
                   help=f"how many faults (default {len(Kind)}: one of each kind)")
    p.add_argument("--seed", type=int, default=1, help="the schedule's seed (default 1)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="training steps (default max(300, 100 + 20 x faults))")
    p.add_argument("--nproc", type=int, default=2, help="workers (default 2)")
    p.add_argument("--hang-timeout", type=float, default=8.0,
                   help="supervisor.hang_timeout_s (default 8)")
    p.add_argument("--reference-digest", help="skip the uninterrupted run; compare with this")
    p.add_argument("--work-dir", type=Path, help="where to put both runs (default: a new temp dir)")
    p.add_argument("--timeout", type=float, default=None,
                   help="give up after this many seconds, reference run included "
                        "(default 300 + 60 x faults)")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    p.add_argument("--plan", action="store_true", help="print the schedule and exit")
    args = p.parse_args(argv)

    max_steps = args.max_steps or default_max_steps(args.faults)
    try:
        schedule = plan(args.seed, args.faults, max_steps, args.nproc)
    except ValueError as e:
        p.error(str(e))
    command = (f"python bench/chaos.py --faults {args.faults} --seed {args.seed}"
               + (f" --max-steps {args.max_steps}" if args.max_steps else "")
               + (f" --nproc {args.nproc}" if args.nproc != 2 else "")
               + (f" --hang-timeout {args.hang_timeout:g}" if args.hang_timeout != 8.0 else ""))
    if args.plan:
        for f in schedule:
            print(f"{f.index:>3}  {f.kind.value:<15} step {f.trigger_step:>4}"
                  + ("" if f.rank is None else f"  rank {f.rank}"))
        return 0

    job = Job(max_steps=max_steps, nproc=args.nproc, max_restarts=args.faults + 3,
              hang_timeout_s=args.hang_timeout)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="paddlerun-chaos-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    if (work_dir / "run").exists():
        p.error(f"{work_dir / 'run'} exists: the chaos run needs a fresh run directory")
    timeout_s = args.timeout or 300 + 60 * args.faults
    print(f"chaos: work dir {work_dir}; {len(schedule)} faults planned", flush=True)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    chaos = Chaos(job, schedule, work_dir, timeout_s,
                  say=lambda msg: print(msg, flush=True))
    try:
        if args.reference_digest:
            reference, reference_wall = args.reference_digest, None
        else:
            reference, reference_wall = run_reference(job, work_dir, min(timeout_s, 900),
                                                      say=chaos.say)
        try:
            chaos.run()
        except ChaosError as e:
            chaos.error = str(e)
            print(f"chaos: {e}", flush=True)
        report = analyse(chaos, args.seed, reference, reference_wall)
    except ChaosError as e:
        print(f"chaos: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("chaos: interrupted; the run's processes are killed", file=sys.stderr)
        return 130
    finally:
        for run_dir in (work_dir / "reference", work_dir / "run", *work_dir.glob("second-*/")):
            kill_all(run_dir)
        signal.signal(signal.SIGTERM, previous)
    print()
    print(render(report, command))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(to_json(report, command, work_dir), indent=2) + "\n")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
