"""CheckpointStore: one checkpoints directory -- commit, list, verify, read, retain.

Who calls what:

- at start, rank 0 only: ``open_writer(owner)`` -- ``claim_writer(owner)``, then
  ``prepare()`` -- before any rank saves. ``prepare()`` refuses to run without the claim:
  it removes every staging directory, and one of them may be the snapshot another live
  job is writing;
- every rank that writes a file: ``staging = store.stage(step)``, ``staging.write_*(...)``;
- rank 0: ``store.commit(staging, meta, expect_files=<other ranks' files>)``, then
  ``store.apply_retention(keep_last, keep_every_steps)``;
- an elastic job's supervisor, before a new generation's workers start:
  ``store.raise_fence(generation)``; its workers pass ``generation`` to ``open_writer``
  and ``commit``, and a commit of an older generation is refused (:mod:`.fence`);
- any reader (a restarting worker, ``paddlerun ckpt``): ``newest_complete()`` or
  ``snapshots()``, then ``with store.reading(info) as info:`` while it reads the files
  (``info.read_tensors(name)`` and ``info.read_json(name)`` check them against the manifest).

The layout is in :mod:`.layout`, the commit sequence in :mod:`.atomic`, the checks in
:mod:`.verify` and the locks in :mod:`.locks`.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from . import fence as fence_file
from . import layout
from . import manifest as mf
from .atomic import FileRecord, fsync_dir, write_bytes
from .errors import CheckpointError, NoWriterClaimError, StaleGenerationError, StepAlreadyExistsError
from .locks import ReaderMark, WriterClaim, exclusive
from .retention import steps_to_keep
from .snapshot import SnapshotInfo, _inspect, inspect_snapshot
from .staging import Staging

logger = logging.getLogger("paddlerun.checkpoint")


class CheckpointStore:
    """The snapshots of one checkpoints directory (usually ``RUN_DIR/checkpoints``).

    Constructing a store touches nothing on disk; readers never create anything but
    their reader marks.
    """

    def __init__(self, directory: Union[str, os.PathLike], lock_timeout_s: float = 60.0) -> None:
        if not isinstance(lock_timeout_s, (int, float)) or not 0 < lock_timeout_s < math.inf:
            raise ValueError(f"checkpoint.lock_timeout_s must be a positive number of seconds, "
                             f"got {lock_timeout_s!r}")
        self.directory = Path(directory)
        self.lock_timeout_s = float(lock_timeout_s)
        #: This store's writer claim, once :meth:`claim_writer` succeeded.
        self.claim: Optional[WriterClaim] = None

    def __repr__(self) -> str:
        return f"CheckpointStore({str(self.directory)!r})"

    @property
    def lock_path(self) -> Path:
        return self.directory / layout.LOCK_NAME

    @property
    def fence_path(self) -> Path:
        return self.directory / layout.FENCE_NAME

    # -- writing (rank 0 unless noted) -------------------------------------------------

    def claim_writer(self, owner: Mapping, generation: Optional[int] = None) -> WriterClaim:
        """Claim this directory for this process's job, or fail at once naming the owner's host and pid.

        ``owner`` (e.g. ``{"run_dir": ...}``) is recorded next to host, pid, start time and
        ``generation`` (an elastic job's, when given). The store keeps the claim
        (:attr:`claim`) for :meth:`prepare`; it is released by ``claim.release()``, or by the
        kernel when this process dies. Raises :class:`WriterBusyError` when another process
        holds it -- after waiting up to ``lock_timeout_s`` when that process is of an older
        generation than ``generation``: its supervisor is stopping it.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        self.claim = WriterClaim(self.directory, layout.WRITER_LOCK_NAME, layout.WRITER_OWNER_NAME,
                                 owner, generation=generation, wait_for_older_s=self.lock_timeout_s)
        return self.claim

    def open_writer(self, owner: Mapping, generation: Optional[int] = None) -> WriterClaim:
        """The start of a writing job: :meth:`claim_writer`, then :meth:`prepare`. A second job
        on this directory fails here, with the first job's host and pid, before it touches
        anything of the first job's."""
        claim = self.claim_writer(owner, generation)
        try:
            self.prepare()
            if not claim.recorded and not claim.record():
                logger.warning("claimed %s, but its owner record %s cannot be written (the disk "
                               "is full): a second job would not be told this one's pid",
                               self.directory, claim.owner_path)
        except BaseException:
            claim.release()
            self.claim = None
            raise
        return claim

    def prepare(self) -> None:
        """Create the directory and remove what an interrupted save or retention left. Rank 0 only,
        at start, before any rank calls :meth:`stage`, holding the writer claim
        (:meth:`claim_writer`; :meth:`open_writer` does both): without it, the staging
        directory removed might be the snapshot another live job is writing."""
        if self.claim is None or not self.claim.held:
            raise NoWriterClaimError(
                f"prepare() on {self.directory} without the writer claim: it removes every "
                f".staging-* directory, which may be a snapshot another job is writing right now. "
                f"Call claim_writer(owner) first (or open_writer(owner), which does both).",
                self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / layout.READERS_DIR).mkdir(exist_ok=True)
        with exclusive(self.lock_path, self.lock_timeout_s, "remove stale staging directories"):
            for entry in sorted(os.scandir(self.directory), key=lambda e: e.name):
                if entry.name.startswith(layout.STAGING_PREFIX):
                    what = "unfinished snapshot (a save was interrupted)"
                elif entry.name.startswith(layout.TRASH_PREFIX):
                    what = "partly deleted snapshot (a deletion was interrupted)"
                else:
                    continue
                logger.warning("removing stale %s %s", what, entry.path)
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)

    def stage(self, step: int, publish_marks: bool = True) -> Staging:
        """The staging directory of ``step``: the same path on every rank. Any rank may call it.

        ``publish_marks=False`` for the process that commits: it knows its own files, and
        only files other processes write need done marks (see :mod:`.staging`).
        """
        layout.check_step(step)
        path = self.directory / layout.staging_name(step)
        path.mkdir(parents=True, exist_ok=True)
        return Staging(path, step, publish_marks)

    def commit(self, staging: Staging, meta: Mapping, expect_files: Sequence[str] = (),
               wait_timeout_s: float = 300.0, generation: Optional[int] = None) -> Path:
        """Turn ``staging`` into the snapshot ``step-XXXXXXXX``; returns its path. Rank 0 only.

        Waits up to ``wait_timeout_s`` for every file in ``expect_files`` that other ranks
        write to be marked done, re-hashes those, writes ``manifest.json`` last (with
        ``meta``'s keys at its top level: epoch, world_size, ...), then renames the
        directory into place under the lock. Raises :class:`StepAlreadyExistsError` when a
        complete snapshot of this step exists (snapshots are never overwritten); a broken
        one is replaced, with a warning.

        ``generation`` (an elastic job's workers give theirs) is recorded in the manifest and
        checked against the fence (:meth:`raise_fence`) under the lock, before the rename:
        when a newer generation has started, :class:`StaleGenerationError` is raised and the
        staging directory removed. None: no check, no fence read (a fixed-size job).
        """
        if staging.path.parent.resolve() != self.directory.resolve():
            raise CheckpointError(f"{staging.path} does not belong to {self.directory}", staging.path)
        if generation is not None:
            meta = {**meta, "generation": fence_file.check_generation(generation)}
        final = self.directory / layout.snapshot_name(staging.step)
        self._refuse_complete(final)
        others = staging.wait_for([n for n in expect_files if n not in staging.records], wait_timeout_s)
        for name, published in others.items():
            # Kept on the staging object, so a commit retried after a lock timeout needs no marks.
            staging.records[name] = self._rehash(staging, published)
        records = dict(staging.records)
        self._refuse_unexpected(staging, records)
        try:
            manifest = mf.build(staging.step, records.values(), meta)
            data = mf.dumps(manifest)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"cannot commit {final}: bad meta ({exc})", final) from exc
        staging.remove_marks()
        write_bytes(staging.path / mf.MANIFEST_NAME, data)  # last, fsynced
        fsync_dir(staging.path)
        with exclusive(self.lock_path, self.lock_timeout_s, f"commit {final.name}"):
            if generation is not None:
                self._refuse_stale(staging, generation)
            self._refuse_complete(final, replace_broken=True)
            os.rename(staging.path, final)
            fsync_dir(self.directory)
        logger.info("committed snapshot %s (%d files, %.1f MB)", final, len(records),
                    sum(r.size for r in records.values()) / 1e6)
        return final

    def fence(self) -> int:
        """The generation fence in force: commits of an older generation are refused. 0: none."""
        return fence_file.read(self.fence_path)

    def raise_fence(self, generation: int) -> int:
        """Refuse, from now on, every commit of a generation older than ``generation``; returns
        the fence now in force. An elastic job's supervisor calls it before starting that
        generation's workers. Never lowers the fence (a late call for an older generation
        leaves it as it is). Takes the lock commits take, so a commit of an older generation
        either landed before this returns or is refused."""
        fence_file.check_generation(generation)
        self.directory.mkdir(parents=True, exist_ok=True)
        with exclusive(self.lock_path, self.lock_timeout_s, f"raise the generation fence to {generation}"):
            current = fence_file.read(self.fence_path)
            if generation <= current:
                return current
            fence_file.write(self.fence_path, generation)
        logger.info("generation fence of %s raised from %d to %d", self.directory, current, generation)
        return generation

    def apply_retention(self, keep_last: int, keep_every_steps: Optional[int] = None) -> List[Path]:
        """Delete old snapshots; returns the deleted paths. Rank 0 only, after a commit.

        Keeps the newest ``keep_last`` complete snapshots and every one whose step is a
        multiple of ``keep_every_steps``; never the newest complete one, never one a reader
        holds (see :meth:`reading`), never anything newer than the newest complete one.
        Broken snapshots older than that are deleted too. Each is first renamed to
        ``.trash-*`` under the lock, so no reader ever sees a half-deleted snapshot.
        """
        steps_to_keep((), keep_last, keep_every_steps)  # check the options before touching anything
        trashed: List[Tuple[Path, Path]] = []
        with exclusive(self.lock_path, self.lock_timeout_s, "delete old snapshots"):
            infos = self.snapshots()
            complete = [i.step for i in infos if i.complete]
            keep = steps_to_keep(complete, keep_last, keep_every_steps)
            newest = max(complete, default=-1)
            for info in infos:
                if info.step >= newest or info.step in keep:
                    continue
                trash = self._move_to_trash(info.path)
                if trash is None:
                    logger.info("retention: keeping %s for now: a reader holds it", info.path)
                    continue
                if not info.complete:
                    logger.warning("retention: deleted %s snapshot %s (%s)", info.state, info.path, info.problem)
                trashed.append((info.path, trash))
        for original, trash in trashed:
            try:
                shutil.rmtree(trash)
            except OSError as exc:
                logger.warning("could not remove %s (%s); the next prepare() retries", trash, exc)
            logger.info("retention: deleted %s", original)
        return [original for original, _ in trashed]

    # -- reading (any process) ------------------------------------------------------------

    def snapshots(self, verify: bool = False) -> List[SnapshotInfo]:
        """Every ``step-*`` directory, oldest first, with its state.

        ``verify=False`` checks the manifest and file sizes; ``verify=True`` also sha256 and
        file contents. A snapshot deleted while being looked at is left out.
        """
        found = (_inspect(path, step, verify) for step, path in self._step_dirs())
        return [info for info in found if info is not None]

    def newest_complete(self, verify: bool = True) -> Optional[SnapshotInfo]:
        """The newest snapshot that passes every check, or None. Each newer one that fails is
        logged as a WARNING naming the bad file and the reason."""
        for step, path in reversed(self._step_dirs()):
            info = _inspect(path, step, verify)
            if info is None:
                continue
            if info.complete:
                return info
            logger.warning("skipping snapshot %s (%s): %s; falling back to an older one",
                           path, info.state, info.problem)
        return None

    @contextlib.contextmanager
    def reading(self, snapshot: Union[SnapshotInfo, str, os.PathLike]) -> Iterator[SnapshotInfo]:
        """Hold a reader mark on a snapshot, so retention leaves it alone while you read it.

        The snapshot may live in another checkpoints directory (``resume_from``): the mark is
        placed next to it. Yields the snapshot re-checked (cheaply) under the mark; raises
        :class:`CheckpointError` if it is no longer complete or was replaced since listed.
        """
        path = snapshot.path if isinstance(snapshot, SnapshotInfo) else Path(snapshot)
        mark = self._reader_mark(path)
        try:
            info = inspect_snapshot(path, verify=False) if os.path.lexists(path) else None
            if info is None or not info.complete:
                raise CheckpointError(
                    f"snapshot {path} is no longer complete "
                    f"({info.problem if info else 'it does not exist; deleted by retention?'}); "
                    f"pick another one with newest_complete()", path)
            if isinstance(snapshot, SnapshotInfo) and snapshot.manifest not in (None, info.manifest):
                raise CheckpointError(f"snapshot {path} was replaced since it was listed; list again", path)
            yield info
        finally:
            if mark is not None:
                mark.release()

    # -- internals ------------------------------------------------------------------------

    def _step_dirs(self) -> List[Tuple[int, Path]]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        steps = ((layout.parse_step(name), name) for name in names)
        return sorted((step, self.directory / name) for step, name in steps if step is not None)

    def _refuse_complete(self, final: Path, replace_broken: bool = False) -> None:
        """Raise if ``final`` is a complete snapshot; under the lock, move a broken one aside."""
        if not os.path.lexists(final):
            return
        # Hash it (rare: only when the step exists already): a snapshot whose content was
        # corrupted at the same size would otherwise block every later save of this step.
        info = _inspect(final, layout.parse_step(final.name), verify=True)
        if info is None:
            return
        if info.complete:
            raise StepAlreadyExistsError(
                f"snapshot {final} already exists and is complete; snapshots are never overwritten. "
                f"Resume from it, or delete it before saving step {info.step} again.", final)
        if replace_broken:
            logger.warning("replacing %s snapshot %s (%s)", info.state, final, info.problem)
            trash = self._move_to_trash(final)
            if trash is None:
                raise CheckpointError(f"cannot replace the broken snapshot {final}: a reader holds it", final)
            shutil.rmtree(trash, ignore_errors=True)

    def _refuse_stale(self, staging: Staging, generation: int) -> None:
        """Under the lock: raise, removing ``staging``, when the fence is above ``generation``."""
        fence = fence_file.read(self.fence_path)
        if fence <= generation:
            return
        shutil.rmtree(staging.path, ignore_errors=True)
        raise StaleGenerationError(
            f"refused to commit step {staging.step} into {self.directory}: this worker is of "
            f"generation {generation}, but the job has moved on to generation {fence} (the fence "
            f"{self.fence_path}). A newer generation of workers owns the checkpoints now; this "
            f"worker must stop. Its snapshot was discarded.", self.fence_path, generation, fence,
            staging.step)

    def _rehash(self, staging: Staging, published: FileRecord) -> FileRecord:
        path = staging.path / published.name
        try:
            problem = published.mismatch_of_file(path, source="its done mark")
        except OSError as exc:
            raise CheckpointError(f"cannot read {path}, which its writer marked done: {exc}", path) from exc
        if problem:
            raise CheckpointError(
                f"{path} does not match what its writer published ({problem}): it changed after it was marked done. "
                f"Two processes may be writing the same file.", path)
        return published

    def _refuse_unexpected(self, staging: Staging, records: Mapping[str, FileRecord]) -> None:
        present = {e.name for e in os.scandir(staging.path)
                   if not e.name.startswith(".") and e.name != mf.MANIFEST_NAME}  # from an earlier try
        unexpected = sorted(present - set(records))
        if unexpected:
            raise CheckpointError(
                f"{staging.path} holds {', '.join(unexpected)}, written by another process but not "
                f"listed in expect_files; list every file other ranks write.", staging.path)
        if not records:
            raise CheckpointError(f"nothing was written into {staging.path}; refusing to commit an "
                                  f"empty snapshot", staging.path)

    def _reader_mark(self, snapshot: Path) -> Optional[ReaderMark]:
        readers = snapshot.parent / layout.READERS_DIR
        try:
            readers.mkdir(exist_ok=True)
            return ReaderMark.take_shared(readers / f"{snapshot.name}.lock", self.lock_timeout_s)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT):
                raise
            # Read-only media or another user's run: nobody who cannot write there deletes from it.
            logger.info("cannot place a reader mark in %s (%s); reading %s without one",
                        readers, exc, snapshot)
            return None

    def _move_to_trash(self, path: Path) -> Optional[Path]:
        """Rename a snapshot to ``.trash-*`` (call under the lock); None if a reader holds it."""
        readers = self.directory / layout.READERS_DIR
        readers.mkdir(exist_ok=True)
        mark = ReaderMark.try_take(readers / f"{path.name}.lock", exclusive=True)
        if mark is None:
            return None
        with mark:
            trash = self.directory / f"{layout.TRASH_PREFIX}{path.name}-{secrets.token_hex(4)}"
            os.rename(path, trash)
            fsync_dir(self.directory)
            mark.unlink()
        return trash


def resolve_snapshot(path: Union[str, os.PathLike], verify: bool = True,
                     step: Optional[int] = None) -> Path:
    """The snapshot ``path`` means: a snapshot dir itself (returned as is, not checked: use
    :func:`inspect_snapshot`), a checkpoints dir (its newest complete snapshot) or a run dir
    (``RUN_DIR/checkpoints``'s newest complete snapshot). With ``step``, a checkpoints or run
    dir means its snapshot of that step (returned unchecked, like a snapshot dir)."""
    p = Path(path)
    expected = "expected a snapshot dir (step-XXXXXXXX), a checkpoints dir or a run dir"
    if not p.is_dir():
        raise CheckpointError(f"{p} {'is not a directory' if p.exists() else 'does not exist'}; {expected}", p)
    if layout.parse_step(p.name) is not None or (p / mf.MANIFEST_NAME).exists():
        return p
    directory = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    if step is not None:
        return directory / layout.snapshot_name(step)
    store = CheckpointStore(directory)
    if directory == p and not store._step_dirs() and not store.lock_path.exists():
        raise CheckpointError(f"{p} holds no snapshot, no step-* directory and no checkpoints/; {expected}", p)
    info = store.newest_complete(verify=verify)
    if info is None:
        found = store.snapshots()
        detail = (f"{len(found)} found, none complete; the newest, {found[-1].path.name}, is "
                  f"{found[-1].state}: {found[-1].problem}") if found else "it holds no step-* directory"
        raise CheckpointError(f"no complete snapshot in {directory}: {detail}", directory)
    return info.path
