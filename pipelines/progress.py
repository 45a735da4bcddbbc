"""One progress line format for long driver-side work: done/total, rate, ETA, printed every few seconds.

Jobs print their own concise progress on the console (Ray's progress bars and per-task chatter are off, and
stay in Ray's logs): `[translate] 120/600 images  41.3 images/s  ETA 0m11s`.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import TextIO


class Pace:
    """Units per second as a job goes now, for its ETA: counted from its first finished unit (the time to a
    first result is start-up, or a storage that stalled, not pace: a build that waited 35 s on S3 said
    "0.0 images/s, ETA 277:46" three seconds before it ended), over the last `window_s` seconds once it
    has run that long, so that the ETA follows a change of pace. None until a second update."""

    def __init__(self, window_s: float = 30.0) -> None:
        self.window_s = window_s
        self.points: deque[tuple[float, int]] = deque()

    def update(self, now: float, done: int) -> float | None:
        self.points.append((now, done))
        while len(self.points) > 2 and now - self.points[1][0] >= self.window_s:
            self.points.popleft()
        then, done_then = self.points[0]
        return (done - done_then) / (now - then) if done > done_then and now > then else None


def rate_text(rate: float) -> str:
    """A rate for a progress line: "--" before there is one."""
    return f"{rate:.1f}" if rate > 0 else "--"


class Progress:
    def __init__(
        self, prefix: str, total: int, unit: str, every_s: float = 5.0, out: TextIO | None = None
    ) -> None:
        self.prefix, self.total, self.unit, self.every_s = prefix, total, unit, every_s
        self.out = out or sys.stdout
        self.done = 0
        self.started = time.perf_counter()
        self.printed = self.started
        self.pace = Pace()
        self.rate: float | None = None

    def update(self, count: int = 1, extra: str = "") -> None:
        """Add `count` finished units; prints when `every_s` passed since the last line, or at the end."""
        self.done += count
        now = time.perf_counter()
        self.rate = self.pace.update(now, self.done)
        if now - self.printed >= self.every_s or self.done >= self.total:
            self.printed = now
            print(self.line(extra), file=self.out, flush=True)

    def line(self, extra: str = "") -> str:
        elapsed = time.perf_counter() - self.started
        # The whole run's rate at the end; the current pace on the way.
        rate = self.done / elapsed if self.done >= self.total and elapsed > 0 else self.rate or 0.0
        remaining = max(0, self.total - self.done)
        eta = f"ETA {int(remaining / rate // 60)}m{int(remaining / rate % 60):02d}s" if rate > 0 else ""
        parts = [
            f"[{self.prefix}] {self.done}/{self.total} {self.unit}",
            f"{rate_text(rate)} {self.unit}/s",
            eta,
            extra,
        ]
        return "  ".join(p for p in parts if p)


def quiet_ray_data() -> None:
    """Ray Data's progress bars and INFO lines off the console (they stay in Ray's logs): the job prints
    its own progress line."""
    import logging

    from ray.data import DataContext

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Its warning that progress bars are off is about this very choice.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False
