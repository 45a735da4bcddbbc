"""`p2p submit` / `p2p jobs` against a real Ray head started with `ray start --head` in a subprocess.

The head is the real thing a user starts: its own GCS, raylet, dashboard with the Job Submission API and
token authentication. It must coexist with the in-process test cluster (conftest's `ray_session`) and with
other Ray clusters on the machine, so every port is chosen free, the temp dir is fresh, `RAY_ADDRESS` is
neither read nor set, and teardown stops only this head's processes, by PID (never `ray stop`, which stops
every Ray process on the machine).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import psutil
import pytest

import pix2pix
from devtools.local_s3 import LocalS3Server
from pipelines.cluster import submit as jobs

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# Variables a test head or client must not inherit from the test session: another cluster's address, a
# token meant for another cluster, and credentials (a job may only get those through `--env`).
_NOT_INHERITED = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


# ----------------------------------------------------------------------------------------------------------
# A real Ray head on free ports
# ----------------------------------------------------------------------------------------------------------


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))  # Ray's gRPC servers listen on all interfaces
        except OSError:
            return False
    return True


def _free_ports(n: int) -> list[int]:
    """n distinct ports the kernel says are free now (all held open together so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _free_port_block(size: int) -> int:
    """First port of `size` consecutive free ports below the kernel's ephemeral range (32768+), where
    outgoing connections cannot take them between this check and Ray binding them."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32768 - size)
        if all(_bindable(p) for p in range(base, base + size)):
            return base
    raise RuntimeError(f"no block of {size} free ports in 20000-32767")


@dataclass
class RayHead:
    address: str  # the dashboard URL, what `--address` takes
    gcs_port: int
    temp_dir: Path
    token: str
    ray_start: list[str]
    client_env: dict[str, str] = field(default_factory=dict)  # for `p2p submit` / `p2p jobs` processes
    start_s: float = 0.0

    def processes(self) -> list[psutil.Process]:
        """This head's processes: those naming its temp dir or GCS port, and all their descendants
        (agents, workers, job drivers). The caller and its parents are never included."""
        me = psutil.Process()
        skip = {me.pid, *(p.pid for p in me.parents())}
        port = re.compile(rf":{self.gcs_port}\b")
        roots = []
        for proc in psutil.process_iter(["cmdline"]):
            if proc.pid in skip:
                continue
            cmdline = " ".join(proc.info["cmdline"] or [])
            if str(self.temp_dir) in cmdline or port.search(cmdline):
                roots.append(proc)
        found = {p.pid: p for p in roots}
        for proc in roots:
            with contextlib.suppress(psutil.NoSuchProcess):
                found.update({c.pid: c for c in proc.children(recursive=True)})
        return [p for pid, p in found.items() if pid not in skip]

    def stop(self, grace_s: float = 3.0) -> None:
        """SIGTERM, then SIGKILL: gcs_server and the autoscaler monitor outlive SIGTERM for 15 s+."""
        procs = self.processes()
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.terminate()
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)


def _wait_for_job_api(address: str, token: str, timeout_s: float = 60.0) -> None:
    """The dashboard's job module starts after `ray start` returns: wait until /api/jobs/ answers 200."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        request = urllib.request.Request(f"{address}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.5)
    raise TimeoutError(f"the job API at {address} did not answer within {timeout_s} s: {last}")


def start_head(num_cpus: int = 2) -> RayHead:
    """`ray start --head` with every port chosen free, a fresh temp dir and its own token.

    Auth: the head runs with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH pointing at a token made for it, so
    it neither depends on nor changes ~/.ray/auth_token (which the in-process test cluster may use). Clients
    get the same two variables: Ray's job client sends the token only when RAY_AUTH_MODE=token.
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray's single-node mode use 127.0.0.1 as the node address (Ray
    otherwise swaps 127.0.0.1 for the machine's outward IP, even when --node-ip-address says 127.0.0.1).
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="rayh_", dir="/tmp"))
    token = secrets.token_hex(32)
    token_path = temp_dir / "auth_token"
    token_path.write_text(token)
    token_path.chmod(0o600)
    (
        gcs,
        dashboard,
        node_manager,
        object_manager,
        agent_http,
        agent_grpc,
        runtime_env_agent,
        metrics_export,
        client_server,
    ) = _free_ports(9)
    workers = _free_port_block(100)
    cmd = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--node-manager-port={node_manager}",
        f"--object-manager-port={object_manager}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env_agent}",
        f"--metrics-export-port={metrics_export}",
        f"--ray-client-server-port={client_server}",
        f"--min-worker-port={workers}",
        f"--max-worker-port={workers + 99}",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
    env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED and not jobs.is_secret_name(k)}
    env.update(auth)
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # `p2p` is the jobs' entrypoint
    client_env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
    client_env.update(auth)
    head = RayHead(f"http://127.0.0.1:{dashboard}", gcs, temp_dir, token, cmd, client_env)
    started = time.perf_counter()
    try:
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"ray start failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        _wait_for_job_api(head.address, token)
    except BaseException:
        head.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    head.start_s = time.perf_counter() - started
    return head


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    head = start_head()
    print(f"\nray head up in {head.start_s:.1f} s: {' '.join(head.ray_start)}")
    try:
        yield head
    finally:
        head.stop()
        left = [p.pid for p in head.processes()]
        shutil.rmtree(head.temp_dir, ignore_errors=True)
        assert not left, f"head processes still running after stop: {left}"


def p2p_jobs(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The verbs as a user runs them: `p2p submit` and `p2p jobs` (the CLI module, run with this Python)."""
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        env=env,
    )


def p2p_jobs_together(
    *commands: list[str], env: dict[str, str], timeout: float = 300
) -> list[subprocess.CompletedProcess[str]]:
    """Several `p2p_jobs` runs at the same time: most of a short job's time is Ray's, not this machine's."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
            env=env,
        )
        for args in commands
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def job_id_of(output: str) -> str:
    match = re.search(r"submitted job (\S+)", output)
    assert match, output
    return match.group(1)


# ----------------------------------------------------------------------------------------------------------
# Without a cluster: the rules
# ----------------------------------------------------------------------------------------------------------


def test_entrypoint_is_p2p_and_refuses_secret_values() -> None:
    assert jobs.build_entrypoint(["--", "dataset", "inspect", "a b"], {}) == "p2p dataset inspect 'a b'"
    assert jobs.build_entrypoint(["p2p", "version"], {}) == "p2p version"
    with pytest.raises(jobs.JobsError, match="nothing to run"):
        jobs.build_entrypoint(["--"], {})
    environ = {"AWS_SECRET_ACCESS_KEY": "s3cr3t-value", "AWS_REGION": "us-east-1"}
    with pytest.raises(jobs.JobsError, match="AWS_SECRET_ACCESS_KEY") as refused:
        jobs.build_entrypoint(["train", "--set", "x=s3cr3t-value"], environ)
    assert "s3cr3t-value" not in str(refused.value)
    assert jobs.build_entrypoint(["train", "--set", "region=us-east-1"], environ).endswith("us-east-1")
    with pytest.raises(jobs.JobsError, match="URI with credentials") as refused:
        jobs.build_entrypoint(["train", "--tracking-uri", "https://alice:s3cret@mlflow:5000"], {})
    assert "s3cret" not in str(refused.value)
    # Checked by this checkout's parser (the job runs this code): typos fail here, not after the upload.
    with pytest.raises(jobs.JobsError, match=r"would fail: .*invalid choice: 'trian'"):
        jobs.build_entrypoint(["trian", "--workers", "2"], {})
    with pytest.raises(jobs.JobsError, match=r"would fail: p2p train: unrecognized arguments: --wrokers 2"):
        jobs.build_entrypoint(["train", "--wrokers", "2"], {})
    with pytest.raises(jobs.JobsError, match=r"would fail: .*--workers: invalid int value: 'two'"):
        jobs.build_entrypoint(["train", "--workers", "two"], {})
    command = ["train", "--workers", "2", "--debug"]
    assert jobs.build_entrypoint(command, {}) == "p2p train --workers 2 --debug"


def test_job_env_passes_settings_and_only_named_secrets() -> None:
    environ = {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "MLFLOW_TRACKING_URI": "sqlite:////tmp/m.db",
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
        "HOME": "/root",
    }
    assert jobs.job_env([], environ) == {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "MLFLOW_TRACKING_URI": "sqlite:////tmp/m.db",
    }
    env = jobs.job_env(["AWS_SECRET_ACCESS_KEY"], environ)
    assert env["AWS_SECRET_ACCESS_KEY"] == "s3cr3t-value" and "AWS_ACCESS_KEY_ID" not in env
    with pytest.raises(jobs.JobsError, match="not set"):
        jobs.job_env(["MISSING_VAR"], environ)
    with pytest.raises(jobs.JobsError, match="NAME=VALUE") as refused:
        jobs.job_env(["AWS_SECRET_ACCESS_KEY=s3cr3t-value"], environ)
    assert "s3cr3t-value" not in str(refused.value)
    shown = jobs.describe_env(list(env))
    assert shown == "AWS_ENDPOINT_URL, AWS_SECRET_ACCESS_KEY=***, MLFLOW_TRACKING_URI"
    assert jobs.is_secret_name("MLFLOW_TRACKING_PASSWORD") and jobs.is_secret_name("HF_TOKEN")
    with_credentials = {**environ, "MLFLOW_TRACKING_URI": "https://alice:s3cret@mlflow:5000"}
    with pytest.raises(jobs.JobsError, match="MLFLOW_TRACKING_URI carries credentials") as refused:
        jobs.job_env([], with_credentials)
    assert "s3cret" not in str(refused.value)
    sent = jobs.job_env(["MLFLOW_TRACKING_URI"], with_credentials)  # named with --env: the user's choice
    assert sent["MLFLOW_TRACKING_URI"] == with_credentials["MLFLOW_TRACKING_URI"]
    assert not jobs.is_secret_name("AWS_REGION")


def test_address_and_token_rules(tmp_path: Path) -> None:
    assert jobs.resolve_address(None, {}) == (jobs.DEFAULT_ADDRESS, False)
    assert jobs.resolve_address("http://h:8265/", {}) == ("http://h:8265", True)
    # a bare host:port in RAY_ADDRESS is a GCS address for ray.init, not a dashboard
    assert jobs.resolve_address(None, {"RAY_ADDRESS": "10.0.0.1:6379"}) == (jobs.DEFAULT_ADDRESS, False)
    assert jobs.resolve_address(None, {"RAY_ADDRESS": "https://h"}) == ("https://h", True)
    token_file = tmp_path / "token"
    token_file.write_text("abc123\n")
    env = {"RAY_AUTH_TOKEN_PATH": str(token_file)}
    assert jobs.auth_headers(False, env) == {"Authorization": "Bearer abc123"}  # the local dashboard
    assert jobs.auth_headers(True, env) == {}  # never to an address the user named...
    assert jobs.auth_headers(False, {**env, "RAY_AUTH_MODE": "disabled"}) == {}  # ...nor when disabled
    assert jobs.auth_headers(False, {**env, "RAY_AUTH_MODE": "token"}) == {}  # Ray's client adds it
    assert jobs.auth_headers(False, {"RAY_AUTH_TOKEN": "xyz", **env}) == {"Authorization": "Bearer xyz"}
    assert (
        jobs.exit_code("SUCCEEDED") == 0 and jobs.exit_code("FAILED") == 1 and jobs.exit_code("STOPPED") == 2
    )


def test_runtime_env_uploads_the_project_without_environments_or_outputs(tmp_path: Path) -> None:
    runtime_env = jobs.build_runtime_env(tmp_path, {"AWS_REGION": "x"}, ["rich==13.9.4"])
    assert runtime_env["working_dir"] == str(tmp_path.resolve())
    assert {".venv", ".git", "runs", "mlruns", "__pycache__", ".mypy_cache"} <= set(runtime_env["excludes"])
    assert {".env", "*.env", "*.pem", "secrets"} <= set(runtime_env["excludes"])  # local secret files
    assert runtime_env["env_vars"] == {"AWS_REGION": "x"} and runtime_env["pip"] == ["rich==13.9.4"]
    assert "pip" not in jobs.build_runtime_env(tmp_path, {})
    assert jobs.default_working_dir() == REPO_ROOT
    with pytest.raises(jobs.JobsError, match="not a folder"):
        jobs.build_runtime_env(tmp_path / "missing", {})


def test_secret_files_and_checkpoints_stay_out_of_the_uploaded_package(tmp_path: Path) -> None:
    """Files as users keep them in a checkout, walked with Ray's own packaging rules and our excludes."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    kept = ["pipelines/job.py", "examples/train.yaml", "README.md"]
    left_out = [
        ".env.local",
        ".envrc",
        ".netrc",
        ".aws/credentials",
        ".ssh/id_rsa",
        "id_ed25519",
        "service-account-credentials.json",
        "tls/server.key",
        "runs/model.pt",
        "weights/inception.pth",
        "last.ckpt",
        "model.safetensors",
    ]
    for relative in kept + left_out:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text("x")
    runtime_env = jobs.build_runtime_env(tmp_path, {})
    packed: list[str] = []
    excludes = [_get_excludes(tmp_path, runtime_env["excludes"])]
    _dir_travel(
        tmp_path,
        excludes,
        lambda p: packed.append(str(p.relative_to(tmp_path))) if p.is_file() else None,
        include_gitignore=True,
    )
    assert sorted(packed) == sorted(kept)


def test_no_cluster_says_how_to_start_one() -> None:
    (port,) = _free_ports(1)
    env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
    result = p2p_jobs("submit", "--address", f"http://127.0.0.1:{port}", "--", "version", env=env)
    assert result.returncode == 1
    assert (
        f"no Ray dashboard at http://127.0.0.1:{port}: start a cluster (`ray start --head`)" in result.stderr
    )
    assert "Traceback" not in result.stderr
    # The command's own mistakes are named even without a cluster.
    result = p2p_jobs("submit", "--address", f"http://127.0.0.1:{port}", env=env)
    assert result.returncode == 1 and "nothing to run: give a p2p verb after --" in result.stderr
    args = ["--address", f"http://127.0.0.1:{port}", "--env", "P2P_X=1", "--", "version"]
    result = p2p_jobs("submit", *args, env=env)
    assert result.returncode == 1 and "--env takes a variable's name, not NAME=VALUE" in result.stderr


def test_the_address_given_is_the_one_used_whatever_the_shell_says() -> None:
    """Ray's job client prefers $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS to the address it is given: a shell
    set up for another cluster must not receive the jobs of `--address`."""
    other, given = _free_ports(2)
    requests: list[str] = []

    class OtherCluster(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            self.send_error(404)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", other), OtherCluster)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    saved = {name: os.environ.get(name) for name in _NOT_INHERITED}
    try:
        for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
            for value in (f"http://127.0.0.1:{other}", f"127.0.0.1:{other}"):
                os.environ.update({name: value})
                with pytest.raises(jobs.JobsError, match=f"no Ray dashboard at http://127.0.0.1:{given}:"):
                    jobs.connect(f"http://127.0.0.1:{given}")
                assert os.environ[name] == value  # the shell's setting is left as it was
                os.environ.pop(name)
    finally:
        server.shutdown()
        for name, value in saved.items():
            if value is not None:
                os.environ[name] = value
    assert requests == []


# ----------------------------------------------------------------------------------------------------------
# Against the real head
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Submitted:
    ok: subprocess.CompletedProcess[str]
    ok_id: str
    failed: subprocess.CompletedProcess[str]
    failed_id: str


@pytest.fixture(scope="module")
def submitted(ray_head: RayHead) -> Submitted:
    """Two jobs through `p2p submit` at once (each following its logs): `p2p version`, and one that fails."""
    ok, failed = p2p_jobs_together(
        ["submit", "--address", ray_head.address, "--", "version"],
        ["submit", "--address", ray_head.address, "--", "dataset", "inspect", "/nonexistent/dataset"],
        env=ray_head.client_env,
    )
    return Submitted(ok, job_id_of(ok.stdout), failed, job_id_of(failed.stdout))


def test_submit_follows_the_logs_and_returns_the_jobs_status(submitted: Submitted) -> None:
    ok = submitted.ok
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "[p2p] submitting: p2p version" in ok.stdout
    assert f"p2p {pix2pix.__version__}" in ok.stdout and "ray 2.60" in ok.stdout  # the job's own output
    assert f"[p2p] job {submitted.ok_id} SUCCEEDED" in ok.stdout

    failed = submitted.failed  # p2p submit's own status is the job's outcome: FAILED → 1
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "no dataset manifest at /nonexistent/dataset" in failed.stdout
    assert "Traceback" not in failed.stdout  # the job's user error is one line there too
    assert f"[p2p] job {submitted.failed_id} FAILED (exit code 2)" in failed.stdout  # the entrypoint's


def test_jobs_list_logs_and_status(ray_head: RayHead, submitted: Submitted) -> None:
    env, address = ray_head.client_env, ray_head.address
    listed, logs, status, unknown = p2p_jobs_together(
        ["jobs", "list", "--address", address],
        ["jobs", "logs", submitted.ok_id, "--address", address],
        ["jobs", "status", submitted.failed_id, "--address", address],
        ["jobs", "status", "raysubmit_nope", "--address", address],
        env=env,
    )
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert "SUCCEEDED" in rows[submitted.ok_id] and rows[submitted.ok_id].endswith("p2p version")
    assert "FAILED" in rows[submitted.failed_id] and "p2p dataset inspect" in rows[submitted.failed_id]

    assert logs.returncode == 0 and f"p2p {pix2pix.__version__}" in logs.stdout

    assert status.returncode == 0
    assert (
        f"{submitted.failed_id} FAILED" in status.stdout and "exit code: 2" in status.stdout
    )  # a user error

    assert unknown.returncode == 1 and "Traceback" not in unknown.stderr
    assert "raysubmit_nope" in unknown.stderr


def test_a_token_cluster_needs_ray_auth_mode(ray_head: RayHead) -> None:
    env = {k: v for k, v in ray_head.client_env.items() if k != "RAY_AUTH_MODE"}
    result = p2p_jobs("jobs", "list", "--address", ray_head.address, env=env)
    assert result.returncode == 1
    assert f"the Ray cluster at {ray_head.address} requires a token: set RAY_AUTH_MODE=token" in result.stderr


def test_env_reaches_the_job_and_the_secret_is_never_shown(
    ray_head: RayHead, s3_server: LocalS3Server
) -> None:
    """Credentials for the local S3 server reach the job only through `--env`; their values appear in
    neither `p2p submit`'s output, nor the job's logs, nor `jobs list` / `jobs status`.

    The head was started without any AWS credentials, and the control job (no --env) is refused by S3,
    so the job that finds the bucket readable got the credentials from `--env`.
    """
    env, address = ray_head.client_env | s3_server.env(), ray_head.address
    secret = s3_server.secret_key
    assert len(secret) >= 16
    location = f"s3://{s3_server.buckets[0]}/jobs-test/{uuid.uuid4().hex[:8]}"
    control = p2p_jobs(
        "submit", "--address", address, "--no-wait", "--", "dataset", "inspect", location, env=env
    )
    assert control.returncode == 0, control.stderr
    control_id = job_id_of(control.stdout)

    result = p2p_jobs(
        "submit",
        "--address",
        address,
        "--env",
        "AWS_ACCESS_KEY_ID",
        "--env",
        "AWS_SECRET_ACCESS_KEY",
        "--",
        "dataset",
        "inspect",
        location,
        env=env,
    )
    job_id = job_id_of(result.stdout)
    # authenticated: the bucket answers, there is just no dataset there
    assert f"no dataset manifest at {location}/manifest.json" in result.stdout, result.stdout
    assert "credentials rejected" not in result.stdout
    assert result.returncode == 1
    assert "AWS_ACCESS_KEY_ID=***" in result.stdout and "AWS_SECRET_ACCESS_KEY=***" in result.stdout
    assert "AWS_ENDPOINT_URL" in result.stdout  # a passed-through setting, by name

    followed, *checks = p2p_jobs_together(
        ["jobs", "logs", control_id, "--follow", "--address", address],
        ["jobs", "logs", job_id, "--address", address],
        ["jobs", "list", "--address", address],
        ["jobs", "status", job_id, "--address", address],
        env=env,
    )
    assert followed.returncode == 1 and "credentials rejected by" in followed.stdout, followed.stdout
    assert all(out.returncode == 0 for out in checks), [out.stderr for out in checks]
    assert "no dataset manifest" in checks[0].stdout and job_id in checks[1].stdout
    shown = [result.stdout, result.stderr, control.stdout, control.stderr]
    shown += [text for out in (followed, *checks) for text in (out.stdout, out.stderr)]
    assert not [text for text in shown if secret in text or s3_server.access_key in text]
    # Where the value does go on the cluster (known Ray behaviour, and why --env is opt-in): the job's
    # runtime_env, which the runtime env agent logs. Anywhere else would be news.
    logged = {p.name for p in ray_head.temp_dir.rglob("*.log") if secret.encode() in p.read_bytes()}
    assert logged <= {"runtime_env_agent.log"}, logged


STUB_CLI = """\
import os, sys, time

def main():
    print("stub p2p from the uploaded working dir:", " ".join(sys.argv[1:]), flush=True)
    print("P2P_STUB_VAR is", "set" if os.environ.get("P2P_STUB_VAR") else "not set", flush=True)
    for tick in range(600):
        print(f"tick {tick}", flush=True)
        time.sleep(0.5)
    return 0
"""


def test_ctrl_c_leaves_the_job_running_and_jobs_stop_stops_it(ray_head: RayHead, tmp_path: Path) -> None:
    """A stub project as --working-dir: the job's `p2p` runs the uploaded code (first on PYTHONPATH),
    here a `pipelines.cli.main` that runs until stopped."""
    project = tmp_path / "project"
    (project / "pipelines").mkdir(parents=True)
    (project / "pipelines" / "__init__.py").write_text("")
    (project / "pipelines" / "cli.py").write_text(STUB_CLI)
    env, address = ray_head.client_env | {"P2P_STUB_VAR": "x"}, ray_head.address
    command = ["submit", "--address", address, "--working-dir", str(project), "--", "anything", "--flag"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        # Ctrl-C as a terminal delivers it: a suite started in the background by a shell without job
        # control runs with SIGINT ignored, which the child would inherit (and never see the signal).
        preexec_fn=functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # follow until the job's driver runs
        seen.append(line)
        if line.startswith("tick 0"):
            break
    output = "".join(seen)
    job_id = job_id_of(output)
    assert "stub p2p from the uploaded working dir: anything --flag" in output
    assert "P2P_STUB_VAR is not set" in output  # only the passthrough settings and --env names travel
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output + rest
    assert f"stop it with: p2p jobs stop {job_id} --address {address}" in rest

    status = p2p_jobs("jobs", "status", job_id, "--address", address, env=env)
    assert f"{job_id} RUNNING" in status.stdout, status.stdout
    stop = p2p_jobs("jobs", "stop", job_id, "--address", address, env=env)
    assert stop.returncode == 0 and f"stop requested for job {job_id}" in stop.stdout
    followed = p2p_jobs("jobs", "logs", job_id, "--follow", "--address", address, env=env, timeout=120)
    assert followed.returncode == 2, followed.stdout + followed.stderr
    assert f"[p2p] job {job_id} STOPPED" in followed.stdout


# ----------------------------------------------------------------------------------------------------------
# Real pipeline jobs on the head (paths are absolute: the job runs in Ray's copy of the checkout)
# ----------------------------------------------------------------------------------------------------------


class Built(NamedTuple):
    result: subprocess.CompletedProcess[str]
    output: Path  # the dataset folder


@pytest.fixture(scope="module")
def submitted_build(ray_head: RayHead, camvid_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Built:
    """`p2p dataset build` of 4 CamVid photos (canny edges, 64 px, all in train) as a job on the head."""
    root = tmp_path_factory.mktemp("jobs_build")
    photos = root / "photos"
    photos.mkdir()
    for path in sorted((camvid_dir / "train" / "images").glob("*.jpg"))[:4]:
        shutil.copy(path, photos / path.name)
    output = root / "dataset"
    result = p2p_jobs(
        "submit",
        "--address",
        ray_head.address,
        "--",
        "dataset",
        "build",
        "--source",
        str(photos),
        "--layout",
        "photos",
        "--builder",
        "canny",
        "--size",
        "64",
        "--output",
        str(output),
        "--set",
        "split.train=1.0",
        "--set",
        "split.val=0.0",
        "--set",
        "split.test=0.0",
        env=ray_head.client_env,
    )
    return Built(result, output)


@pytest.mark.slow
def test_dataset_build_job(submitted_build: Built) -> None:
    import json

    result, output = submitted_build
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[build]" in result.stdout and "SUCCEEDED" in result.stdout
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["totals"]["samples_written"] == 4 and manifest["quarantine"] == []


@pytest.mark.slow
def test_train_job(ray_head: RayHead, submitted_build: Built, tmp_path: Path) -> None:
    result, dataset = submitted_build
    assert result.returncode == 0, result.stdout + result.stderr
    storage = tmp_path / "train"
    settings = {
        "model.netG": "unet",
        "model.unet_downs": "6",
        "model.ngf": "8",
        "model.ndf": "8",
        "data.load_size": "72",
        "data.crop_size": "64",
        "data.num_workers": "0",
        "workers": "1",
        "global_batch_size": "1",
        "max_steps": "2",
        "val_split": "none",
        "mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    sets = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    env = {k: v for k, v in ray_head.client_env.items() if k != "MLFLOW_TRACKING_URI"}
    train = p2p_jobs(
        "submit",
        "--address",
        ray_head.address,
        "--",
        "train",
        "--manifest",
        str(dataset),
        "--storage",
        str(storage),
        *sets,
        env=env,
    )
    assert train.returncode == 0, train.stdout + train.stderr
    assert "[train] run" in train.stdout and "SUCCEEDED" in train.stdout
    assert (tmp_path / "mlflow.db").stat().st_size > 0


class FlakyDashboard:
    """Stands in for Ray's JobSubmissionClient on the network side only: its log stream is gone, and its
    REST answers fail with `requests` errors for the first `failures` polls (forever if None)."""

    def __init__(self, failures: int | None) -> None:
        self.failures, self.polls = failures, 0

    async def tail_job_logs(self, job_id: str) -> Any:
        raise OSError("websocket closed")
        yield ""  # an async generator, as Ray's

    def get_job_status(self, job_id: str) -> Any:
        import requests
        from ray.job_submission import JobStatus

        self.polls += 1
        if self.failures is None or self.polls <= self.failures:
            raise requests.exceptions.ConnectionError("HTTPConnectionPool: Max retries exceeded")
        return JobStatus.SUCCEEDED

    def get_job_logs(self, job_id: str) -> str:
        return "done\n"


def test_following_rides_out_a_network_blip_and_says_so_when_contact_is_lost(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A dashboard tunnel that drops while a job is followed: brief failures are retried; a lasting one is
    one line and exit 3 (the job may still run), not a traceback and the 'job failed' status 1."""
    from ray.job_submission import JobStatus

    followed = jobs.follow(FlakyDashboard(failures=3), "j1", out=sys.stdout, poll_s=0.01)  # type: ignore[arg-type]
    assert followed == JobStatus.SUCCEEDED
    assert "done" in capsys.readouterr().out

    def follow_lost(args: Any) -> int:
        jobs.follow(FlakyDashboard(failures=None), "j2", poll_s=0.01, lost_after_s=0.2)  # type: ignore[arg-type]
        return 0

    assert jobs.handled(follow_lost)(None) == jobs.LOST_CONTACT == 3  # type: ignore[arg-type]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and "lost contact with the cluster" in err[-1] and "p2p jobs status j2" in err[-1]
