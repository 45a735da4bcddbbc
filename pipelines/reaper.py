"""Ends what a job's own local Ray cluster leaves running when the job dies without shutting it down.

A job run without ``RAY_ADDRESS`` starts a Ray cluster inside its own process tree. Ray ties its GCS and
raylet to that process (the kernel kills them with it), but not what the raylet started: killed with
SIGKILL (the OOM killer, ``kill -9``, a lost container shell), the job left its task workers finishing
their tasks and Ray's dashboard and runtime-env agents running for good, re-parented to init.

`watch_this_process()` starts this module as a small separate process, in its own session (a Ctrl-C or a
kill of the job's process group does not reach it), holding the read end of a pipe whose write end only
the job holds. Once a second it records the job's descendants (pid and start time, so a reused pid is
never taken for one of them). When the pipe reaches end of file (the job ended, however) it sends
SIGTERM to every recorded process still running and to what they started since, then SIGKILL to what is
left after a grace period, and exits. A job that shut Ray down leaves nothing to end. Linux only (it
reads /proc); elsewhere it is not started.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from typing import IO

GRACE_S = 3.0  # between SIGTERM and SIGKILL: workers finish writing a file atomically or not at all
_reaper: subprocess.Popen[bytes] | None = None


def watch_this_process() -> None:
    """Start the reaper for this process, once (see the module docstring); nothing without /proc."""
    global _reaper
    if _reaper is not None or not os.path.isdir(f"/proc/{os.getpid()}"):
        return
    _reaper = subprocess.Popen(
        [sys.executable, "-m", "pipelines.reaper", str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time in clock ticks since boot) of a running process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode(errors="replace")
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()  # after "pid (comm) ", which may hold spaces and parens
    if len(fields) < 20 or fields[0] == "Z":  # a zombie has ended: its parent only has to collect it
        return None
    return int(fields[1]), fields[19]


def _processes() -> dict[int, tuple[int, str]]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := _stat(int(name))) is not None:
            out[int(name)] = stat
    return out


def descendants(roots: dict[int, str]) -> dict[int, str]:
    """Every running process below the given ones (pid → start time), the roots excluded."""
    table = _processes()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found: dict[int, str] = {}
    todo = [pid for pid, started in roots.items() if pid in table and table[pid][1] == started]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found and child not in roots and child != os.getpid():  # not the reaper
                found[child] = table[child][1]
                todo.append(child)
    return found


def _still(processes: dict[int, str]) -> dict[int, str]:
    """Those of ``processes`` that still run as the same process (not a reused pid)."""
    return {pid: started for pid, started in processes.items() if (_stat(pid) or (0, ""))[1] == started}


def _signal(processes: dict[int, str], signum: int) -> None:
    for pid in processes:
        with contextlib.suppress(OSError):  # ended meanwhile
            os.kill(pid, signum)


def watch(job: int, pipe: IO[bytes], interval_s: float = 1.0) -> dict[int, str]:
    """Record the job's descendants until ``pipe`` ends, then end those still running (and what they
    started since). Returns what it signalled."""
    job_stat = _stat(job)
    if job_stat is None:
        return {}
    job_root = {job: job_stat[1]}
    known: dict[int, str] = {}
    while True:
        known.update(descendants(job_root))
        ready, _, _ = select.select([pipe], [], [], interval_s)
        if ready and not os.read(pipe.fileno(), 4096):
            break
    left = _still(known)
    left.update(descendants(left))
    if not left:
        return {}
    _signal(left, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while (remaining := _still(left)) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal(remaining, signal.SIGKILL)
    return left


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the job must not end its reaper
    watch(int(sys.argv[1]), sys.stdin.buffer)


if __name__ == "__main__":
    main()
