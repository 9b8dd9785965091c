"""``paddlerun ckpt list|verify|digest|export PATH``: look into snapshots without paddle.

``PATH`` is a snapshot directory (``step-XXXXXXXX``, or a copy of one holding its
``manifest.json``), a checkpoints directory, or a run directory (its ``checkpoints/``, or
the ``checkpoint.dir`` its ``config.yaml`` names). :func:`locate` tells them apart;
anything else is bad usage (exit 2). Files are read through the checkpoint store, which
checks them against the manifest first; nothing is ever unpickled.

Which snapshot each command means, given a checkpoints or run directory:

``list``
    every ``step-*`` directory, whatever its state;
``verify``
    the *newest* ``step-*`` directory, complete or not: the question a user asks is
    "is my newest snapshot good?". When it is not, the answer names the older snapshot
    a restart would fall back to, if there is one;
``digest`` / ``export``
    the newest *complete* snapshot (every sha256 checked): the one a restart resumes from.

Exit codes: 0 done (``verify``: intact), 1 a failure (``verify``: not intact), 2 bad usage.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from paddlerun.launcher import render
from paddlerun.launcher.usage import UsageError
from paddlerun.launcher.exit_codes import FAILED, SUCCESS
from paddlerun.trainer.checkpoint import (CheckpointError, CheckpointStore, MANIFEST_NAME,
                                          SnapshotInfo, inspect_snapshot, resolve_snapshot)
from paddlerun.trainer.checkpoint import layout

EXPECTED = ("expected a snapshot directory (step-XXXXXXXX, holding manifest.json), a checkpoints "
            "directory (holding step-* directories) or a run directory (holding checkpoints/)")
#: Files a run directory holds (docs/architecture.md#the-run-directory).
_RUN_DIR_FILES = ("events.jsonl", "config.yaml", "supervisor.json", "metrics.jsonl", "summary.json")
#: What a checkpoints directory holds besides snapshots, even before the first one.
_STORE_FILES = (layout.LOCK_NAME, layout.WRITER_LOCK_NAME, layout.READERS_DIR)
#: How often verify lists again when the snapshot it picked vanished (replaced by a commit).
_RETRIES = 3
#: How often a listing is taken again when a snapshot vanished while it was taken.
_LIST_RETRIES = 10


class CommandFailed(Exception):
    """The command ran but its answer is "no": exit 1 with this message (it names the path)."""


@dataclass(frozen=True)
class Target:
    """What a ``PATH`` argument names."""

    given: Path
    #: "snapshot", "checkpoints" or "run".
    kind: str
    #: The checkpoints directory: PATH itself, the run's, or a snapshot's parent. It may
    #: not exist yet (a run that never committed a snapshot).
    directory: Path

    @property
    def snapshot(self) -> Optional[Path]:
        return self.given if self.kind == "snapshot" else None


def locate(path: str) -> Target:
    """Classify ``path``; raises :class:`UsageError` (exit 2) when it is none of the three."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p} does not exist; {EXPECTED}")
    if not p.is_dir():
        raise UsageError(f"{p} is not a directory; {EXPECTED}")
    if layout.parse_step(p.name) is not None or (p / MANIFEST_NAME).exists():
        return Target(p, "snapshot", p.parent)
    if (p / "checkpoints").is_dir():
        return Target(p, "run", p / "checkpoints")
    names = _names(p)
    if any(layout.parse_step(n) is not None for n in names) or names.intersection(_STORE_FILES):
        return Target(p, "checkpoints", p)
    if names.intersection(_RUN_DIR_FILES):
        return Target(p, "run", configured_checkpoint_dir(p) or p / "checkpoints")
    raise UsageError(f"{p} holds no manifest.json, no step-* directory and no checkpoints/; {EXPECTED}")


def _names(directory: Path) -> set:
    try:
        return {entry.name for entry in directory.iterdir()}
    except OSError as exc:
        raise UsageError(f"cannot list {directory}: {exc.strerror or exc}") from None


def configured_checkpoint_dir(run_dir: Path) -> Optional[Path]:
    """``checkpoint.dir`` from the run's resolved ``config.yaml``, when set and present.

    Read as plain YAML (not checked against the schema): a run made by another version
    of paddlerun must still be inspectable. A relative path is taken from the current
    directory, as the supervisor that ran the job took it.
    """
    import yaml
    try:
        raw = yaml.safe_load((run_dir / "config.yaml").read_text())
        configured = raw["checkpoint"]["dir"]
    except (OSError, ValueError, yaml.YAMLError, KeyError, TypeError):
        return None
    if not isinstance(configured, str) or not configured:
        return None
    return Path(configured) if Path(configured).is_dir() else None


# ------------------------------------------------------------------ entry


def run(args: argparse.Namespace) -> int:
    """Dispatch ``paddlerun ckpt <command>``; usage errors propagate (the CLI exits 2)."""
    command = {"list": cmd_list, "verify": cmd_verify, "digest": cmd_digest,
               "export": cmd_export}[args.ckpt_command]
    try:
        return command(args)
    except (CommandFailed, CheckpointError) as exc:
        print(f"paddlerun ckpt {args.ckpt_command}: {exc}", file=sys.stderr)
        return FAILED
    except BrokenPipeError:
        raise  # the reader of our output went away (| head): the CLI handles it
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        print(f"paddlerun ckpt {args.ckpt_command}: cannot read{where}: {exc.strerror or exc}",
              file=sys.stderr)
        return FAILED


# ------------------------------------------------------------------ list


def cmd_list(args: argparse.Namespace) -> int:
    target = locate(args.path)
    if target.snapshot is not None:
        infos = [inspect_snapshot(target.snapshot, verify=args.verify)]
    else:
        infos = list_snapshots(target.directory, verify=args.verify)
    rows = [describe(info) for info in infos]
    if args.json:
        print(render.dumps(rows))
        return SUCCESS
    if not rows:
        print(f"no snapshots in {target.directory}"
              f"{'' if target.directory.is_dir() else ' (it does not exist yet)'}")
        return SUCCESS
    print(render.table(
        ["SNAPSHOT", "STEP", "EPOCH", "WORKERS", "CREATED", "SIZE", "FILES", "REASON", "STATE", "PROBLEM"],
        [[r["name"], r["step"], r["epoch"], r["world_size"], render.local_time(r["created_unix"]),
          render.size(r["size_bytes"]), r["files"], r["reason"], r["state"], r["problem"]]
         for r in rows]))
    checked = "every sha256 checked" if args.verify else \
        "manifest and file sizes checked; --verify also checks every sha256"
    complete = [r for r in rows if r["state"] == "complete"]
    if target.snapshot is None:
        newest = (f"newest complete: {complete[-1]['name']} (a restart resumes from it)"
                  if complete else "no complete snapshot: a restart starts from step 0")
        print(f"{len(rows)} snapshot(s) in {target.directory}; {newest}; {checked}")
    else:
        print(checked)
    return SUCCESS


def list_snapshots(directory: Path, verify: bool) -> List[SnapshotInfo]:
    """Every ``step-*`` directory, oldest first, as ``CheckpointStore.snapshots()`` gives them,
    but taken again when retention deleted one while we looked.

    Retention deletes step N only after committing a newer one, which a listing made just
    before that commit does not hold: left at that, a user could be shown no snapshot at
    all while one always exists.
    """
    infos: List[SnapshotInfo] = []
    for _ in range(_LIST_RETRIES):
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            return []
        steps = sorted((layout.parse_step(n), n) for n in names if layout.parse_step(n) is not None)
        infos, vanished = [], False
        for _, name in steps:
            try:
                infos.append(inspect_snapshot(directory / name, verify=verify))
            except CheckpointError:  # it vanished after listdir: retention, or a broken one replaced
                vanished = True
        if not vanished:
            break
    return infos


def describe(info: SnapshotInfo) -> dict:
    """One snapshot as ``ckpt list --json`` prints it."""
    manifest = info.manifest or {}
    created = manifest.get("created_unix")
    if not isinstance(created, (int, float)) or isinstance(created, bool):
        created = info.mtime  # no valid manifest: when the directory last changed
    return {
        "name": info.path.name,
        "path": os.path.abspath(info.path),
        "step": info.step,
        "epoch": manifest.get("epoch"),
        "created_unix": created,
        "created": datetime.datetime.fromtimestamp(created).astimezone().isoformat(timespec="seconds"),
        "size_bytes": info.size_bytes,
        "files": len(info.files) if info.manifest else None,
        "world_size": manifest.get("world_size"),
        "reason": manifest.get("reason"),
        "state": info.state.value,
        "problem": info.problem,
    }


# ------------------------------------------------------------------ verify


def cmd_verify(args: argparse.Namespace) -> int:
    target = locate(args.path)
    if target.snapshot is not None:
        info = inspect_snapshot(target.snapshot, verify=True)
        return _verdict(info, older=None)
    for _ in range(_RETRIES):
        listed = list_snapshots(target.directory, verify=False)
        if not listed:
            raise CommandFailed(f"no snapshot in {target.directory}: nothing to verify "
                                f"(has the run committed one yet? `paddlerun status` tells)")
        try:
            info = inspect_snapshot(listed[-1].path, verify=True)
        except CheckpointError:
            continue  # it vanished after we listed it: a commit replaced a broken one; list again
        return _verdict(info, older=listed[:-1])
    raise CommandFailed(f"the newest snapshot in {target.directory} kept changing while it was "
                        f"being verified ({_RETRIES} tries); is a run committing? Try again.")


def _verdict(info: SnapshotInfo, older: Optional[List[SnapshotInfo]]) -> int:
    """Print the one-line answer; ``older``: the snapshots a restart could fall back to."""
    what = f"{info.path} (step {info.step})"
    if info.complete:
        print(f"OK {what}: {len(info.files)} files, {render.size(info.size_bytes)}, "
              f"every sha256 matches {MANIFEST_NAME}")
        return SUCCESS
    print(f"{info.state.value.upper()} {what}: {info.problem}")
    if older is not None:
        fallback = _newest_complete(older)
        if fallback is not None:
            print(f"  a restart skips it and resumes from the newest complete snapshot, "
                  f"{fallback.path} (step {fallback.step}, verified)")
        else:
            print(f"  no older complete snapshot exists in {info.path.parent}: a restart would "
                  f"start from step 0")
    return FAILED


def _newest_complete(infos: List[SnapshotInfo]) -> Optional[SnapshotInfo]:
    for listed in reversed(infos):
        try:
            info = inspect_snapshot(listed.path, verify=True)
        except CheckpointError:
            continue  # deleted by retention meanwhile
        if info.complete:
            return info
    return None


# ------------------------------------------------------------------ digest / export


def newest_complete(target: Target) -> Path:
    """The snapshot ``digest`` and ``export`` read: PATH itself, or the newest complete one."""
    if target.snapshot is not None:
        return target.snapshot
    if not target.directory.is_dir():
        raise CommandFailed(f"{target.given} has no snapshots yet ({target.directory} does not exist)")
    return resolve_snapshot(target.directory, verify=True)


def cmd_digest(args: argparse.Namespace) -> int:
    from paddlerun.launcher.ckpt_export import MODEL_FILE
    from paddlerun.trainer.rundir.digest import params_digest

    path = newest_complete(locate(args.path))
    with CheckpointStore(path.parent).reading(path) as info:
        arrays = info.read_tensors(MODEL_FILE)  # checked against the manifest's sha256
    print(f"paddlerun: digest of {MODEL_FILE} in {path} (step {info.step})", file=sys.stderr)
    print(params_digest(arrays))
    return SUCCESS


def cmd_export(args: argparse.Namespace) -> int:
    from paddlerun.launcher import ckpt_export

    prefix = ckpt_export.out_prefix(args.out_prefix)
    path = newest_complete(locate(args.path))
    started = time.monotonic()
    with CheckpointStore(path.parent).reading(path) as info:
        result = ckpt_export.export(info, prefix)
    print(f"exported {path} (step {info.step}) in {time.monotonic() - started:.1f} s:")
    print(f"  {result.params_path}  model: {result.params_tensors} tensors, "
          f"{render.size(result.params_bytes)}")
    extra = f" + {', '.join(result.opt_extra)}" if result.opt_extra else ""
    print(f"  {result.opt_path}  optimizer: {result.opt_tensors} tensors{extra}, "
          f"{render.size(result.opt_bytes)}")
    print(f"load with paddle.Model(net).load({str(prefix)!r}) after prepare(optimizer=...), "
          f"or paddle.load({str(result.params_path)!r})")
    return SUCCESS
