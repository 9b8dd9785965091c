"""Which snapshots to keep: a pure policy, applied by ``CheckpointStore.apply_retention``."""
from __future__ import annotations

from typing import Iterable, Optional, Set


def steps_to_keep(complete_steps: Iterable[int], keep_last: int,
                  keep_every_steps: Optional[int] = None) -> Set[int]:
    """The newest ``keep_last`` complete steps, plus every one that is a multiple of ``keep_every_steps``.

    ``keep_last`` must be at least 1, so the newest complete snapshot is always kept.
    """
    if not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"checkpoint.keep_last must be an int >= 1 (the newest complete "
                         f"snapshot is always kept), got {keep_last!r}")
    if keep_every_steps is not None and (not isinstance(keep_every_steps, int) or keep_every_steps < 1):
        raise ValueError(f"checkpoint.keep_every_steps must be an int >= 1 or null, got {keep_every_steps!r}")
    steps = sorted(set(complete_steps))
    keep = set(steps[-keep_last:])
    if keep_every_steps:
        keep.update(s for s in steps if s % keep_every_steps == 0)
    return keep
