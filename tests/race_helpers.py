"""Contenders released at once, for the lock tests: each thread reports one outcome."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

Contender = Callable[[threading.Barrier, list[str], threading.Event], None]


def race(contender: Contender, contenders: int, timeout_s: float) -> list[str]:
    """Run ``contender(start, outcomes, done)`` in that many threads, which wait on ``start`` together and
    each append one outcome. ``done`` is set once all have one (or after ``timeout_s``), so that a winner
    holds what it won until the others have been refused. Returns the outcomes."""
    start, outcomes, done = threading.Barrier(contenders), [], threading.Event()
    threads = [threading.Thread(target=contender, args=(start, outcomes, done)) for _ in range(contenders)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout_s
    while len(outcomes) < contenders and time.monotonic() < deadline:
        time.sleep(0.01)
    done.set()
    for thread in threads:
        thread.join(timeout=30)
    return outcomes
