"""What the user sees of an attempt: ``launch.log`` copied to the console as it grows.

Paddle's launcher copies its local rank 0's ``workerlog.0`` into its own output
(``launch.log``) every ~2 s. When a failed attempt is torn down, the launcher may not
have copied the last lines yet -- often the most telling ones (the last steps, the
emergency snapshot). :func:`unshown_lines` finds them, so the supervisor can show them.

The console leaves out what only fills it: httpx logs every request Paddle's launcher makes
to its HTTP master, twice a second while a node waits for its peers (202 lines in under a
minute, measured). ``launch.log`` keeps every line.
"""
from __future__ import annotations

import bisect
import re
from pathlib import Path
from typing import Dict, List, Optional, TextIO

#: How much of the end of each log is compared (the launcher copies up to 1000 lines at a time).
TAIL_BYTES = 256 << 10
#: At most this many lines are shown: a mismatch can only cost this many repeated lines.
MAX_LINES = 50
#: Worker lines before a matched one that must be in the launch log too, in order.
CONTEXT = 2
#: A line of the launch log that the console does not show: httpx's record of a request
#: (``HTTP Request: GET http://host:port/default/info "HTTP/1.0 200 OK"``).
CONSOLE_NOISE = re.compile(rb'HTTP Request: [A-Z]+ \S+ "HTTP/')


class LaunchLogForwarder:
    """Copies what was appended to ``launch.log`` since the last call to ``stream``."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.path = None
        self.pos = 0
        self.partial: Optional[bool] = None  # the last read ended inside a line: shown?

    def follow(self, path: Path, pos: int) -> None:
        """Forward ``path`` from byte ``pos`` on (a new attempt's log)."""
        self.path, self.pos, self.partial = path, pos, None

    def forward(self) -> None:
        if self.path is None:
            return
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return
        if data:
            self.pos += len(data)
            shown = self._without_noise(data)
            if shown:
                self.write(shown)

    def _without_noise(self, data: bytes) -> bytes:
        """``data`` without its :data:`CONSOLE_NOISE` lines. A line cut by a read is judged
        by the part read first; the rest of it follows that judgement."""
        pieces = data.split(b"\n")  # the last one is the start of a line still being written
        shown = []
        keep = True
        for i, piece in enumerate(pieces):
            if i == 0 and self.partial is not None:
                keep = self.partial
            else:
                keep = not CONSOLE_NOISE.search(piece)
            if keep:
                shown.append(piece + b"\n" if i < len(pieces) - 1 else piece)
        self.partial = None if len(pieces) > 1 and pieces[-1] == b"" else keep
        return b"".join(shown)

    def write(self, data: bytes) -> None:
        out = getattr(self.stream, "buffer", None)
        if out is not None:
            self.stream.flush()
            out.write(data)
            out.flush()
        else:
            self.stream.write(data.decode(errors="replace"))


def unshown_lines(worker_log: Path, launch_log: Path) -> List[str]:
    """The last lines of ``worker_log`` that ``launch_log`` does not show yet.

    The launcher copies the worker's log in order, line by line, so what it has not
    copied is what follows the last worker line found in ``launch_log`` -- found together
    with the ``CONTEXT`` worker lines before it, in that order: a line as common as
    "Traceback (most recent call last):" is also in the launcher's own output when it is
    stopped, and alone it would hide every worker line before it. A match can only make
    this show too little, never a line twice.
    """
    worker = tail_lines(worker_log)
    where: Dict[str, List[int]] = {}
    for i, line in enumerate(tail_lines(launch_log)):
        where.setdefault(line, []).append(i)
    for k in range(len(worker) - 1, -1, -1):
        if _shown_in_order(worker[max(k - CONTEXT, 0):k + 1], where):
            return worker[k + 1:][-MAX_LINES:]
    return worker[-MAX_LINES:]


def _shown_in_order(lines: List[str], where: Dict[str, List[int]]) -> bool:
    """Whether ``lines`` appear in the launch log in this order (other lines between)."""
    before = None  # the position of the line after, going backwards
    for line in reversed(lines):
        positions = where.get(line, [])
        i = len(positions) if before is None else bisect.bisect_left(positions, before)
        if i == 0:
            return False
        before = positions[i - 1]
    return True


def tail_lines(path: Path, nbytes: int = TAIL_BYTES) -> List[str]:
    """The whole lines in the last ``nbytes`` of a log ([] if there is no such file)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            start = max(f.tell() - nbytes, 0)
            f.seek(start)
            lines = f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    return lines[1:] if start else lines  # the first line may be cut
