"""A real two-node Slurm cluster (nodes n1 and n2) on this one machine, for the tests.

One private ``munged`` (its own key and socket), one ``slurmctld`` and two ``slurmd``
started with ``slurmd -N n1`` / ``-N n2``: Debian's slurm-wlm is built with
``--enable-multiple-slurmd``, so both run in the host's namespaces on their own ports,
all traffic on 127.0.0.1. Nothing is written to /etc: clients find the cluster through
``SLURM_CONF``. Needs root and the packages ``slurmctld slurmd slurm-client munge``.

Facts it relies on (measured on slurm-wlm 22.05.8):

- ``munged`` runs as user ``munge`` and must reach its state folder: the folder is made
  directly under /tmp with mode 0755 (pytest's ``tmp_path`` and ``mkdtemp`` are 0700).
- ``slurmd`` does not create its ``%n`` spool dir; a missing one is fatal.
- ``AuthInfo=cred_expire=`` is also how long a requeued job waits before it starts
  again (default 120 s; 5 is the minimum). ``sched_interval=1`` starts it right after.
- ``slurmstepd`` processes outlive ``slurmd``: every job must end before the daemons
  stop, or its processes are left behind. They are found by their sockets in our spool.
- Every daemon is stopped by the pid in its pid file, never by name.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import psutil

NODES = ("n1", "n2")
DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "squeue", "scancel", "mungekey")


def missing_programs() -> List[str]:
    return [name for name in DAEMONS if shutil.which(name) is None
            and not Path("/usr/sbin", name).exists()]


class ClusterError(RuntimeError):
    """The cluster did not start; the message has the end of the daemon's log."""


def free_ports(count: int) -> List[int]:
    """Ports the kernel says are free now (held together so that they differ)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def running(pid: int) -> bool:
    """Alive and not a zombie (PID 1 here reaps orphans ~2 s late; kill -0 sees zombies)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop_pids(pids: List[int], grace_s: float = 15.0) -> None:
    """SIGTERM, wait up to ``grace_s`` for all, then SIGKILL the rest."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace_s
    while time.time() < deadline and any(running(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if running(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@dataclass
class SlurmCluster:
    root: Path
    cred_expire_s: int = 5
    kill_wait_s: int = 30
    ctld_started: float = 0.0

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> Dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(argv), env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise ClusterError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
        return proc

    # ---------------------------------------------------------------- start

    @classmethod
    def start(cls, cred_expire_s: int = 5, kill_wait_s: int = 30) -> "SlurmCluster":
        root = Path(tempfile.mkdtemp(prefix="paddlerun-slurm-", dir="/tmp"))
        root.chmod(0o755)
        cluster = cls(root, cred_expire_s, kill_wait_s)
        try:
            cluster._start()
        except BaseException:
            cluster.stop(keep=True)
            raise
        return cluster

    def _start(self) -> None:
        munge_dir = self.root / "munge"
        for d in ("state", "spool/n1", "spool/n2", "munge"):
            (self.root / d).mkdir(parents=True)
        shutil.chown(munge_dir, "munge", "munge")
        munge_dir.chmod(0o755)  # clients of any uid reach the socket
        key = munge_dir / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}", "--force"], check=True,
                       capture_output=True, timeout=30)
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        sock = munge_dir / "munge.socket"
        subprocess.run(["su", "-s", "/bin/sh", "munge", "-c",
                        f"/usr/sbin/munged --socket={sock} --key-file={key} "
                        f"--pid-file={munge_dir / 'munged.pid'} --log-file={munge_dir / 'munged.log'} "
                        f"--seed-file={munge_dir / 'munged.seed'}"],
                       check=True, capture_output=True, timeout=30)
        self._wait(lambda: sock.exists(), 10, "munged's socket", munge_dir / "munged.log")

        ctld_port, *node_ports = free_ports(1 + len(NODES))
        hw = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout
        fields = dict(item.split("=", 1) for item in hw.split() if "=" in item)
        cpus = fields.get("CPUs", "1")
        memory = int(fields.get("RealMemory", "2000")) // 2
        host = socket.gethostname().split(".")[0]
        nodes = "".join(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                        f"CPUs={cpus} RealMemory={memory} State=UNKNOWN\n"
                        for name, port in zip(NODES, node_ports))
        r = self.root
        self.conf.write_text(f"""\
ClusterName=paddlerun-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock},cred_expire={self.cred_expire_s}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
KillWait={self.kill_wait_s}
{nodes}PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
""")
        # slurmctld checks time limits (and sends --signal warnings) every 30 s from its start.
        self.ctld_started = time.time()
        subprocess.run(["slurmctld", "-i"], env=self.env, check=True, capture_output=True, timeout=30)
        self._wait(lambda: self.run("scontrol", "ping", check=False).returncode == 0, 15,
                   "slurmctld to answer", r / "slurmctld.log")
        for name in NODES:
            subprocess.run(["slurmd", "-N", name], env=self.env, check=True, capture_output=True,
                           timeout=30)

        def idle() -> bool:
            states = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split("\n")
            bad = [s for s in states if s.split()[-1:] and s.split()[-1] in ("inval", "drain", "fail")]
            if bad:
                raise ClusterError(f"nodes not usable: {bad}: {self.run('sinfo', '-R').stdout}")
            return sum(1 for s in states if s.endswith(" idle")) == len(NODES)

        self._wait(idle, 60, "both nodes to be idle", r / "slurmd.n1.log")

    @staticmethod
    def _wait(predicate, timeout_s: float, what: str, log: Path) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
        raise ClusterError(f"timed out after {timeout_s} s waiting for {what}; {log}:\n{tail}")

    # ---------------------------------------------------------------- jobs

    def jobs(self) -> List[str]:
        out = self.run("squeue", "-h", "-o", "%i", check=False).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def job(self, job_id: str) -> Dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def stepd_pids(self) -> List[int]:
        """This cluster's slurmstepd's, by the unix sockets they listen on in our spool."""
        spool = str(self.root / "spool") + "/"
        pids = set()
        for conn in psutil.net_connections(kind="unix"):
            if conn.pid and isinstance(conn.laddr, str) and conn.laddr.startswith(spool):
                pids.add(conn.pid)
        return sorted(pids)

    def job_processes(self) -> List[psutil.Process]:
        """Every live process below this cluster's slurmstepd's (the jobs' processes)."""
        found = []
        for pid in self.stepd_pids():
            try:
                found += [p for p in psutil.Process(pid).children(recursive=True)
                          if p.status() != psutil.STATUS_ZOMBIE]
            except psutil.Error:
                continue
        return found

    def end_all_jobs(self, timeout_s: float = 10.0) -> None:
        """scancel everything; SIGKILL what still runs under our slurmstepd's after 2 s."""
        ids = self.jobs()
        if ids:
            self.run("scancel", *ids, check=False)
        deadline = time.time() + 2
        while time.time() < deadline and (self.jobs() or self.stepd_pids()):
            time.sleep(0.1)
        for proc in self.job_processes():
            try:
                proc.kill()
            except psutil.Error:
                pass
        deadline = time.time() + timeout_s
        while time.time() < deadline and (self.jobs() or self.stepd_pids()):
            time.sleep(0.1)

    # ---------------------------------------------------------------- stop

    def _pid(self, name: str) -> Optional[int]:
        try:
            pid = int((self.root / name).read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if running(pid) else None

    def stop(self, keep: bool = False) -> None:
        """End every job, then stop the daemons by pid and remove the state folder
        (``keep``: leave it, with its logs). Safe to call twice."""
        if self._pid("slurmctld.pid"):
            try:
                self.end_all_jobs()
            except (subprocess.SubprocessError, ClusterError, OSError):
                pass
        daemons = [p for p in (self._pid(f"slurmd.{n}.pid") for n in NODES) if p]
        ctld = self._pid("slurmctld.pid")
        stop_pids(daemons + ([ctld] if ctld else []))
        leftover = self.stepd_pids()
        if leftover:
            for pid in leftover:
                try:
                    for child in psutil.Process(pid).children(recursive=True):
                        child.kill()
                except psutil.Error:
                    pass
            stop_pids(leftover)
        munged = self._pid("munge/munged.pid")
        if munged:
            stop_pids([munged])
        if not keep:
            shutil.rmtree(self.root, ignore_errors=True)
