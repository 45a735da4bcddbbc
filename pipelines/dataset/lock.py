"""One writer per dataset output: the build lock ``<output>/.p2p-build.lock``.

Two builds into one output would delete each other's shards (each removes "other builds" once its manifest
is written) and race on the manifest. So `p2p dataset build` holds this lock from before it lists anything
until after its clean-up, and every write it makes (shards, manifest, deletions) happens under it.

Contract:
- Acquire = create the lock file only if absent (`storage.create_exclusive`: ``O_CREAT | O_EXCL`` on a
  folder, a PutObject with ``If-None-Match: *`` on S3, which AWS and SeaweedFS both honour). Its JSON names
  the holder (``user@host``), host, pid, start time, last heartbeat and a random token.
- A second build fails at once with a `LockHeld` error naming holder, pid, host and age; with
  ``lock.wait`` it polls until the lock is free instead.
- While held, a daemon thread refreshes ``heartbeat`` every ``ttl_s / 4`` (S3: ``If-Match`` on the ETag of
  its own last write, so it can never overwrite a lock someone else took). A lock is stale when its heartbeat
  is older than ``ttl_s`` (two minutes by default) or, on this host, its pid is gone; one without a
  readable heartbeat (its writer died creating it) when its file is older than ``ttl_s``. A lock whose pid
  is gone on this host (the same process namespace) is proof its build died, so it is taken over with a
  console line saying so: re-running after a crash or an outage needs no flag. A lock that is only silent
  (heartbeat too old, holder on another host) may be a live build cut off by the network, so it is
  reported and taken over only with ``--break-lock`` (a live one is refused even then).
- `check()` before the manifest is written: the lock must still be ours, or the build fails.
- Release deletes the lock if it is still ours.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pipelines import storage
from pipelines.config import option
from pipelines.runtime import pid_alive, pid_checkable, process_space
from pipelines.takeover import take_over_once

LOCK_NAME = ".p2p-build.lock"
# A take-over marker (`BuildLock._take_over`) lives milliseconds, or as long as its writer's storage requests
# retry: four of them (reading the lock, deleting it) of up to 8 attempts of 5 + 60 s plus 71 s of back-off
# each with the default S3 settings, 40 minutes at most. Older than this, its writer is gone.
MARKER_TTL_S = 3600.0
UNREADABLE_MARKER_S = 30.0  # an empty or garbled marker this old: its writer died writing it
TAKER_PATIENCE_S = 30.0  # without --wait, how long a run waits for another one's take-over


@dataclass
class LockConfig:
    wait: bool = option(False, "wait for another build's lock on the output instead of failing at once")
    break_lock: bool = option(
        False,
        "remove a lock gone silent (no heartbeat for 2 minutes; its pid elsewhere) before building (a lock "
        "whose pid is gone on this host is taken over without it)",
    )
    ttl_s: float = 120.0  # a lock whose heartbeat is older than this is stale
    poll_s: float = 2.0  # how often --wait looks again


class LockHeld(storage.StorageError):
    """Another build holds the output's lock (or left a stale one)."""


def lock_uri(output: str) -> str:
    return storage.join(output, LOCK_NAME)


def _holder() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def read_lock(output: str) -> dict[str, Any] | None:
    """The lock's content, {} if unreadable (being written, or not ours), None if there is none."""
    try:
        data = json.loads(storage.read_bytes(lock_uri(output)))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def describe(lock: dict[str, Any], now: float | None = None) -> str:
    if not lock:
        return "an unknown build (the lock file is empty or unreadable)"
    now = time.time() if now is None else now
    started = lock.get("started", "?")
    beat = lock.get("heartbeat_epoch")
    age = f", last heartbeat {now - beat:.0f} s ago" if isinstance(beat, int | float) else ""
    where = f"pid {lock.get('pid', '?')} on {lock.get('host', '?')}"
    return f"{lock.get('holder', '?')} ({where}, since {started}{age})"


def stale_reason(lock: dict[str, Any], ttl_s: float, now: float | None = None) -> str:
    """Why a lock is stale ("" if it looks alive)."""
    now = time.time() if now is None else now
    beat = lock.get("heartbeat_epoch")
    if not isinstance(beat, int | float):
        return ""  # unreadable or being written: not provably stale
    if now - beat > ttl_s:
        return f"no heartbeat for {now - beat:.0f} s (ttl {ttl_s:.0f} s)"
    return died_here(lock)


def died_here(lock: dict[str, Any]) -> str:
    """Why the lock's build provably died ("" unless it did): its pid is gone on this host, in this process
    namespace. A pid taken again by another process reads as alive: the safe side."""
    pid = lock.get("pid")
    checkable = pid_checkable(str(lock.get("host", "")), lock.get("pid_space"))
    if checkable and isinstance(pid, int) and not pid_alive(pid):
        return f"pid {pid} no longer runs on this host"
    return ""


class BuildLock:
    """``with BuildLock(output, cfg):`` holds the output's lock; see the module docstring. Other one-writer
    folders reuse it with their own words for a live holder (`BUSY`, formatted with output, holder, uri) and
    a lost lock (`LOST`: output, why)."""

    BUSY = "another build is writing {output}: {holder}; wait for it, or re-run with --wait (lock {uri})"
    LOST = "this build lost its lock on {output} ({why}): no manifest written"  # `check` failing
    LABEL = "[build]"  # its console lines' prefix

    def __init__(self, output: str, cfg: LockConfig | None = None) -> None:
        self.output, self.cfg = output, cfg or LockConfig()
        self.uri = lock_uri(output)
        self.token = uuid.uuid4().hex
        self.tag: str | None = None  # ETag of our last write (S3)
        self.content: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = ""  # why the lock is no longer ours, if it is not

    def _payload(self) -> bytes:
        now = time.time()
        if not self.content:
            self.content = {
                "holder": _holder(),
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "pid_space": process_space(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
                "token": self.token,
            }
        self.content["heartbeat_epoch"] = now
        return json.dumps(self.content, sort_keys=True).encode()

    def acquire(self) -> BuildLock:
        announced = False
        vanished = 0
        taken_over_since = 0.0
        while True:
            self.tag = storage.create_exclusive(self.uri, self._payload())
            if self.tag is not None:
                break
            held = read_lock(self.output)
            if held is None:  # released between our try and our read: try again at once
                vanished += 1
                if vanished > 3:  # not a race: something that exists and reads as absent (a dangling link)
                    raise storage.StorageError(
                        f"{self.uri} exists but cannot be read (a link to nothing?): remove it and re-run"
                    )
                continue
            vanished = 0
            stale = stale_reason(held, self.cfg.ttl_s) if held else self._unreadable_stale()
            dead = died_here(held) if held else ""
            if stale and (self.cfg.break_lock or dead):
                took, taker = self._take_over(held)
                if took:
                    print(
                        f"{self.LABEL} taking over the stale lock of {describe(held)}: {dead or stale}",
                        flush=True,
                    )
                elif taker:  # another run is taking it over (milliseconds, unless its storage stalls)
                    taken_over_since = taken_over_since or time.monotonic()
                    if not self.cfg.wait and time.monotonic() - taken_over_since > TAKER_PATIENCE_S:
                        raise LockHeld(
                            f"another run is taking over the stale lock {self.uri}: {taker}; re-run when it "
                            "is done, or with --wait"
                        )
                    if not announced:
                        print(f"{self.LABEL} waiting: {taker} is taking over the stale lock", flush=True)
                        announced = True
                    time.sleep(min(self.cfg.poll_s, 0.2))
                continue
            if stale:
                raise LockHeld(
                    f"{self.uri} is a stale lock of {describe(held)}: {stale}; if that build is gone, "
                    "re-run with --break-lock"
                )
            if not self.cfg.wait:
                raise LockHeld(self.BUSY.format(output=self.output, holder=describe(held), uri=self.uri))
            if not announced:
                print(f"{self.LABEL} waiting for the lock held by {describe(held)}", flush=True)
                announced = True
            time.sleep(self.cfg.poll_s)
        self._thread = threading.Thread(target=self._heartbeat, name="p2p-build-lock", daemon=True)
        self._thread.start()
        return self

    def _take_over(self, held: dict[str, Any]) -> tuple[bool, str]:
        """Delete a stale lock, exactly once (`pipelines.takeover`). Returns whether this run removed it, and
        who else is taking it over ("" if nobody is now)."""

        def still_there() -> bool:
            current = read_lock(self.output)
            return current is not None and current.get("token") == held.get("token")

        return take_over_once(
            f"{self.uri}.takeover.{held.get('token') or 'unreadable'}",
            create=lambda name: storage.create_exclusive(name, self._payload()) is not None,
            holder=self._marker_holder,
            still_there=still_there,
            delete_lock=lambda: storage.delete(self.uri),
            delete_marker=storage.delete,
        )

    def _marker_holder(self, marker: str) -> str | None:
        """Who holds a take-over marker; "" when its writer is gone (its pid is gone on this host, it is
        older than any take-over's retried requests could last (`MARKER_TTL_S`), or it is still unreadable
        after `UNREADABLE_MARKER_S`: its writer died between creating and writing it); None if there is
        none."""
        try:
            age = time.time() - storage.modified_time(marker)
            taker = json.loads(storage.read_bytes(marker))
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            taker = {}
        taker = taker if isinstance(taker, dict) else {}
        if died_here(taker) or age > MARKER_TTL_S or (not taker and age > UNREADABLE_MARKER_S):
            return ""
        return describe(taker)

    def _unreadable_stale(self) -> str:
        """Why a lock file without a readable heartbeat is stale: its writer died between creating it and
        writing it (a kill, a full disk), so it is never updated. Judged by the file's age (by the
        storage's clock, which the TTL's margin absorbs); a younger one may still be being written."""
        try:
            age = time.time() - storage.modified_time(self.uri)
        except FileNotFoundError:
            return ""
        if age > self.cfg.ttl_s:
            return f"unreadable and not written for {age:.0f} s (ttl {self.cfg.ttl_s:.0f} s)"
        return ""

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.cfg.ttl_s / 4):
            try:
                if not storage.is_s3(self.uri) and (read_lock(self.output) or {}).get("token") != self.token:
                    self.lost = "the lock file was removed or replaced by another build"
                    return
                tag = storage.put_if_match(self.uri, self._payload(), self.tag or "")
            except (OSError, storage.StorageError):
                continue  # a storage outage: the retries failed, try again at the next beat
            if tag is None:
                self.lost = "the lock was broken and taken by another build"
                return
            self.tag = tag

    def check(self) -> None:
        """Raise unless the lock is still ours (called before the manifest is written)."""
        held = read_lock(self.output)
        if self.lost or held is None or held.get("token") != self.token:
            why = self.lost or (f"now held by {describe(held)}" if held else "the lock file is gone")
            raise LockHeld(self.LOST.format(output=self.output, why=why))

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        held = read_lock(self.output)
        if held is not None and held.get("token") == self.token:
            storage.delete(self.uri)

    def __enter__(self) -> BuildLock:
        return self.acquire()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        # A failed release (the storage down) must neither hide why a failing job fails, nor fail a job
        # whose work is done. The lock then stays; once this process ends a re-run on this host takes it
        # over, and elsewhere its heartbeat goes stale for `--break-lock`.
        try:
            self.release()
        except (OSError, storage.StorageError) as release_error:
            then = (
                "takes it over once stale"
                if self.cfg.break_lock
                else "on this host takes it over; on another, give it --break-lock after two minutes"
            )
            print(
                f"{self.LABEL} could not release the lock {self.uri}: {release_error}; the next run {then}",
                file=sys.stderr,
            )
