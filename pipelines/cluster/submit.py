"""`p2p submit` and `p2p jobs`: run any `p2p` verb as a Ray job on a cluster, and follow or manage it.

Why Ray jobs rather than running `p2p` on the head node by hand: the job's driver runs inside the cluster
(next to GCS, surviving a closed laptop), gets this checkout uploaded as its working directory, and its logs,
status and exit code stay queryable from anywhere through the dashboard's Job Submission API.

    p2p submit --address http://head:8265 -- dataset build --config examples/camvid_labels_dataset.yaml \
        --source s3://bucket/raw/camvid --output s3://bucket/datasets/camvid-labels
    p2p submit --env AWS_ACCESS_KEY_ID --env AWS_SECRET_ACCESS_KEY -- train --manifest s3://datasets/x
    p2p jobs list | logs ID [--follow] | status ID | stop ID

Secrets: nothing here ever prints an environment value. Only the non-secret settings in `PASSTHROUGH_ENV`
travel by default (cluster nodes are expected to hold their own credentials); anything else needs an
explicit `--env NAME`, and is then shown as `NAME=***`. Values never go on the command line: Ray logs the
entrypoint, so a command that contains the value of a secret-looking variable, or a URI with
`user:password@`, is refused, and so is a passthrough setting (`MLFLOW_TRACKING_URI`) holding one.

Authentication: Ray 2.60 clusters started with a token (`~/.ray/auth_token`, `RAY_AUTH_TOKEN` or
`RAY_AUTH_TOKEN_PATH`) answer 401 to clients that send none. The job client sends the token when
`RAY_AUTH_MODE=token`. Like `ray.init()`, which auto-enables the token only for a local cluster it found
itself and never for an explicit address, `p2p submit` with no address (the local dashboard) sends the local
token when RAY_AUTH_MODE is unset; `RAY_AUTH_MODE=disabled` never sends one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import io
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from pipelines.runtime import environment
from pipelines.secrets import is_secret_name, redact, secret_values

if TYPE_CHECKING:
    from ray.job_submission import JobStatus, JobSubmissionClient

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
REPO_ROOT = Path(__file__).resolve().parents[2]

# Settings a job needs to reach the same storage and tracking server as this machine; none is a secret.
PASSTHROUGH_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_EC2_METADATA_DISABLED",
    "MLFLOW_TRACKING_URI",
    "P2P_HED_WEIGHTS",
    "NO_ALBUMENTATIONS_UPDATE",
)

# Never uploaded: environments, run outputs and caches (Ray also honours .gitignore, but a --working-dir
# elsewhere may have none). Ray caps the working_dir package at 500 MiB.
WORKING_DIR_EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "runs",
    "mlruns",
    "outputs",
    "__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    "*.egg-info",
    "*.db",
    ".device",
    ".whl",
    # local secrets and environment files (as .dockerignore keeps them out of images): the package is kept
    # in the cluster's object store and unpacked on every node
    ".env",
    "*.env",
    ".env.*",
    ".envrc",
    ".netrc",
    ".aws",
    ".ssh",
    "id_rsa*",
    "id_ed25519*",
    "id_ecdsa*",
    "*.pem",
    "*.key",
    "*credentials*",
    "secrets",
    # checkpoints and weights: jobs read them from storage, and they would eat the 500 MiB cap
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.safetensors",
]

EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 2}
INTERRUPTED = 130


class JobsError(Exception):
    """A problem the user can fix (no cluster, no token, bad flag): printed as one line, exit status 1."""


class LostContact(JobsError):
    """The cluster stopped answering while a job was followed: the job itself may still run (exit 3)."""


LOST_CONTACT = 3


# ----------------------------------------------------------------------------------------------------------
# Address, authentication, connection
# ----------------------------------------------------------------------------------------------------------


def resolve_address(flag: str | None, environ: Mapping[str, str] = os.environ) -> tuple[str, bool]:
    """The dashboard URL to talk to, and whether the user named it (which decides token auto-use).

    Order: --address, $RAY_API_SERVER_ADDRESS (Ray's own variable for job clients), $RAY_ADDRESS when it is
    an http(s) URL (a bare host:port there is a GCS address for `ray.init`, not a dashboard), the local
    dashboard.
    """
    if flag:
        return flag.rstrip("/"), True
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = environ.get(name, "")
        if value.startswith(("http://", "https://")):
            return value.rstrip("/"), True
    return DEFAULT_ADDRESS, False


def local_token(environ: Mapping[str, str] = os.environ) -> str | None:
    """This machine's Ray token, from the sources Ray reads, in Ray's order; None if there is none."""
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return environ["RAY_AUTH_TOKEN"].strip()
    path = Path(environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def auth_headers(explicit_address: bool, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Headers to add to Ray's own: the local token for the local dashboard when RAY_AUTH_MODE is unset.

    With RAY_AUTH_MODE=token Ray's client adds the token itself (any address); with `disabled`, or for an
    address the user named, nothing is added, so a token never goes to a server the user did not choose
    to trust (the same rule as `ray.init`).
    """
    if explicit_address or "RAY_AUTH_MODE" in environ:
        return {}
    token = local_token(environ)
    return {"Authorization": f"Bearer {token}"} if token else {}


def _quiet_ray_client_logs() -> None:
    """Keeps Ray's client-side logging to what helps: never a request body, no per-file packaging chatter.

    Ray's SDK logs each request body at DEBUG, runtime_env (so --env values) included; the packager logs
    every ignored .gitignore file at INFO, and warns that .git/.venv are excluded, which we ask for anyway.
    """
    levels = {
        "ray.dashboard.modules.dashboard_sdk": logging.INFO,
        "ray._private.runtime_env.packaging": logging.WARNING,
        "ray._private.runtime_env.working_dir": logging.ERROR,
    }
    for name, level in levels.items():
        logger = logging.getLogger(name)
        logger.setLevel(max(level, logger.getEffectiveLevel()))


def connect(address_flag: str | None) -> tuple[JobSubmissionClient, str]:
    """A job client for the cluster, or a JobsError saying how to get one (start a cluster, set the token).

    The client checks the dashboard's version on creation, so an unreachable cluster fails here, early.
    """
    from ray.exceptions import AuthenticationError, RpcError
    from ray.job_submission import JobSubmissionClient

    _quiet_ray_client_logs()
    address, explicit = resolve_address(address_flag)
    if not address.startswith(("http://", "https://")):
        raise JobsError(f"--address must be the dashboard's http(s):// URL, not {address}")
    try:
        with address_for_ray(address):
            client = JobSubmissionClient(address, headers=auth_headers(explicit))
    except AuthenticationError:
        raise JobsError(
            f"the Ray cluster at {address} requires a token: set RAY_AUTH_MODE=token and provide the "
            "cluster's token in ~/.ray/auth_token, $RAY_AUTH_TOKEN_PATH or $RAY_AUTH_TOKEN"
        ) from None
    except (ConnectionError, RpcError):  # requests' ConnectionError is re-raised by Ray as the builtin one
        raise JobsError(
            f"no Ray dashboard at {address}: start a cluster (`ray start --head`) or pass --address"
        ) from None
    return client, address


@contextlib.contextmanager
def address_for_ray(address: str) -> Iterator[None]:
    """Ray's job client takes $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS, over the address it is given: a
    shell set up for cluster A would send `--address http://B:8265` to A (and a bare host:port in
    $RAY_ADDRESS makes it wait for a GCS). While the client is made, the variable holds the address chosen
    by `resolve_address` (which already gave those variables their turn), and is restored after."""
    with environment({"RAY_API_SERVER_ADDRESS": address, "RAY_ADDRESS": None}):
        yield


# ----------------------------------------------------------------------------------------------------------
# What a job runs with: entrypoint, environment, working directory
# ----------------------------------------------------------------------------------------------------------


def job_env(extra: Sequence[str], environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The variables the job gets: the passthrough ones set here, plus each --env NAME (which must be set).

    `--env NAME=VALUE` is refused: a value on the command line lands in shell history and `ps`.
    """
    env = {name: environ[name] for name in PASSTHROUGH_ENV if name in environ}
    for name, value in env.items():
        # a settings variable holding a URI with user:password@ travels only when named with --env
        if name not in extra and redact(value, environ={}) != value:
            raise JobsError(
                f"{name} carries credentials (user:password@), which would travel in the job's runtime_env: "
                f"remove them from {name} and give them as MLFLOW_TRACKING_USERNAME / "
                f"MLFLOW_TRACKING_PASSWORD on the cluster's nodes (or send it anyway with --env {name})"
            )
    for name in extra:
        if "=" in name:
            raise JobsError(f"--env takes a variable's name, not NAME=VALUE ({name.split('=', 1)[0]}=...)")
        if name not in environ:
            raise JobsError(f"--env {name}: {name} is not set in this environment")
        env[name] = environ[name]
    return env


def describe_env(names: Sequence[str]) -> str:
    """Names for the console: plain for settings, `NAME=***` for secret-looking ones; never a value."""
    return ", ".join(f"{n}=***" if is_secret_name(n) else n for n in sorted(names)) or "(none)"


def build_entrypoint(
    command: Sequence[str], environ: Mapping[str, str] = os.environ, check: bool = True
) -> str:
    """`p2p <command>`, shell-quoted; refused if it contains the value of a secret-looking variable.

    Ray logs the entrypoint in the job's logs and shows it in `jobs list` and the dashboard, so a secret
    typed into the command (e.g. `--set x=$AWS_SECRET_ACCESS_KEY`) would be published. With `check`
    (the job runs this checkout) its arguments are parsed here first (`check_command`).
    """
    args = list(command)
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        raise JobsError("nothing to run: give a p2p verb after --, e.g. `p2p submit -- version`")
    if args[0] == "p2p":
        args = args[1:]
    if check:
        check_command(args)
    entrypoint = shlex.join(["p2p", *args])
    for name, value in secret_values(environ).items():
        if value in entrypoint:
            raise JobsError(
                f"the job's command contains the value of {name}; Ray logs the command: pass it with "
                f"--env {name} instead"
            )
    if redact(entrypoint, environ={}) != entrypoint:
        raise JobsError(
            "the job's command contains a URI with credentials (user:password@); Ray logs the command: give "
            "them as MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD on the cluster's nodes (or with "
            "--env NAME) instead"
        )
    return entrypoint


def check_command(args: list[str]) -> None:
    """The job's command line parsed by this checkout's own parser, the code the job runs: an unknown
    verb, flag or value fails here in one line rather than on the cluster, after the upload, as a FAILED
    job. (Only what the parser knows: a config's own checks run in the job.)"""
    from pipelines.cli import build_parser

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            parsed, unknown = build_parser().parse_known_args([a for a in args if a != "--debug"])
    except SystemExit as exc:
        if exc.code in (0, None):  # --help: the job prints it
            return
        lines = [line for line in errors.getvalue().splitlines() if line.strip()]
        raise JobsError(f"the job's command would fail: {lines[-1] if lines else 'bad arguments'}") from None
    if not getattr(parsed, "func", None):
        raise JobsError(f"the job's command names no p2p verb: {shlex.join(args)}")
    if unknown:
        prog = getattr(getattr(parsed, "verb_parser", None), "prog", "p2p")
        raise JobsError(f"the job's command would fail: {prog}: unrecognized arguments: {' '.join(unknown)}")


def build_runtime_env(
    working_dir: str | Path, env_vars: Mapping[str, str], pip: Sequence[str] = ()
) -> dict[str, Any]:
    """Ray's runtime_env: this checkout uploaded as the job's working dir (first on its PYTHONPATH, so the
    job runs the code you have here, not what the cluster has installed), the variables, extra packages."""
    path = Path(working_dir).resolve()
    if not path.is_dir():
        raise JobsError(f"--working-dir {path}: not a folder")
    runtime_env: dict[str, Any] = {
        "working_dir": str(path),
        "excludes": list(WORKING_DIR_EXCLUDES),
        "env_vars": dict(env_vars),
    }
    if pip:
        runtime_env["pip"] = list(pip)
    return runtime_env


def default_working_dir() -> Path:
    """The checkout this module lives in; an installed (non-editable) copy has none, so ask for one."""
    if (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "pipelines").is_dir():
        return REPO_ROOT
    raise JobsError("cannot find the project checkout to upload: pass --working-dir")


# ----------------------------------------------------------------------------------------------------------
# Following a job
# ----------------------------------------------------------------------------------------------------------


def exit_code(status: JobStatus | str) -> int:
    """The job's outcome as an exit status: 0 SUCCEEDED, 1 FAILED, 2 STOPPED (scripts can branch on it)."""
    return EXIT_CODES.get(str(getattr(status, "value", status)), 1)


async def _tail(client: JobSubmissionClient, job_id: str, out: TextIO, printed: list[int]) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()
        printed[0] += len(chunk)


def follow(
    client: JobSubmissionClient,
    job_id: str,
    out: TextIO = sys.stdout,
    poll_s: float = 1.0,
    lost_after_s: float = 60.0,
) -> JobStatus:
    """Print the job's logs as they come until it ends; return its final status.

    The dashboard's log websocket is used because it streams without re-reading the whole log; if it
    drops, the rest is fetched by polling the full log and printing what was not printed yet. Polls that
    fail on the network are retried for ``lost_after_s``, then `LostContact` (the job is not stopped).
    """
    printed = [0]
    streamed = True
    try:
        asyncio.run(_tail(client, job_id, out, printed))
    except Exception as exc:  # aiohttp and Ray raise various types; polling surfaces real errors
        print(f"[p2p] log stream lost ({type(exc).__name__}); polling the logs instead", file=sys.stderr)
        streamed = False
    failing_since: float | None = None
    while True:
        try:
            status = client.get_job_status(job_id)
            if not streamed or not status.is_terminal():
                streamed = False  # the stream ended before the job did: catch up by polling
                logs = client.get_job_logs(job_id)
                if len(logs) > printed[0]:
                    out.write(logs[printed[0] :])
                    out.flush()
                    printed[0] = len(logs)
        except OSError as exc:  # requests' ConnectionError and Timeout are OSErrors: a tunnel blip, say
            now = time.monotonic()
            failing_since = now if failing_since is None else failing_since
            if now - failing_since >= lost_after_s:
                raise LostContact(
                    f"lost contact with the cluster for {lost_after_s:.0f} s ({type(exc).__name__}); job "
                    f"{job_id} may still be running: p2p jobs status {job_id}"
                ) from exc
            time.sleep(poll_s)
            continue
        failing_since = None
        if status.is_terminal():
            return status
        time.sleep(poll_s)


def _address_flag(address: str) -> str:
    return "" if address == DEFAULT_ADDRESS else f" --address {shlex.quote(address)}"


def _report(client: JobSubmissionClient, job_id: str, address: str) -> int:
    info = client.get_job_info(job_id)
    status = str(info.status.value)
    line = f"[p2p] job {job_id} {status}"
    if status == "FAILED" and info.driver_exit_code is not None:
        line += f" (exit code {info.driver_exit_code})"
    print(line, flush=True)
    if status not in EXIT_CODES:
        print(f"[p2p] see it with: p2p jobs status {job_id}{_address_flag(address)}")
    return exit_code(status)


# ----------------------------------------------------------------------------------------------------------
# Verbs
# ----------------------------------------------------------------------------------------------------------


def submit(
    address: str | None,
    command: Sequence[str],
    *,
    working_dir: str | Path | None = None,
    env_names: Sequence[str] = (),
    pip: Sequence[str] = (),
    job_id: str | None = None,
) -> tuple[str, JobSubmissionClient, str]:
    """Submit `p2p <command>` with this checkout and the chosen variables to the cluster at `address`;
    return (submission id, the client, the address used). The command's own mistakes are found before
    connecting: they need no cluster, and a cluster's absence must not hide them."""
    uploaded = Path(working_dir).resolve() if working_dir else default_working_dir()
    # This checkout's parser knows the job's command only when the job runs this checkout.
    entrypoint = build_entrypoint(command, check=uploaded == REPO_ROOT.resolve())
    env = job_env(env_names)
    runtime_env = build_runtime_env(uploaded, env, pip)
    client, address = connect(address)
    print(f"[p2p] submitting: {entrypoint}", flush=True)
    print(f"[p2p] working dir: {runtime_env['working_dir']} (uploaded)", flush=True)
    print(f"[p2p] env for the job: {describe_env(list(env))}", flush=True)
    if any(is_secret_name(n) for n in env):
        print(
            "[p2p] note: --env values are stored in the job's runtime_env: readable through the cluster's "
            "dashboard/Jobs API and logged by Ray's runtime_env agent on the nodes",
            file=sys.stderr,
            flush=True,
        )
    submitted = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=job_id)
    return submitted, client, address


def cmd_submit(args: argparse.Namespace) -> int:
    """`p2p submit`: submit, then follow to the end so that the exit status is the job's (scripts, CI)."""
    job_id, client, address = submit(
        args.address,
        args.command,
        working_dir=args.working_dir,
        env_names=args.env,
        pip=args.pip,
        job_id=args.job_id,
    )
    flag = _address_flag(address)
    print(f"[p2p] submitted job {job_id} to {address}", flush=True)
    if args.no_wait:
        print(f"[p2p] follow it with: p2p jobs logs {job_id} --follow{flag}")
        return 0
    try:
        follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\n[p2p] stopped following; job {job_id} keeps running.")
        print(f"[p2p] stop it with: p2p jobs stop {job_id}{flag}", flush=True)
        return INTERRUPTED
    return _report(client, job_id, address)


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def _truncate(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def cmd_jobs_list(args: argparse.Namespace) -> int:
    """`p2p jobs list`: one line per job, oldest first; never the runtime_env, which holds --env values."""
    client, _ = connect(args.address)
    jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    # The runtime_env (with --env values) is deliberately left out.
    rows = [
        (
            j.submission_id or j.job_id or "-",
            str(j.status.value),
            _when(j.start_time),
            _when(j.end_time),
            _truncate(j.entrypoint or "", args.width),
        )
        for j in jobs
    ]
    header = ("ID", "STATUS", "START", "END", "ENTRYPOINT")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)) + "  " + row[4])
    return 0


def cmd_jobs_logs(args: argparse.Namespace) -> int:
    """`p2p jobs logs ID [--follow]`: the logs so far, or (--follow) to the end with the job's exit status,
    e.g. after `submit --no-wait` or a Ctrl-C."""
    client, address = connect(args.address)
    if not args.follow:
        sys.stdout.write(client.get_job_logs(args.job_id))
        return 0
    try:
        follow(client, args.job_id)
    except KeyboardInterrupt:
        print(f"\n[p2p] stopped following job {args.job_id}; it keeps running")
        return INTERRUPTED
    return _report(client, args.job_id, address)


def cmd_jobs_status(args: argparse.Namespace) -> int:
    """`p2p jobs status ID`: status, times, the driver's exit code and Ray's one-line reason."""
    client, _ = connect(args.address)
    info = client.get_job_info(args.job_id)
    print(f"{args.job_id} {info.status.value}")
    print(f"  entrypoint: {info.entrypoint}")
    print(f"  started: {_when(info.start_time)}  ended: {_when(info.end_time)}")
    if info.driver_exit_code is not None:
        print(f"  exit code: {info.driver_exit_code}")
    if info.message:  # its first line; Ray appends the log tail, which `jobs logs` shows whole
        print(f"  {info.message.splitlines()[0].split(', last available logs')[0]}")
    return 0


def cmd_jobs_stop(args: argparse.Namespace) -> int:
    """`p2p jobs stop ID`: asks Ray to stop the job (SIGTERM to its driver, then SIGKILL); returns at once."""
    client, _ = connect(args.address)
    if client.stop_job(args.job_id):
        print(f"[p2p] stop requested for job {args.job_id}")
    else:
        print(f"[p2p] job {args.job_id} is not running ({client.get_job_status(args.job_id).value})")
    return 0


def handled(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wraps a verb so that user-fixable problems print one line on stderr and exit with status 1.

    Ray's job API answers a bad id or a refused request with RuntimeError; a stack trace would bury the
    message. `p2p`'s main calls `args.func(args)` directly, so the wrapping happens at registration.
    """

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            return int(func(args))
        except (JobsError, RuntimeError) as exc:
            print(f"p2p: error: {exc}", file=sys.stderr)
            return LOST_CONTACT if isinstance(exc, LostContact) else 1

    return run


SUBMIT_HELP = """\
Runs `p2p COMMAND...` as a Ray job: the project folder is uploaded as the job's working directory and the
job's logs are followed here until it ends; the exit status is the job's (0 succeeded, 1 failed,
2 stopped; 130 if you stop following with Ctrl-C, which leaves the job running; 3 if the cluster stops
answering for a minute while following, which leaves it running too). An error here (no dashboard at the
address, a bad --env, a refused request) prints one line and exits 1, as in `p2p jobs`.

Environment: the non-secret settings AWS_ENDPOINT_URL, AWS_REGION, AWS_DEFAULT_REGION,
AWS_EC2_METADATA_DISABLED, MLFLOW_TRACKING_URI, P2P_HED_WEIGHTS and NO_ALBUMENTATIONS_UPDATE go with the job
when set here. Anything else, credentials included, only with --env NAME (cluster nodes normally have their
own). Values are never printed, and are stored in the job's runtime_env on the cluster: an
MLFLOW_TRACKING_URI with user:password@ goes only when named with --env.

Cluster: --address, else $RAY_API_SERVER_ADDRESS or an http(s) $RAY_ADDRESS, else http://127.0.0.1:8265.
A cluster with token auth needs RAY_AUTH_MODE=token (the local dashboard gets the local token anyway).

A job runs in a copy of this folder on the cluster: give it s3:// sources and outputs (a relative path
there is the copy's, lost when the job ends).

examples:
  p2p submit -- version
  p2p submit --address http://head:8265 -- dataset build --config examples/camvid_labels_dataset.yaml \\
      --source s3://bucket/raw/camvid --output s3://bucket/datasets/camvid-labels
  p2p submit --env AWS_ACCESS_KEY_ID --env AWS_SECRET_ACCESS_KEY --no-wait -- train --manifest s3://d/x
"""


JOB_ID_HELP = "the job's submission id, as `p2p submit` prints it and `p2p jobs list` shows it"


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        help="the cluster's dashboard URL (default: $RAY_API_SERVER_ADDRESS, http(s) $RAY_ADDRESS, "
        f"{DEFAULT_ADDRESS})",
    )


def add_job_verbs(verbs: argparse._SubParsersAction) -> None:
    """Registers `submit` and `jobs` (list / logs / status / stop) on the `p2p` parser's verbs."""
    sub = verbs.add_parser(
        "submit",
        help="run a p2p verb as a job on a Ray cluster and follow its logs",
        description=SUBMIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="p2p submit [options] -- COMMAND [ARGS...]",
    )
    _add_address(sub)
    sub.add_argument("--no-wait", action="store_true", help="return once submitted; do not follow the logs")
    sub.add_argument("--working-dir", help="folder uploaded as the job's working dir (default: this project)")
    sub.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME",
        help="also pass this variable's value to the job (repeatable); its value is never printed",
    )
    sub.add_argument(
        "--pip", action="append", default=[], metavar="PKG", help="pip package to add in the job (repeatable)"
    )
    sub.add_argument("--job-id", help="submission id to use (default: generated by Ray)")
    sub.add_argument("command", nargs=argparse.REMAINDER, help="the p2p verb and its arguments, after --")
    sub.set_defaults(func=handled(cmd_submit))

    jobs = verbs.add_parser(
        "jobs",
        help="list, follow, inspect and stop jobs on a Ray cluster",
        description="list, follow, inspect and stop jobs on a Ray cluster; an error (no dashboard at the "
        "address, an unknown job id) prints one line and exits 1",
    )
    actions = jobs.add_subparsers(dest="jobs_verb", metavar="ACTION", required=True)
    ls = actions.add_parser("list", help="all jobs: id, status, start and end time, entrypoint")
    _add_address(ls)
    ls.add_argument(
        "--width", type=int, default=60, help="truncate entrypoints to N characters (default: %(default)s)"
    )
    ls.set_defaults(func=handled(cmd_jobs_list))
    logs = actions.add_parser("logs", help="print a job's logs (--follow: until it ends)")
    _add_address(logs)
    logs.add_argument("job_id", metavar="ID", help=JOB_ID_HELP)
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    logs.set_defaults(func=handled(cmd_jobs_logs))
    status = actions.add_parser("status", help="a job's status, times, exit code and message")
    _add_address(status)
    status.add_argument("job_id", metavar="ID", help=JOB_ID_HELP)
    status.set_defaults(func=handled(cmd_jobs_status))
    stop = actions.add_parser("stop", help="stop a running job")
    _add_address(stop)
    stop.add_argument("job_id", metavar="ID", help=JOB_ID_HELP)
    stop.set_defaults(func=handled(cmd_jobs_stop))
