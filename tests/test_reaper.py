"""`pipelines.reaper` with real processes, without Ray: a job killed with SIGKILL takes its process tree
with it, and what a dying child of the job starts after the job's end (a raylet's last worker, re-parented
to init) too; run by hand with a wrong pid, the reaper ends nothing. And a local cluster's dashboard
ignores a terminal's Ctrl-C (`pipelines.runtime.dashboard_ignores_sigint`). The same with a real Ray
cluster: tests/test_build_dataset.py::test_killed_build_rerun_leaves_a_complete_unique_dataset."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from process_helpers import sigint_gets_through

from pipelines import reaper

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="the reaper reads /proc (Linux)")

# The job: starts its reaper, a child, a grandchild (through a shell), and a "raylet" that outlives the job
# by a moment (it ignores SIGTERM) and then starts one more process, through a shell that exits at once:
# re-parented to init, outside any tree the reaper saw, found only by the tag it inherited. And a child
# forked without exec, which holds the job's end of the reaper's pipe. Then the job writes the pids it knows
# and kills itself.
JOB = """
import os, signal, subprocess, sys, time
from pipelines import reaper

reaper.watch_this_process()
child = subprocess.Popen(["sleep", "300"])
shell = subprocess.Popen(["sh", "-c", "sleep 301 & wait"])
with reaper.tagging():  # as around ray.init
    raylet = subprocess.Popen([sys.executable, "-c", '''
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
job = os.getppid()
while os.getppid() == job:
    time.sleep(0.02)
out = sys.argv[1]
subprocess.run(["sh", "-c", f"sleep 302 >/dev/null 2>&1 & echo $! > {out}.tmp; mv {out}.tmp {out}"])
''', sys.argv[1] + ".late"])
# Only what starts with "Ray" carries the tag, not what the job starts afterwards (ended through its tree).
after = subprocess.Popen(["sleep", "303"])
forked = os.fork()
if forked == 0:
    time.sleep(304)
    os._exit(0)
time.sleep(1.5)  # the reaper has looked at least once
tags = [b"P2P_REAPER_JOB=" in open(f"/proc/{p.pid}/environ", "rb").read() for p in (raylet, after)]
open(sys.argv[1] + ".tags", "w").write(" ".join(map(str, tags)))
open(sys.argv[1], "w").write(f"{child.pid} {shell.pid} {raylet.pid} {after.pid} {forked}")
os.kill(os.getpid(), signal.SIGKILL)
"""


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


def test_a_killed_job_takes_its_processes_with_it(tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    root = Path(reaper.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    job = subprocess.run([sys.executable, "-c", JOB, str(pids_file)], env=env, timeout=60)
    assert job.returncode == -signal.SIGKILL
    known = [int(p) for p in pids_file.read_text().split()]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not Path(f"{pids_file}.late").exists():
        time.sleep(0.05)
    late = int(Path(f"{pids_file}.late").read_text())
    while time.monotonic() < deadline and any(running(p) for p in [*known, late]):
        time.sleep(0.1)
    left = [p for p in [*known, late] if running(p)]
    for pid in left:  # whatever the failure left
        os.kill(pid, signal.SIGKILL)
    assert not left, f"still running after the job was killed: {left} (the late one: {late})"
    assert Path(f"{pids_file}.tags").read_text() == "True False"  # the "raylet" tagged, the later child not


def test_run_by_hand_with_a_wrong_pid_it_ends_nothing(tmp_path: Path) -> None:
    bystander = subprocess.Popen(["sh", "-c", "sleep 300 & wait"])
    started = Path(f"/proc/{bystander.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    try:
        for stdin in (subprocess.DEVNULL, subprocess.PIPE):  # not a pipe; a pipe, but not from its job
            refused = subprocess.run(
                [sys.executable, "-I", reaper.__file__, str(bystander.pid), started],
                stdin=stdin,
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert refused.returncode != 0 and "not by hand" in refused.stderr
        time.sleep(0.5)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_the_dashboard_of_a_local_cluster_ignores_ctrl_c_and_nothing_else_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A terminal's Ctrl-C reaches the job's whole process group, where a local cluster's processes stay.
    Within `dashboard_ignores_sigint`, what Ray's `start_api_server` starts (here a stand-in that starts a
    Python process with a preexec_fn, as Ray's does) ignores SIGINT from its start; another process started
    in the block (a raylet) does not, and the job keeps handling it. (With a real cluster:
    tests/test_build_dataset.py::test_killed_build_rerun_leaves_a_complete_unique_dataset.)"""
    from ray._private import services

    from pipelines.runtime import dashboard_ignores_sigint

    show = (
        "import signal, time; print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN, flush=True); "
        "time.sleep(30)"
    )

    def start_python() -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", show], stdout=subprocess.PIPE, text=True, preexec_fn=int
        )

    monkeypatch.setattr(services, "start_api_server", start_python)
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    children = []
    try:
        with dashboard_ignores_sigint():
            children.append(services.start_api_server())  # the dashboard
            children.append(start_python())  # the raylet
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the cluster starts
            time.sleep(0.2)
            assert received == [signal.SIGINT]
        assert services.start_api_server is start_python  # Ray's own again
        shown = []
        for child in children:
            assert child.stdout is not None
            shown.append(child.stdout.readline().strip())
        assert shown == ["True", "False"]  # ignored from its start: Python installed no handler there
        assert [sigint_gets_through(child.pid) for child in children] == [False, True]
        children[0].send_signal(signal.SIGINT)
        time.sleep(0.2)
        assert children[0].poll() is None  # still running
    finally:
        signal.signal(signal.SIGINT, previous)
        for child in children:
            child.kill()
            child.wait()
