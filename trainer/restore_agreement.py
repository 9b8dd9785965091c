"""Every rank resumes from the same snapshot, or none trains.

A rank that picked "the newest complete snapshot" on its own could pick another one than
its peers after a transient read or hash failure, and its replica would train on from
other parameters and another position, silently. So restore is an agreement, in two
collectives (both only when world > 1, at the same point on every rank):

1. :func:`agree_on_choice`: rank 0 broadcasts the snapshot it resumed from -- where (the
   run's own checkpoints or ``resume_from``), its step and its manifest's sha256, which
   names every file's sha256;
2. :func:`agree_all_loaded`: every rank says whether it loaded exactly that one, with its
   reason if not (one all-reduce of a row of bytes per rank); if any did not, every rank
   raises :class:`RestoreDisagreement` with the same message naming each such rank and its
   reason. The attempt fails; a restart tries again (a transient fault passes).

Gloo and paddle.distributed carry tensors, not text: the choice and the reasons travel as
integer tensors (no pickle, unlike ``broadcast_object_list``).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import paddle
import paddle.distributed as dist

from paddlerun.trainer.checkpoint import CheckpointError

#: Bytes of each rank's reason carried to the others (the rank's own log has all of it).
REASON_BYTES = 512


class SnapshotSource(IntEnum):
    """Where the chosen snapshot lives (its number travels in the broadcast)."""
    NONE = 0          # nothing usable: every rank starts from scratch
    OWN = 1           # the run's own checkpoints directory
    RESUME_FROM = 2   # checkpoint.resume_from


class RestoreDisagreement(CheckpointError):
    """A rank could not load the snapshot rank 0 resumed from; every rank raises it."""


@dataclass(frozen=True)
class RestoreChoice:
    source: SnapshotSource
    step: int = -1
    manifest_sha256: str = ""
    #: Rank 0's path of it, for messages only (other ranks find it by source and step).
    path: str = ""

    @classmethod
    def nothing(cls) -> "RestoreChoice":
        return cls(SnapshotSource.NONE)

    def describe(self) -> str:
        if self.source is SnapshotSource.NONE:
            return "no snapshot"
        where = "the run's checkpoints" if self.source is SnapshotSource.OWN else "resume_from"
        return (f"step {self.step} of {where} ({self.path + ', ' if self.path else ''}manifest "
                f"sha256 {self.manifest_sha256[:16]}...)")


def agree_on_choice(choice: RestoreChoice) -> RestoreChoice:
    """Rank 0's ``choice`` on every rank (the others pass anything)."""
    digest = bytes.fromhex(choice.manifest_sha256) if choice.manifest_sha256 else bytes(32)
    words = np.concatenate([[int(choice.source), choice.step], np.frombuffer(digest, dtype="<i8")])
    t = paddle.to_tensor(words.astype(np.int64))
    dist.broadcast(t, src=0)
    got = t.numpy().astype("<i8")
    source = SnapshotSource(int(got[0]))
    if source is SnapshotSource.NONE:
        return RestoreChoice.nothing()
    return RestoreChoice(source, int(got[1]), got[2:6].tobytes().hex(),
                         choice.path if dist.get_rank() == 0 else "")


def agree_all_loaded(choice: RestoreChoice, failure: str, rank: int, world_size: int) -> None:
    """Every rank: ``failure`` is this rank's reason for not loading ``choice`` ("" when it
    did). Raises :class:`RestoreDisagreement` on every rank when any rank failed."""
    rows = np.zeros((world_size, REASON_BYTES), dtype=np.int32)
    if failure:
        reason = failure.encode("utf-8", "replace")[:REASON_BYTES - 1] or b"?"
        rows[rank, :len(reason)] = np.frombuffer(reason, dtype=np.uint8)
    t = paddle.to_tensor(rows)
    dist.all_reduce(t)
    summed = t.numpy()
    failed = {r: bytes(summed[r].astype(np.uint8)).rstrip(b"\0").decode("utf-8", "replace")
              for r in range(world_size) if summed[r].any()}
    if failed:
        reasons = "; ".join(f"rank {r}: {why}" for r, why in sorted(failed.items()))
        raise RestoreDisagreement(
            f"rank 0 resumed from {choice.describe()}, but {len(failed)} rank(s) could not load it "
            f"-- {reasons}. No rank trains from another snapshot than its peers: this attempt "
            f"stops, and a restart tries again. If it repeats, run `paddlerun ckpt verify` on that "
            f"snapshot from the failing rank's host (a checkpoints directory every node sees alike)."
        )
