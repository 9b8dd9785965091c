"""``paddlerun doctor [CONFIG] [--json]``: what will happen if this job starts here, on one screen.

Python; the Paddle build (version, CUDA, cuDNN, NCCL) and whether paddlerun supports it;
the GPUs visible and which worker gets which; the checkpoints directory (writable, on
which filesystem, free space against the newest snapshot); with ``launch.nnodes > 1``,
whether the master's address resolves and its port is free (node 0) or reachable.

Exit 0 when the job can start, 1 when a check says it cannot, 2 for a bad config. Never
imports paddle: everything is read from files, the environment and the OS, in about a
second (plus at most a few seconds when the master does not answer).
"""
from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

from paddlerun.launcher import render
from paddlerun.launcher.exit_codes import FAILED, SUCCESS
from paddlerun.launcher.launch import resolve_nproc, visible_gpus
from paddlerun.trainer.rundir import paddle_build
from paddlerun.trainer.checkpoint import CheckpointStore
from paddlerun.trainer.rundir.config import Config, etcd_endpoints

#: How long to wait for the master's port to answer (a worker node's check only).
CONNECT_TIMEOUT_S = 2.0


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    #: False: the job cannot start (exit 1). True: fine. The detail says what was found.
    ok: bool
    detail: str


def add_parser(sub) -> None:
    doctor = sub.add_parser(
        "doctor", help="check that a job can start here: Paddle, GPUs, checkpoints, master",
        description="Python; the Paddle build (version, CUDA, cuDNN, NCCL) and whether paddlerun "
                    "supports it; the GPUs visible and which worker gets which; the checkpoints "
                    "directory (writable, filesystem, free space against the newest snapshot); with "
                    "launch.nnodes > 1, whether the master resolves and its port is free (node 0) "
                    "or reachable. Never imports paddle. Exit 0 when the job can start, 1 otherwise, "
                    "2 for a bad config.")
    doctor.add_argument("config", nargs="?", help="a YAML file or a shipped config's name; "
                        "default: the defaults")
    doctor.add_argument("--run-dir", help="as for paddlerun run (where the checkpoints go)")
    doctor.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, as for paddlerun run")
    doctor.add_argument("--json", action="store_true", help="print one JSON object")
    doctor.set_defaults(handler=cmd_doctor)


def cmd_doctor(args, script_args: List[str]) -> int:
    from paddlerun.launcher import cli  # the config lookup `run` uses (imported late: cli imports us)
    cli.no_script_args("doctor", script_args)
    if args.config:
        config = cli.load_config(cli.find_config(args.config), list(args.set))
    else:
        config = cli.load_config_from_overrides("job", list(args.set))
    run_dir = Path(args.run_dir or config.job.run_dir or Path("runs") / config.job.name).resolve()
    checks = diagnose(config, run_dir)
    ok = all(c.ok for c in checks)
    if args.json:
        print(render.dumps({"ok": ok, "checks": [dataclasses.asdict(c) for c in checks]}))
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            print(f"{'ok  ' if c.ok else 'FAIL'} {c.name:<{width}}  {c.detail}")
        print("the job can start" if ok else "the job cannot start: fix the FAIL lines above")
    return SUCCESS if ok else FAILED


def diagnose(config: Config, run_dir: Path) -> List[Check]:
    build = _paddle(config)
    checks = [_python(config), build[0], _gpus(config, build[1])]
    checks.append(_checkpoints(Path(config.checkpoint.dir or run_dir / "checkpoints")))
    if config.launch.rendezvous is not None:
        checks.append(_etcd(config))
    elif config.launch.nnodes > 1:
        checks.append(_master(config))
    return checks


def _etcd(config: Config) -> Check:
    """An elastic job: the nodes meet in etcd, which must answer."""
    try:
        from paddlerun.cluster.etcd_client import Etcd, EtcdUnavailable
    except ImportError:
        return Check("etcd", False, "launch.rendezvous needs the etcd client: "
                                    "pip install 'paddlerun[elastic]'")
    etcd = Etcd(etcd_endpoints(config.launch.rendezvous))
    job_id = config.launch.job_id or config.job.name
    try:
        nodes = etcd.get_prefix(f"/paddlerun/{job_id}/nodes/")
    except EtcdUnavailable as e:
        return Check("etcd", False, f"{e}; start etcd or fix launch.rendezvous")
    return Check("etcd", True, f"{etcd.describe()} answers; job {job_id!r} has {len(nodes)} node(s) "
                               f"present now (launch.nnodes={config.launch.nnodes})")


def _python(config: Config) -> Check:
    python = config.launch.python or sys.executable
    return Check("python", True, f"{platform.python_version()} ({python})" if config.launch.python is None
                 else f"workers run {python}")


def _paddle(config: Config):
    try:
        build = paddle_build.read(config.launch.python)
    except paddle_build.PaddleNotSupported as e:
        return Check("paddle", False, str(e)), None
    if build is None:
        return Check("paddle", False, f"not installed: pip install 'paddlerun[cpu]', or a GPU build "
                                      f"(paddlepaddle-gpu>={paddle_build.MINIMUM}, docs/install.md)"), None
    kind = (f"CUDA {build.cuda}, cuDNN {build.cudnn or '?'}, NCCL {build.nccl or '?'}"
            if build.with_cuda else "CPU build")
    reason = build.unsupported_reason()
    if reason is not None:
        return Check("paddle", False, reason), build
    sharding = build.sharding_problem() if config.train.sharded_optimizer else None
    if sharding is not None:
        return Check("paddle", False, f"train.sharded_optimizer: {sharding}"), build
    if len(build.distributions) > 1:
        return Check("paddle", False, f"{' and '.join(build.distributions)} are both installed and "
                                      f"overwrite each other's files: uninstall both, then install one"), build
    return Check("paddle", True, f"{build.version} ({kind}; supported, >= {paddle_build.MINIMUM}) "
                                 f"at {build.location}"), build


def _gpus(config: Config, build: Optional[paddle_build.PaddleBuild]) -> Check:
    device = config.launch.device
    gpus = visible_gpus() if device != "cpu" else 0
    cuda_build = build is not None and build.with_cuda
    nproc = resolve_nproc(config.launch.nproc_per_node, device)
    if device == "gpu" and (gpus == 0 or not cuda_build):
        why = "no GPU is visible" if gpus == 0 else "Paddle is a CPU build"
        return Check("gpus", False, f"launch.device is gpu but {why} (check CUDA_VISIBLE_DEVICES, "
                                    f"install paddlepaddle-gpu), or set launch.device: cpu")
    if gpus == 0 or not cuda_build:
        why = "launch.device is cpu" if device == "cpu" else (
            "none visible" if gpus == 0 else f"{gpus} visible, but Paddle is a CPU build")
        return Check("gpus", True, f"{nproc} CPU workers ({why})")
    if nproc > gpus:
        return Check("gpus", False, f"{nproc} workers per node but {gpus} GPUs visible: each worker "
                                    f"needs its own; set launch.nproc_per_node <= {gpus}")
    ids = _gpu_ids(gpus)
    pairs = ", ".join(f"local rank {r} -> GPU {ids[r]}" for r in range(nproc))
    return Check("gpus", True, f"{gpus} visible; {pairs}")


def _gpu_ids(count: int) -> List[str]:
    """The GPUs' names as CUDA_VISIBLE_DEVICES gives them (ids or UUIDs), else 0..count-1."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [d.strip() for d in visible.split(",") if d.strip()]
    return [str(i) for i in range(count)]


def _checkpoints(directory: Path) -> Check:
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:  # the one sure test of writability: write something
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".paddlerun-doctor-"):
            pass
    except OSError as e:
        return Check("checkpoints", False, f"{directory}: cannot write in {existing}: {e.strerror}; "
                                           f"set checkpoint.dir or --run-dir to a writable place")
    usage = shutil.disk_usage(existing)
    newest = CheckpointStore(directory).newest_complete(verify=False) if directory.is_dir() else None
    where = f"{directory} ({_filesystem(existing)}, {render.size(usage.free)} free"
    if newest is None:
        return Check("checkpoints", True, f"{where}; no snapshot yet)")
    # A new snapshot is written in full before an old one is deleted.
    if usage.free < newest.size_bytes:
        return Check("checkpoints", False, f"{where}, but the newest snapshot "
                                           f"({newest.path.name}) is {render.size(newest.size_bytes)}: "
                                           f"the next one will not fit; free space or lower checkpoint.keep_last)")
    return Check("checkpoints", True, f"{where}; newest snapshot {newest.path.name} "
                                      f"{render.size(newest.size_bytes)})")


def _filesystem(path: Path) -> str:
    """The type of the filesystem ``path`` is on, from /proc/self/mounts (longest mount point)."""
    best, kind = "", "unknown filesystem"
    resolved = str(path.resolve())
    try:
        with open("/proc/self/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].replace("\\040", " ")
                inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, fields[2]
    except OSError:
        pass
    return kind


def _master(config: Config) -> Check:
    launch = config.launch
    host, _, port_text = (launch.master or "").rpartition(":")
    if not host or not port_text.isdigit():
        return Check("master", False, f"launch.master is {launch.master!r}; give host:port")
    port = int(port_text)
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except socket.gaierror as e:
        return Check("master", False, f"{host} does not resolve ({e.strerror}); check launch.master")
    shown = f"{host}:{port} ({', '.join(sorted(addresses))})"
    if launch.node_rank == 0:  # this node serves the rendezvous: the port must be free here
        try:
            with socket.socket(socket.AF_INET6 if ":" in next(iter(addresses)) else socket.AF_INET) as s:
                s.bind(("", port))
        except OSError as e:
            return Check("master", False, f"{shown}: node 0 serves it, but port {port} is in use "
                                          f"here ({e.strerror}); pick another launch.master port")
        return Check("master", True, f"{shown}: resolves; port {port} is free on this node (node 0)")
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
        reach = "reachable now"
    except OSError as e:
        reach = f"not answering yet ({e.strerror or e}): node 0 opens it when its job starts"
    return Check("master", True, f"{shown}: resolves; {reach}")
