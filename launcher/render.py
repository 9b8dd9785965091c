"""Text for a terminal: aligned tables, sizes, ages and times (``paddlerun ckpt``/``status``).

Every function is pure: it takes numbers and returns strings, so the commands stay
readable and the same words appear everywhere ("1.2 MB", "3m ago", "2026-11-29 22:36:57").
"""
from __future__ import annotations

import json
import math
import time
from typing import Any, Optional, Sequence


def size(n: Optional[int]) -> str:
    """Bytes in decimal units, the way ``ls -lh --si`` and the store's log lines count them."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def duration(seconds: Optional[float]) -> str:
    """A short span: 0.4s, 12s, 3m05s, 2h10m, 3d4h."""
    if seconds is None:
        return "-"
    s = max(float(seconds), 0.0)
    if s < 10:
        return f"{s:.1f}s"
    if s < 60:
        return f"{s:.0f}s"
    minutes, secs = divmod(int(s), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours}h"


def age(when: Optional[float], now: Optional[float] = None) -> str:
    """How long ago a unix time was: ``3m05s ago`` (a clock ahead of ours: ``in the future``)."""
    if when is None:
        return "-"
    now = time.time() if now is None else now
    if when - now > 1.0:
        return f"{duration(when - now)} in the future (clock skew?)"
    return f"{duration(now - when)} ago"


def local_time(when: Optional[float]) -> str:
    """A unix time as local wall-clock time, to the second."""
    if when is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


def number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces; the last column is never padded."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def dumps(obj: Any) -> str:
    """JSON for ``--json``: indented, keys in the order built. A NaN or infinite float (a
    diverged loss) becomes the string "nan" / "inf" / "-inf": bare NaN is not JSON and
    ``jq`` refuses it."""
    return json.dumps(_finite(obj), indent=2, allow_nan=False, default=str)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
