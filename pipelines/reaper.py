"""Ends what a job's own local Ray cluster leaves running when the job dies without shutting it down.

A job run without ``RAY_ADDRESS`` starts a Ray cluster inside its own process tree. Ray ties its GCS and
raylet to that process (the kernel kills them with it), but not what the raylet started: killed with
SIGKILL (the OOM killer, ``kill -9``, a lost container shell), the job left its task workers finishing
their tasks and Ray's dashboard and runtime-env agents running for good, re-parented to init.

`watch_this_process()` starts this file as a small separate process, in its own session (a Ctrl-C or a
kill of the job's process group does not reach it), its standard input the read end of a pipe whose write
end only the job holds, its output nowhere and no other file of the job's open (a caller reading the job's
output gets its end of file when the job ends). While the job starts Ray (`tagging`), a tag naming the job
(pid and start time) is in its environment: Ray's processes inherit it, and so do the workers the raylet
starts later. Once a second the reaper records the job's descendants (pid and start time, so a reused pid
is never taken for one of them). When the pipe reaches end of file (the job ended, however), or its own
parent is no longer the job (a child the job forked without exec still holds the pipe), it sends
SIGTERM to every recorded process still running, to what they started since, and to every process carrying
the tag (those started after the last look, re-parented to init when the raylet died), then SIGKILL to
what is left after a grace period, and exits. A job that shut Ray down leaves nothing to end.

It needs only the standard library (it runs isolated, ``python -I``, so no folder named ``pipelines`` in
the working directory can stand in for it), refuses to run unless its parent is the job it was told (pid
and start time) and its input is a pipe (run by hand it would end a whole process tree), and is not started
where nothing could outlive the job (pid 1: a container's entrypoint takes every process with it) or
without /proc.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import stat
import sys
import time
from collections.abc import Iterator
from typing import IO

GRACE_S = 3.0  # between SIGTERM and SIGKILL: workers finish writing a file atomically or not at all
LATE_S = 0.5  # after the job's end, when the tagged processes are looked for again
TAG = "P2P_REAPER_JOB"  # in the job's environment: "<pid>:<start time>"
_tag = ""  # this job's tag once its reaper runs: "<pid>:<start time>"


def watch_this_process() -> None:
    """Start the reaper for this process, once (see the module docstring)."""
    global _tag
    me = os.getpid()
    if _tag or me == 1 or (own := _stat(me)) is None:
        return
    read_end, write_end = os.pipe()  # both close-on-exec: no child the job execs holds the write end
    try:
        # posix_spawn, not Popen: no object whose finaliser would warn at exit that the reaper still runs.
        os.posix_spawn(
            sys.executable,
            [sys.executable, "-I", os.path.abspath(__file__), str(me), own[1]],
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, read_end, 0),
                (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
            ],
            setsid=True,
        )
    except OSError:
        os.close(write_end)
        return
    finally:
        os.close(read_end)
    _tag = f"{me}:{own[1]}"  # the write end stays open, unused, until this process ends


@contextlib.contextmanager
def tagging() -> Iterator[None]:
    """Processes this job starts meanwhile (a local Ray cluster: its GCS, raylet and agents, and the workers
    the raylet starts later) carry the job's tag, for the reaper's last look. Only meanwhile: a helper the
    job starts on its own later is not Ray's."""
    if not _tag:
        yield
        return
    os.environ[TAG] = _tag
    try:
        yield
    finally:
        os.environ.pop(TAG, None)


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
        if name.isdigit() and (stat_ := _stat(int(name))) is not None:
            out[int(name)] = stat_
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


def tagged(tag: str) -> dict[int, str]:
    """Running processes whose environment holds ``TAG=tag`` (the reaper excepted)."""
    needle = f"{TAG}={tag}".encode()
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as fh:
                if needle not in fh.read().split(b"\0"):
                    continue
        except OSError:  # gone, or another user's
            continue
        if (stat_ := _stat(int(name))) is not None:
            found[int(name)] = stat_[1]
    return found


def _still(processes: dict[int, str]) -> dict[int, str]:
    """Those of ``processes`` that still run as the same process (not a reused pid)."""
    return {pid: started for pid, started in processes.items() if (_stat(pid) or (0, ""))[1] == started}


def _signal(processes: dict[int, str], signum: int) -> None:
    for pid in processes:
        with contextlib.suppress(OSError):  # ended meanwhile
            os.kill(pid, signum)


def watch(job: int, pipe: IO[bytes], interval_s: float = 1.0) -> dict[int, str]:
    """Record the job's descendants (``job`` is this process's parent) until ``pipe`` ends or the job does,
    then end those still running, what they started since, and what carries the job's tag. Returns what it
    signalled."""
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
        # A child the job forked without exec holds the pipe's write end too, and may outlive the job: the
        # job's end then shows only as this process being handed to another parent.
        if os.getppid() != job:
            break
    tag = f"{job}:{job_stat[1]}"
    left = _still(known)
    left.update(tagged(tag))
    left.update(descendants(left))
    _signal(left, signal.SIGTERM)
    ended = time.monotonic()
    while (remaining := _still(left)) and time.monotonic() < ended + GRACE_S:
        time.sleep(0.1)
    # A second look: what the dying processes started meanwhile (a raylet's last worker) carries the tag.
    time.sleep(max(0.0, ended + LATE_S - time.monotonic()))
    late = {pid: t for pid, t in tagged(tag).items() if pid not in left}
    _signal({**remaining, **late}, signal.SIGKILL)
    return {**left, **late}


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the job must not end its reaper
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # the job's caller's pipes: not held open by the reaper
    job = int(sys.argv[1]) if len(sys.argv) == 3 and sys.argv[1].isdigit() else 0
    # Its parent, that very process (pid and start time, passed by it), on a pipe.
    mine = job > 1 and os.getppid() == job and (_stat(job) or (0, ""))[1] == sys.argv[2]
    if not mine or not stat.S_ISFIFO(os.fstat(0).st_mode):
        sys.exit("pipelines/reaper.py is started by a p2p job for itself (watch_this_process), not by hand")
    watch(job, sys.stdin.buffer)


if __name__ == "__main__":
    main()
