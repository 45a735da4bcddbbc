"""The registry's promotion lock on a real sqlite MLflow store, without Ray: a held lock is waited for
with a line saying so, and one left by a promotion that no longer runs is reported at once, not waited on
for the full `lock_wait_s`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipelines.registry.promote import LOCK_PREFIX, promotion_lock


def plant_lock(client: MlflowClient, pid: int) -> None:
    tags = {"host": socket.gethostname(), "pid": str(pid)}
    client.create_registered_model(f"{LOCK_PREFIX}m", tags=tags, description=f"promotion of m by pid {pid}")


def test_a_lock_of_a_promotion_that_no_longer_runs_is_reported_at_once(tmp_path: Path) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    plant_lock(client, ended.pid)
    began = time.monotonic()
    gone = rf"left by a promotion that no longer runs .*pid {ended.pid}"
    with pytest.raises(TimeoutError, match=gone), promotion_lock(client, "m", wait_s=600, poll_s=0.05):
        pass
    assert time.monotonic() - began < 60  # not the 600 s wait
    assert client.get_registered_model(f"{LOCK_PREFIX}m")  # reported, not taken over


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
