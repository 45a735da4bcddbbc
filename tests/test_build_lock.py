"""One writer per dataset output: two real `p2p dataset build` processes into one folder (the second fails
at once naming the holder, the first completes and verifies), stale locks taken over when their build
provably died and otherwise only on request, exactly once, the same lock on the real S3 server
(conditional puts), and clean-up that never deletes a build newer than the current manifest."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from race_helpers import race
from test_build_dataset import build_command, config, copy_camvid_subset

from pipelines import storage
from pipelines.dataset import lock as lock_module
from pipelines.dataset.build import run_build
from pipelines.dataset.lock import LOCK_NAME, BuildLock, LockConfig, LockHeld
from pipelines.manifest import read_manifest, verify_shards


@pytest.mark.usefixtures("ray_session")
def test_a_second_concurrent_build_fails_fast_naming_the_holder(camvid_dir: Path, tmp_path: Path) -> None:
    import ray

    copy_camvid_subset(camvid_dir, tmp_path / "src", 24, with_labels=True)
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    command = build_command(tmp_path / "src", out, camvid_dir / "classes.json")
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / LOCK_NAME).exists():
        time.sleep(0.02)
    assert (out / LOCK_NAME).exists(), "the first build never took the lock"

    started = time.monotonic()
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert first.poll() is None, "the first build ended before the second one was checked"
    assert second.returncode == 2, second.stdout + second.stderr
    message = second.stderr
    assert "another build is writing" in message and f"pid {first.pid}" in message, message
    assert socket.gethostname() in message and "--wait" in message, message
    assert elapsed < 30, f"the second build took {elapsed:.0f} s to refuse"  # no Ray, no listing: at once

    output, _ = first.communicate(timeout=300)
    assert first.returncode == 0, output
    manifest = read_manifest(str(out))
    assert manifest.totals.samples_written == 24 and verify_shards(str(out), manifest) == []
    assert not (out / LOCK_NAME).exists()  # released


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(out: Path, **fields: Any) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lock = {"holder": "someone@" + socket.gethostname(), "host": socket.gethostname(), "pid": dead_pid()}
    lock.update(started="2024-01-01T00:00:00Z", heartbeat_epoch=time.time(), token="x")
    lock.update(fields)
    (out / LOCK_NAME).write_text(json.dumps(lock))


@pytest.mark.usefixtures("ray_session")
def test_a_stale_lock_is_taken_over_only_when_its_build_provably_died(
    camvid_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A silent holder on another host may be alive behind a network fault: only --break-lock removes its
    lock. A pid gone on this host is proof: that lock is taken over, saying so."""
    copy_camvid_subset(camvid_dir, tmp_path / "src", 3, with_labels=True)
    out = tmp_path / "out"
    write_lock(out, holder="someone@elsewhere", host="elsewhere", heartbeat_epoch=time.time() - 300)
    cfg = config(
        source={"uri": str(tmp_path / "src"), "a_dir": "labels", "b_dir": "images"},
        output=str(out),
        derive={"builder": "labels", "palette": str(camvid_dir / "classes.json")},
        resize={"size": 32},
        split={"train": 1.0, "val": 0.0, "test": 0.0},
    )
    with pytest.raises(
        LockHeld, match=r"stale lock of someone@elsewhere .*no heartbeat for 30\d s.*--break-lock"
    ):
        run_build(cfg)
    cfg.lock.break_lock = True
    manifest = run_build(cfg)
    assert manifest.totals.samples_written == 3 and not (out / LOCK_NAME).exists()
    cfg.lock.break_lock = False
    write_lock(out)  # this host, a pid that ended
    assert run_build(cfg) == manifest and not (out / LOCK_NAME).exists()
    printed = capsys.readouterr().out
    assert f"taking over the stale lock of someone@{socket.gethostname()}" in printed, printed
    assert "no longer runs on this host" in printed

    # Clean-up under the lock: an older build's folder goes, one newer than the manifest stays.
    older, newer = (
        out / "shards" / "older" / "train-000000.tar",
        out / "shards" / "newer" / "train-000000.tar",
    )
    for path in (older, newer):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
    manifest_time = (out / "manifest.json").stat().st_mtime
    os.utime(older, (manifest_time - 60, manifest_time - 60))
    os.utime(newer, (manifest_time + 60, manifest_time + 60))
    cfg.lock.break_lock = False
    run_build(cfg)  # up to date: cleans orphans
    assert not older.parent.exists() and newer.exists()


def test_a_live_lock_is_never_broken_and_wait_takes_it_when_free(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    holder = BuildLock(out).acquire()
    with pytest.raises(LockHeld, match=rf"another build is writing.*pid {os.getpid()}"):
        BuildLock(out, LockConfig(break_lock=True)).acquire()
    taken: list[float] = []

    def wait_for_it() -> None:
        with BuildLock(out, LockConfig(wait=True, poll_s=0.05)):
            taken.append(time.monotonic())

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    time.sleep(0.5)
    assert not taken
    released = time.monotonic()
    holder.release()
    waiter.join(timeout=10)
    assert taken and taken[0] >= released
    assert not Path(out, LOCK_NAME).exists()


def test_two_runs_taking_over_one_dead_lock_end_with_one_holder(tmp_path: Path) -> None:
    """Two re-runs after a crash find the same dead lock at once: one takes it over and holds it, the other
    is told the output is busy; neither deletes the lock the other has just taken, nor fails on the
    file the other deleted."""

    def run(out: Path, start: threading.Barrier, refused: threading.Event, outcomes: list[str]) -> None:
        start.wait()
        try:
            lock = BuildLock(str(out)).acquire()
        except Exception as exc:
            busy = isinstance(exc, LockHeld) and "another build is writing" in str(exc)
            outcomes.append("busy" if busy else repr(exc))  # anything else is the finding
            refused.set()
            return
        lock.check()
        outcomes.append("held")
        refused.wait(timeout=10)  # held until the other run has been refused (or took it too)
        lock.release()

    for trial in range(20):
        out = tmp_path / str(trial)
        write_lock(out)
        start, refused, outcomes = threading.Barrier(2), threading.Event(), []
        runs = [threading.Thread(target=run, args=(out, start, refused, outcomes)) for _ in range(2)]
        for thread in runs:
            thread.start()
        for thread in runs:
            thread.join(timeout=30)
        assert sorted(outcomes) == ["busy", "held"], (trial, outcomes)
        assert not list(out.glob(f"{LOCK_NAME}*")), list(out.iterdir())  # no lock, no marker left


def test_a_take_over_left_half_done_blocks_no_later_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run killed (or out of disk) while taking over a dead lock left its marker: empty, or naming a pid
    gone here. Neither blocks the next run. A live run's marker makes a run without --wait say so, soon."""
    from pipelines.runtime import process_space

    out = tmp_path / "out"
    marker = out / f"{LOCK_NAME}.takeover.x"  # write_lock's token is "x"
    taker = {"holder": "someone@here", "host": socket.gethostname(), "pid_space": process_space()}
    taker.update(token="y", heartbeat_epoch=time.time())

    write_lock(out)
    marker.write_bytes(b"")  # its writer died between creating and writing it
    os.utime(marker, (time.time() - 60, time.time() - 60))
    with BuildLock(str(out)) as lock:
        lock.check()
    assert not marker.exists()

    write_lock(out)
    marker.write_text(json.dumps({**taker, "pid": dead_pid()}))
    with BuildLock(str(out)) as lock:
        lock.check()
    assert not marker.exists()

    write_lock(out)
    marker.write_text(json.dumps({**taker, "pid": os.getpid()}))  # alive: taking it over right now
    monkeypatch.setattr(lock_module, "TAKER_PATIENCE_S", 0.5)
    with pytest.raises(LockHeld, match=r"another run is taking over the stale lock .*someone@here.*--wait"):
        BuildLock(str(out)).acquire()
    assert marker.exists() and (out / LOCK_NAME).exists()


def test_a_dead_takers_marker_is_stepped_over_not_deleted_while_the_race_lasts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three runs meet one dead lock whose first taker died holding its marker. Had each deleted that dead
    marker, the later delete could remove the one the earlier run had just made in its place, and both
    would go in. So the race moves on to a second marker: a run finding the first dead and the second live
    waits, leaving both; once the second is dead too, a run takes over through a third and removes all."""
    from pipelines.runtime import process_space

    out = tmp_path / "out"
    first, second = out / f"{LOCK_NAME}.takeover.x", out / f"{LOCK_NAME}.takeover.x.1"
    taker = {"holder": "someone@here", "host": socket.gethostname(), "pid_space": process_space()}
    taker.update(token="y", heartbeat_epoch=time.time())
    write_lock(out)
    first.write_text(json.dumps({**taker, "pid": dead_pid()}))
    second.write_text(json.dumps({**taker, "holder": "another@here", "pid": os.getpid()}))  # live, now
    monkeypatch.setattr(lock_module, "TAKER_PATIENCE_S", 0.5)
    with pytest.raises(LockHeld, match=r"another run is taking over the stale lock .*another@here"):
        BuildLock(str(out)).acquire()
    assert first.exists() and second.exists() and (out / LOCK_NAME).exists()

    second.write_text(json.dumps({**taker, "holder": "another@here", "pid": dead_pid()}))
    with BuildLock(str(out)) as lock:
        lock.check()
        assert not list(out.glob(f"{LOCK_NAME}.takeover*")), list(out.iterdir())


def test_a_take_over_whose_look_at_the_lock_fails_leaves_the_dead_markers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The winner of the second marker cannot read the lock (the storage gave up): the stale lock may still
    be there, so it removes only its own marker. Had it removed the dead first one too, a newcomer could
    win that one while another run won the second again, and both would take the lock over."""
    from pipelines.runtime import process_space

    out = tmp_path / "out"
    first, second = out / f"{LOCK_NAME}.takeover.x", out / f"{LOCK_NAME}.takeover.x.1"
    write_lock(out)
    taker = {"holder": "someone@here", "host": socket.gethostname(), "pid_space": process_space()}
    first.write_text(json.dumps({**taker, "pid": dead_pid(), "token": "y", "heartbeat_epoch": time.time()}))
    looks = []

    def read_lock_once_failing(output: str) -> dict[str, Any] | None:
        looks.append(output)
        if len(looks) == 2:  # the first look finds the stale lock; the winner's re-check fails
            raise storage.StorageError("S3 read failed after 8 attempts")
        return real_read_lock(output)

    real_read_lock = lock_module.read_lock
    monkeypatch.setattr(lock_module, "read_lock", read_lock_once_failing)
    with pytest.raises(storage.StorageError, match="after 8 attempts"):
        BuildLock(str(out)).acquire()
    assert first.exists() and not second.exists() and (out / LOCK_NAME).exists()
    with BuildLock(str(out)) as lock:  # the storage back: taken over, every marker removed
        lock.check()
        assert not list(out.glob(f"{LOCK_NAME}.takeover*")), list(out.iterdir())


def test_three_runs_meeting_a_dead_takers_marker_end_with_one_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race above for real, 20 times: three threads, one dead lock, one dead taker's marker. Deletes
    take up to 40 ms here, like requests to S3, so that the runs' steps interleave (without the
    generations, two runs held the lock within a few trials)."""
    from pipelines.runtime import process_space

    def slow_delete(uri: str, missing_ok: bool = True) -> None:
        time.sleep(random.uniform(0.0, 0.04))
        real_delete(uri, missing_ok)

    real_delete = storage.delete
    monkeypatch.setattr(storage, "delete", slow_delete)

    def run(start: threading.Barrier, outcomes: list[str], done: threading.Event) -> None:
        start.wait()
        try:
            lock = BuildLock(str(out)).acquire()
        except LockHeld as exc:
            outcomes.append("busy" if "another build is writing" in str(exc) else repr(exc))
            return
        outcomes.append("held")
        done.wait(timeout=120)  # held until the others have been refused (or took it too)
        lock.release()

    taker = {"holder": "someone@here", "host": socket.gethostname(), "pid_space": process_space()}
    for trial in range(20):
        out = tmp_path / str(trial)
        write_lock(out)
        dead_taker = {**taker, "pid": dead_pid(), "token": "y", "heartbeat_epoch": time.time()}
        (out / f"{LOCK_NAME}.takeover.x").write_text(json.dumps(dead_taker))
        outcomes = race(run, contenders=3, timeout_s=30)
        assert sorted(outcomes) == ["busy", "busy", "held"], (trial, outcomes)
        assert not list(out.glob(f"{LOCK_NAME}*")), list(out.iterdir())  # no lock, no marker left


def test_an_empty_lock_left_by_a_dead_writer_goes_stale_by_its_age(tmp_path: Path) -> None:
    """A build killed between creating the lock file and writing it left it empty: no heartbeat to age."""
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_bytes(b"")
    young = r"another build is writing .*: an unknown build \(the lock file is empty"  # may be being written
    with pytest.raises(LockHeld, match=young):
        BuildLock(str(out), LockConfig(break_lock=True)).acquire()
    os.utime(out / LOCK_NAME, (time.time() - 300, time.time() - 300))
    with pytest.raises(LockHeld, match=r"stale lock .*unreadable and not written for 30\d s .*--break-lock"):
        BuildLock(str(out)).acquire()
    with BuildLock(str(out), LockConfig(break_lock=True)) as lock:
        lock.check()


def test_a_pid_is_judged_only_in_its_own_pid_namespace(tmp_path: Path) -> None:
    """Two containers may share a hostname but not their pids: a live build in another one must not look
    stale here because its pid means nothing in this namespace."""
    from pipelines.runtime import process_space

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    lock = {
        "holder": "someone@" + socket.gethostname(),
        "host": socket.gethostname(),
        "pid": ended.pid,
        "started": "2026-12-06T00:00:00Z",
        "token": "theirs",
        "heartbeat_epoch": time.time(),
    }
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({**lock, "pid_space": "another-container"}))
    with pytest.raises(LockHeld, match="another build is writing"):
        BuildLock(str(out)).acquire()
    (out / LOCK_NAME).write_text(json.dumps({**lock, "pid_space": process_space()}))
    with BuildLock(str(out)) as taken:  # here the pid is proof: its build died
        taken.check()


def test_a_lock_path_that_exists_but_reads_as_absent_is_an_error_not_a_spin(tmp_path: Path) -> None:
    """A dangling link at the lock path: O_EXCL sees it, reading it finds nothing; looping on that would
    spin a core for ever."""
    tmp_path.joinpath("out").mkdir()
    os.symlink(tmp_path / "nowhere", tmp_path / "out" / LOCK_NAME)
    started = time.monotonic()
    with pytest.raises(storage.StorageError, match=r"exists but cannot be read .*remove it and re-run"):
        BuildLock(str(tmp_path / "out")).acquire()
    assert time.monotonic() - started < 5


def test_the_s3_lock_uses_conditional_puts(s3_server: Any) -> None:
    """SeaweedFS honours If-None-Match: * and If-Match, like AWS S3: the lock works on both."""
    out = f"s3://{s3_server.buckets[0]}/lock-{uuid.uuid4().hex[:8]}"
    uri = storage.join(out, LOCK_NAME)
    tag = storage.create_exclusive(uri, b"first")
    assert tag and storage.create_exclusive(uri, b"second") is None
    assert storage.read_bytes(uri) == b"first"
    assert storage.put_if_match(uri, b"other", '"0123456789abcdef0123456789abcdef"') is None
    mine = storage.put_if_match(uri, b"mine", tag)
    assert mine is not None and storage.read_bytes(uri) == b"mine"
    # A retried PUT whose first attempt landed (its answer lost) fails its own condition: finding its own
    # bytes there, it is the writer's success, with the object's tag; other bytes are someone else's.
    assert storage.put_if_match(uri, b"mine", tag) == mine
    assert storage.create_exclusive(uri, b"mine") == mine and storage.create_exclusive(uri, b"x") is None
    storage.delete(uri)

    with BuildLock(out, LockConfig(ttl_s=0.4)) as lock:
        with pytest.raises(LockHeld, match="another build is writing"):
            BuildLock(out).acquire()
        time.sleep(0.35)  # a heartbeat or two: conditional overwrites of our own lock
        lock.check()
        assert not lock.lost
    assert not storage.exists(uri)
