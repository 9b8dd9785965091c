"""Rank 0's progress display, in the style of Paddle's hapi ``ProgBarLogger``.

On a terminal one line per epoch is rewritten in place; elsewhere (log files, CI)
each logged step is a plain line.
"""
from __future__ import annotations

import sys
import time
from typing import Mapping, Optional, TextIO


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds >= 3600:
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    if seconds >= 60:
        return f"{seconds // 60}:{seconds % 60:02d}"
    return f"{seconds}s"


class Progress:
    def __init__(self, epochs: int, steps_per_epoch: int, total_steps: int, tty: bool,
                 stream: Optional[TextIO] = None):
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.tty = tty
        self.stream = stream or sys.stdout
        self._open_line = False

    def epoch_begin(self, epoch: int) -> None:
        self._end_line()
        self._write(f"Epoch {epoch + 1}/{self.epochs}\n")

    def step(self, batch_in_epoch: int, global_step: int, values: Mapping[str, float],
             samples_per_s: float, seconds_left: float) -> None:
        parts = [f"step {batch_in_epoch}/{self.steps_per_epoch}"]
        parts += [f"{k}: {v:.4f}" for k, v in values.items()]
        parts += [f"{samples_per_s:.0f} samples/s", f"ETA: {_duration(seconds_left)}",
                  f"global step {global_step}/{self.total_steps}"]
        line = " - ".join(parts)
        if self.tty:
            self._write("\r" + line + "\033[K")
            self._open_line = True
        else:
            self._write(line + "\n")

    def message(self, text: str) -> None:
        self._end_line()
        self._write(text + "\n")

    def _end_line(self) -> None:
        if self._open_line:
            self._write("\n")
            self._open_line = False

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


class Throughput:
    """Samples per second over the steps since the last call, and the ETA from the whole run."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.last_samples = 0

    def update(self, samples_done: int, steps_done: int, steps_left: int) -> tuple:
        now = time.perf_counter()
        rate = (samples_done - self.last_samples) / max(now - self.last, 1e-9)
        self.last, self.last_samples = now, samples_done
        per_step = (now - self.start) / max(steps_done, 1)
        return rate, per_step * steps_left
