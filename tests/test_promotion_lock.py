"""The registry's promotion lock on a real sqlite MLflow store, without Ray: a held lock is waited for
with a line saying so, and one left by a promotion that no longer runs is taken over at once, not waited
on for the full `lock_wait_s`."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
from race_helpers import race

from pipelines.registry.promote import LOCK_PREFIX, current_champion, promotion_lock
from pipelines.runtime import process_space


def plant_lock(client: MlflowClient, pid: int) -> None:
    tags = {"host": socket.gethostname(), "pid": str(pid)}
    client.create_registered_model(f"{LOCK_PREFIX}m", tags=tags, description=f"promotion of m by pid {pid}")


def test_a_lock_of_a_promotion_that_no_longer_runs_is_taken_over_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    plant_lock(client, ended.pid)
    began = time.monotonic()
    with promotion_lock(client, "m", wait_s=600, poll_s=0.05):
        assert client.get_registered_model(f"{LOCK_PREFIX}m").tags["pid"] == str(os.getpid())
    assert time.monotonic() - began < 60  # not the 600 s wait
    printed = capsys.readouterr().out
    took = "took over the registry lock of m from a promotion that no longer runs"
    assert f"{took} (promotion of m by pid {ended.pid})" in printed, printed
    assert not client.search_registered_models(f"name LIKE '{LOCK_PREFIX}m%'")  # released, marker gone


def test_a_dead_lock_another_waiter_is_taking_over_is_waited_for(tmp_path: Path) -> None:
    """Two waiters find one dead lock: the one holding the take-over marker deletes it, the other waits,
    so neither deletes a lock the other has just taken."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    plant_lock(client, ended.pid)
    client.create_registered_model(f"{LOCK_PREFIX}m.takeover.untokened")  # the other waiter's marker
    held = "another promotion of m holds the registry lock"
    with pytest.raises(TimeoutError, match=held), promotion_lock(client, "m", wait_s=0.3, poll_s=0.05):
        pass
    assert client.get_registered_model(f"{LOCK_PREFIX}m").tags["pid"] == str(ended.pid)  # left to the other
    # The other waiter died holding its marker, which says so: removed, then the lock is taken over.
    client.delete_registered_model(f"{LOCK_PREFIX}m.takeover.untokened")
    tags = {"host": socket.gethostname(), "pid": str(ended.pid), "pid_space": process_space(), "token": "t"}
    client.create_registered_model(f"{LOCK_PREFIX}m.takeover.untokened", tags=tags)
    with promotion_lock(client, "m", wait_s=5, poll_s=0.05):
        assert client.get_registered_model(f"{LOCK_PREFIX}m").tags["pid"] == str(os.getpid())
    assert not client.search_registered_models(f"name LIKE '{LOCK_PREFIX}m%'")


def plant_a_dead_lock_and_taker(client: MlflowClient) -> tuple[dict[str, str], str, str]:
    """The lock of m left by a promotion that ended, and the marker of a taker that died too: the taker's
    tags, and the names of the first two marker generations."""
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    plant_lock(client, ended.pid)
    tags = {"host": socket.gethostname(), "pid": str(ended.pid), "pid_space": process_space(), "token": "t"}
    first, second = f"{LOCK_PREFIX}m.takeover.untokened", f"{LOCK_PREFIX}m.takeover.untokened.1"
    client.create_registered_model(first, tags=tags)
    return tags, first, second


def test_a_dead_takers_marker_is_stepped_over_not_deleted_while_the_race_lasts(tmp_path: Path) -> None:
    """Waiters meet a dead lock whose first taker died holding its marker: it is left in place and the race
    moves to a second marker (deleting it, two waiters could remove each other's and both go in). A live
    second marker is waited for; once it is dead too, a third one's winner takes over and removes all."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    tags, first, second = plant_a_dead_lock_and_taker(client)
    client.create_registered_model(second, tags={**tags, "pid": str(os.getpid()), "token": "u"})  # live
    held = "another promotion of m holds the registry lock"
    with pytest.raises(TimeoutError, match=held), promotion_lock(client, "m", wait_s=0.3, poll_s=0.05):
        pass
    assert client.get_registered_model(first) and client.get_registered_model(second)
    client.delete_registered_model(second)
    client.create_registered_model(second, tags=tags)  # its creator died too
    with promotion_lock(client, "m", wait_s=5, poll_s=0.05):
        assert client.get_registered_model(f"{LOCK_PREFIX}m").tags["pid"] == str(os.getpid())
        assert not client.search_registered_models(f"name LIKE '{LOCK_PREFIX}m.takeover%'")


class RegistryHiccupClient(MlflowClient):
    """A real client whose second look at the promotion lock of m fails, as a tracking server's 503 would
    after MLflow's own retries; it records what it deletes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.looks, self.deleted = 0, []

    def get_registered_model(self, name: str) -> Any:
        from mlflow.exceptions import MlflowException

        if name == f"{LOCK_PREFIX}m":
            self.looks += 1
            if self.looks == 2:
                raise MlflowException("service unavailable", error_code=TEMPORARILY_UNAVAILABLE)
        return super().get_registered_model(name)

    def delete_registered_model(self, name: str) -> None:
        self.deleted.append(name)
        super().delete_registered_model(name)


def test_a_take_over_whose_look_at_the_lock_fails_leaves_the_dead_markers(tmp_path: Path) -> None:
    """The winner of the second marker cannot read the lock: the dead lock may still be there, so it removes
    only its own marker, and takes over at the next look, removing every marker then."""
    client = RegistryHiccupClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    _, first, second = plant_a_dead_lock_and_taker(client)
    with promotion_lock(client, "m", wait_s=10, poll_s=0.05):
        assert client.get_registered_model(f"{LOCK_PREFIX}m").tags["pid"] == str(os.getpid())
    # Without the hiccup's care the first delete would also have taken the dead first marker.
    assert client.deleted[:4] == [second, f"{LOCK_PREFIX}m", second, first], client.deleted
    assert not client.search_registered_models(f"name LIKE '{LOCK_PREFIX}m%'")


class SlowDeleteClient(MlflowClient):
    """A real client whose deletes take up to 40 ms, like a remote tracking server's, so that concurrent
    waiters' steps interleave."""

    def delete_registered_model(self, name: str) -> None:
        time.sleep(random.uniform(0.0, 0.04))
        super().delete_registered_model(name)


def test_three_waiters_meeting_a_dead_takers_marker_end_with_one_holder(tmp_path: Path) -> None:
    """The race above for real, 10 times: three threads, one dead lock, one dead taker's marker (without the
    generations, two waiters held the lock within a few trials)."""

    def promote(start: threading.Barrier, outcomes: list[str], done: threading.Event) -> None:
        client = SlowDeleteClient(store)
        start.wait()
        try:
            with promotion_lock(client, name, wait_s=1, poll_s=0.01):
                outcomes.append("held")
                done.wait(timeout=120)  # held until the others have given up (or took it too)
        except Exception as exc:  # anything but a timeout naming the holder is the finding
            busy = isinstance(exc, TimeoutError) and f"another promotion of {name} holds" in str(exc)
            outcomes.append("busy" if busy else repr(exc))

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(store)
    for trial in range(10):
        name = f"m{trial}"
        ended = subprocess.Popen([sys.executable, "-c", "pass"])
        ended.wait()
        tags = {"host": socket.gethostname(), "pid": str(ended.pid), "pid_space": process_space()}
        client.create_registered_model(f"{LOCK_PREFIX}{name}", tags=tags, description="a dead promotion")
        client.create_registered_model(f"{LOCK_PREFIX}{name}.takeover.untokened", tags={**tags, "token": "t"})
        outcomes = race(promote, contenders=3, timeout_s=60)
        assert sorted(outcomes) == ["busy", "busy", "held"], (trial, outcomes)
        assert not client.search_registered_models(f"name LIKE '{LOCK_PREFIX}{name}%'")


def test_a_held_lock_is_waited_for_saying_so_then_taken_once_free(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    plant_lock(client, os.getpid())  # alive: a promotion in progress
    held = "another promotion of m holds the registry lock"
    with pytest.raises(TimeoutError, match=held), promotion_lock(client, "m", wait_s=0.3, poll_s=0.05):
        pass
    assert capsys.readouterr().out.count("[promote] waiting up to 0 s for another promotion of m") == 1
    client.delete_registered_model(f"{LOCK_PREFIX}m")
    with promotion_lock(client, "m", wait_s=0.3, poll_s=0.05):
        assert client.get_registered_model(f"{LOCK_PREFIX}m").tags["pid"] == str(os.getpid())
    assert not client.search_registered_models(f"name='{LOCK_PREFIX}m'")


class LostAnswerClient(MlflowClient):
    """A real client whose first create_registered_model lands but whose answer is lost, so it is sent
    again, as MLflow's HTTP session retries any request: the retry meets the model the first one made."""

    retried = False

    def create_registered_model(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if not self.retried:
            self.retried = True
            super().create_registered_model(name, *args, **kwargs)  # landed; its answer never came back
        return super().create_registered_model(name, *args, **kwargs)


def test_a_retried_create_that_finds_its_own_lock_holds_it(tmp_path: Path) -> None:
    client = LostAnswerClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    began = time.monotonic()
    with promotion_lock(client, "m", wait_s=600, poll_s=0.05):
        assert client.retried and client.get_registered_model(f"{LOCK_PREFIX}m").tags["pid"] == str(
            os.getpid()
        )
    assert time.monotonic() - began < 60  # not waiting 600 s on itself
    assert not client.search_registered_models(f"name='{LOCK_PREFIX}m'")  # released


def test_the_release_leaves_a_lock_that_is_not_its_own(tmp_path: Path) -> None:
    """Its lock deleted by hand and taken by another promotion meanwhile: that one's lock stays."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with promotion_lock(client, "m", wait_s=1, poll_s=0.05):
        client.delete_registered_model(f"{LOCK_PREFIX}m")
        plant_lock(client, os.getpid())
    assert client.get_registered_model(f"{LOCK_PREFIX}m").tags.get("token") is None  # the other's, kept


def test_only_a_missing_model_or_alias_means_no_champion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any other failure to read the champion must stop the promotion, not crown the candidate unscored."""
    from mlflow.exceptions import MlflowException

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert current_champion(client, "m") is None  # no such model
    client.create_registered_model("m")
    assert current_champion(client, "m") is None  # no champion yet
    version = client.create_model_version("m", source=str(tmp_path), run_id=None)
    client.set_registered_model_alias("m", "champion", version.version)
    assert current_champion(client, "m") == str(version.version)
    # A tracking server that does not answer (nothing listens on port 9), with MLflow's retries off.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with pytest.raises(MlflowException):
        current_champion(MlflowClient("http://127.0.0.1:9"), "m")
