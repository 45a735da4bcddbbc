"""What a process does with SIGINT, read from /proc (Linux)."""

from __future__ import annotations

import signal
from pathlib import Path

_BIT = 1 << (signal.SIGINT - 1)


def _fields(status: str) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)


def sigint_gets_through(pid: int) -> bool:
    """Whether a SIGINT sent to ``pid`` would run its handler or default action: not ignored, and some
    thread of it does not block it (the kernel hands a process's signal to any such thread). False for a
    process that has ended."""
    try:
        if int(_fields(Path(f"/proc/{pid}/status").read_text())["SigIgn"], 16) & _BIT:
            return False
        masks = [
            _fields(task.joinpath("status").read_text())["SigBlk"]
            for task in Path(f"/proc/{pid}/task").iterdir()
        ]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return any(not int(mask, 16) & _BIT for mask in masks)


def sigint_has_a_handler(pid: int) -> bool:
    """Whether ``pid`` has a SIGINT handler installed (Python's raises KeyboardInterrupt, which a
    non-forced `ray.cancel` triggers without any signal). False for a process that has ended."""
    try:
        return bool(int(_fields(Path(f"/proc/{pid}/status").read_text())["SigCgt"], 16) & _BIT)
    except FileNotFoundError:
        return False
