"""A real multi-node Ray cluster on this machine for tests: one GCS, one raylet per node, all on 127.0.0.1.

Contract: `LocalCluster.start()` runs a head node (`node_a`: 1 CPU, custom resource `node_a`) in a manager
process of its own; `add(name)` starts another raylet with 1 CPU and the custom resource `name`;
`remove(name)` SIGKILLs every process of that node (a lost machine, not a clean shutdown); `stop()` ends
every process the cluster started, by PID, and returns those still alive (none expected). `env()` is what a
driver needs to join it (`RAY_ADDRESS` and the cluster's own auth token): jobs run as subprocesses, exactly
as a user runs them.

Why `ray.cluster_utils.Cluster` rather than `ray start` twice: on Ray 2.60 `ray start --address
127.0.0.1:PORT` (a second node) swaps 127.0.0.1 for the machine's outward address, and the only switch that
keeps loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) makes `ray start --address` refuse to add a node.
Cluster starts the same raylets without that check, and is cheaper (no CLI process per node).

Why a manager process: the pytest process may already be the driver of the session's in-process cluster
(conftest's `ray_session`), and Cluster keeps process-wide state. The manager also gets RAY_TMPDIR of its own,
so the head's `ray_current_cluster` file never lands in /tmp/ray where `ray.init()` of another user's job on
this shared machine would find it, and its own token, so it neither reads nor changes ~/.ray/auth_token.
Node deaths are detected within ~3 s (GCS health checks every second, 3 misses) instead of Ray's 15 s.

Protocol between the two: one command per line on the manager's stdin, one JSON line back on its stdout.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

HEAD = "node_a"
REPO_ROOT = Path(__file__).resolve().parents[1]
# Variables a cluster process or a driver must not take from the test session: another cluster's address
# or token.
_NOT_INHERITED = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
_SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000}


class LocalCluster:
    """The test side: starts the manager and talks to it."""

    def __init__(self, root: Path, proc: subprocess.Popen[str], address: str, head_id: str) -> None:
        self.root, self.proc, self.address = root, proc, address
        self.node_ids = {HEAD: head_id}
        self._lock = threading.Lock()

    @classmethod
    def start(cls, timeout_s: float = 120.0) -> LocalCluster:
        root = Path(tempfile.mkdtemp(prefix="rmn_", dir="/tmp"))  # short: raylet socket paths max 107 chars
        token = root / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
        env.update(cluster_env(root))
        proc = subprocess.Popen(
            [sys.executable, __file__, str(root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,  # Ctrl-C in the test run reaches the cluster only through stop()
        )
        try:
            reply = _read_reply(proc, timeout_s)
        except BaseException:
            _kill_tree(proc.pid, root)
            shutil.rmtree(root, ignore_errors=True)
            raise
        return cls(root, proc, reply["address"], reply["node_id"])

    def env(self) -> dict[str, str]:
        """The variables a driver process needs to join this cluster (added to the test's environment)."""
        env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
        env.update(cluster_env(self.root))
        env["RAY_ADDRESS"] = self.address
        return env

    def command(self, line: str, timeout_s: float = 120.0) -> dict[str, Any]:
        with self._lock:
            assert self.proc.stdin is not None
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
            reply = _read_reply(self.proc, timeout_s)
        if "error" in reply:
            raise RuntimeError(f"cluster manager: {line}: {reply['error']}")
        return reply

    def add(self, name: str) -> str:
        """Start a node with 1 CPU and the custom resource `name`; returns its node id."""
        self.node_ids[name] = str(self.command(f"add {name}")["node_id"])
        return self.node_ids[name]

    def remove(self, name: str) -> None:
        self.command(f"remove {name}")

    def processes(self) -> list[psutil.Process]:
        return _tree(self.proc.pid, self.root)

    def stop(self) -> list[int]:
        """End the cluster; returns the PIDs still alive afterwards (none expected)."""
        with contextlib.suppress(Exception):
            self.command("quit", timeout_s=60)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        _kill_tree(self.proc.pid, self.root)
        left = [p.pid for p in _tree(self.proc.pid, self.root)]
        shutil.rmtree(self.root, ignore_errors=True)
        return left


def cluster_env(root: Path) -> dict[str, str]:
    # Every process of the cluster and every driver imports this checkout (not another install of it).
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {
        "PYTHONPATH": path,
        "RAY_TMPDIR": str(root),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(root / "auth_token"),
        # Loopback only: without this Ray swaps 127.0.0.1 for the machine's outward address.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    }


def _read_reply(proc: subprocess.Popen[str], timeout_s: float) -> dict[str, Any]:
    assert proc.stdout is not None
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout_s)
    if not result:
        raise TimeoutError(f"the cluster manager did not answer within {timeout_s} s")
    if not result[0]:
        raise RuntimeError(f"the cluster manager exited with {proc.wait()}")
    return dict(json.loads(result[0]))


def _tree(pid: int, root: Path) -> list[psutil.Process]:
    """The manager, its descendants, and any process naming the cluster's temp dir (daemonized ones)."""
    found: dict[int, psutil.Process] = {}
    with contextlib.suppress(psutil.NoSuchProcess):
        manager = psutil.Process(pid)
        found[pid] = manager
        found.update({c.pid: c for c in manager.children(recursive=True)})
    me = psutil.Process()
    skip = {me.pid, *(p.pid for p in me.parents())}
    pattern = re.compile(re.escape(str(root)))
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid not in skip and pattern.search(" ".join(proc.info["cmdline"] or [])):
            found[proc.pid] = proc
            with contextlib.suppress(psutil.NoSuchProcess):
                found.update({c.pid: c for c in proc.children(recursive=True)})
    return [p for p in found.values() if p.pid not in skip]


def _kill_tree(pid: int, root: Path) -> None:
    procs = _tree(pid, root)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(procs, timeout=10)


# ----------------------------------------------------------------------------------------------------------
# The manager process
# ----------------------------------------------------------------------------------------------------------


def _node_args(name: str, root: Path) -> dict[str, Any]:
    return {
        "node_ip_address": "127.0.0.1",
        "num_cpus": 1,
        "num_gpus": 0,
        "resources": {name: 1},
        "object_store_memory": 100 * 1024 * 1024,
        "temp_dir": str(root / "ray"),
        # Each agent on a port the kernel picks: fixed defaults (52365, 8265) collide with other clusters.
        "dashboard_agent_listen_port": None,
        "metrics_export_port": None,
    }


def _serve(root: Path) -> None:
    from ray.cluster_utils import Cluster

    def reply(**values: Any) -> None:
        sys.stdout.write(json.dumps(values) + "\n")
        sys.stdout.flush()

    # Every process of the cluster gets its address: Ray Train's helper actors otherwise look for "the" local
    # cluster among all those running on the machine.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    head_args = _node_args(HEAD, root)
    head_args.update(include_dashboard=False, gcs_server_port=port, _system_config=_SYSTEM_CONFIG)
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    nodes: dict[str, Any] = {HEAD: cluster.head_node}
    reply(address=cluster.address, node_id=cluster.head_node.node_id)
    for line in sys.stdin:
        verb, _, name = line.strip().partition(" ")
        try:
            if verb == "add":
                started = time.perf_counter()
                nodes[name] = cluster.add_node(**_node_args(name, root))
                reply(node_id=nodes[name].node_id, seconds=round(time.perf_counter() - started, 1))
            elif verb == "remove":
                cluster.remove_node(nodes.pop(name), allow_graceful=False)
                reply(removed=name)
            elif verb == "quit":
                cluster.shutdown()
                reply(stopped=True)
                return
            else:
                reply(error=f"unknown command {line.strip()!r}")
        except Exception as exc:  # the test gets the message; the manager keeps serving
            reply(error=f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    # Ray's own logging goes to stderr (the test's output); stdout carries only the protocol.
    _serve(Path(sys.argv[1]))
