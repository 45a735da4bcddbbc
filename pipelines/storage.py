"""One code path for a local folder or ``s3://bucket/prefix``.

URIs are plain strings: a local path (absolute, relative, ``~``, or ``file:///abs``) or ``s3://bucket/key``.
Anything else that starts like a URI (``s3:/bucket``, ``gs://bucket``) is refused, never taken for a
relative folder named ``s3:``; a relative folder with such a name is written ``./s3:x``.
S3 settings come from the standard environment variables, read at call time:

* ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``): a custom endpoint such as ``http://127.0.0.1:8333``;
  unset means AWS itself;
* ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``; unset means the SDK's default
  chain (profile files, instance roles);
* ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` (default ``us-east-1``);
* ``P2P_S3_MAX_ATTEMPTS`` (default 8), ``P2P_S3_CONNECT_TIMEOUT`` (s, default 5),
  ``P2P_S3_REQUEST_TIMEOUT`` (s, default 60): how hard every S3 request tries before an error is final;
* ``P2P_S3_SLOW_NOTICE_S`` (default 20, 0 = never): a request running this long is said on stderr, and
  said again when it is answered (see `slow_notice`).

Data moves through ``pyarrow.fs``; ``preflight()`` and the conditional writes of `create_exclusive` use
boto3 because its errors name the cause (pyarrow's say little more than "AWS Error ACCESS_DENIED").
Errors never contain secrets. An S3 filesystem handed to another process (Ray pickles a Train run's
``storage_filesystem`` into its controller and workers) carries no credentials: it is rebuilt there from
that process's environment, with the same retry settings.

Transient faults are retried, never taken for bad data: both clients run the SDKs' own "standard" retry
mode (network errors, throttling, 5xx and timeouts are retried with jittered exponential backoff, up to
``P2P_S3_MAX_ATTEMPTS`` attempts per request; the C++ SDK waits up to 1 s × 2^retry, capped at 20 s, so the
default rides out an outage of about half a minute). An S3 error that survives the retries becomes a
`StorageError` naming the endpoint, the key and the attempts, so callers fail the job (the dataset build
writes no manifest) instead of recording a sample as unreadable. Missing files stay `FileNotFoundError`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.fs as pafs

S3_PREFIX = "s3://"
# A leading "NAME:" (RFC 3986 scheme syntax): a URI, never a relative folder (Linux: no drive letters).
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_TMP_PREFIX = ".tmp."  # in-progress local writes; list_files() skips them
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "InvalidToken",
    "ExpiredToken",
    "InvalidClientTokenId",
    "AuthorizationHeaderMalformed",
    "403",
    "Forbidden",
}
_MISSING_BUCKET_CODES = {"NoSuchBucket", "404", "NotFound"}
_CREDENTIALS_HINT = "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
# Retry settings (see the module docstring): name → (default, minimum).
_RETRY_ENV = {
    "P2P_S3_MAX_ATTEMPTS": (8, 1),
    "P2P_S3_CONNECT_TIMEOUT": (5, 1),
    "P2P_S3_REQUEST_TIMEOUT": (60, 1),
    "P2P_S3_SLOW_NOTICE_S": (20, 0),
}


class StorageError(RuntimeError):
    """A storage location is unusable; the message names the cause (never a secret)."""


# ---------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class S3Settings:
    """S3 connection settings from the environment. Secrets are excluded from repr()."""

    endpoint_url: str | None
    region: str
    access_key: str | None
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    max_attempts: int = 8  # per request, the first one included
    connect_timeout: int = 5  # seconds
    request_timeout: int = 60  # seconds

    @classmethod
    def from_env(cls) -> S3Settings:
        env = os.environ
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        access_key = env.get("AWS_ACCESS_KEY_ID") or None
        secret_key = env.get("AWS_SECRET_ACCESS_KEY") or None
        if bool(access_key) != bool(secret_key):
            missing = "AWS_SECRET_ACCESS_KEY" if access_key else "AWS_ACCESS_KEY_ID"
            raise StorageError(f"{missing} is not set (set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
        return cls(
            endpoint_url=endpoint.rstrip("/") if endpoint else None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            access_key=access_key,
            secret_key=secret_key,
            session_token=env.get("AWS_SESSION_TOKEN") or None,
            max_attempts=_env_int("P2P_S3_MAX_ATTEMPTS"),
            connect_timeout=_env_int("P2P_S3_CONNECT_TIMEOUT"),
            request_timeout=_env_int("P2P_S3_REQUEST_TIMEOUT"),
        )

    @property
    def endpoint_label(self) -> str:
        return self.endpoint_url or f"AWS S3 ({self.region})"

    @property
    def key_label(self) -> str:
        """The access key id, masked like ``aws configure list`` does."""
        if not self.access_key:
            return "credentials from the default AWS chain"
        return f"access key ****{self.access_key[-4:]}"


def _env_int(name: str) -> int:
    default, minimum = _RETRY_ENV[name]
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise StorageError(f"{name} must be an integer >= {minimum}, got {raw!r}")
    return value


# ---------------------------------------------------------------------------- resolve


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_PREFIX)


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_s3(uri):
        raise StorageError(f"not an s3:// URI: {uri}")
    bucket, _, key = uri[len(S3_PREFIX) :].partition("/")
    if not bucket:
        raise StorageError(f"no bucket in {uri!r} (expected s3://bucket/prefix)")
    return bucket, key.strip("/")


def _local_path(uri: str) -> str:
    """The absolute path of a local path (absolute, relative, ``~``) or ``file:///abs`` URI.

    Anything that starts like a URI (``s3:/b/k``, ``s3:b/k``, ``S3://b/k``, ``gs://b``, ``http:x``) is a
    StorageError naming the intended form, never a relative folder named ``s3:`` in the current directory.
    A relative folder whose name holds a colon stays reachable as ``./s3:x``.
    """
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(
                f"file URI with a host is not supported: {uri}: did you mean file:///abs/path (three "
                "slashes)? A relative path needs no file://"
            )
        return os.path.abspath(os.path.expanduser(unquote(parsed.path)))
    scheme = _SCHEME.match(uri)
    if scheme or "://" in uri:
        raise StorageError(_not_a_local_path(uri, scheme.group()[:-1] if scheme else ""))
    return os.path.abspath(os.path.expanduser(uri))


def _not_a_local_path(uri: str, scheme: str) -> str:
    rest = uri[len(scheme) + 1 :].lstrip("/")
    if scheme.lower() == "s3":
        return f"{uri}: did you mean s3://{rest}?"
    if scheme.lower() == "file":
        return f"{uri}: did you mean file:///{rest}? (three slashes, then the absolute path)"
    local = f"; a local folder named so is written ./{uri}" if scheme and "://" not in uri else ""
    return f"unsupported URI scheme in {uri!r} (use a local path or s3://bucket/prefix{local})"


# One client per settings and process. A forked child (e.g. a DataLoader worker) must not reuse the parent's:
# they would share pooled keep-alive sockets and read each other's responses (seen as "Failed to flush
# response stream" and tars that silently end early). After a fork the child starts an empty cache and
# keeps the inherited clients referenced but unused: closing them could end connections the parent uses.
_S3_CLIENTS: dict[S3Settings, pafs.S3FileSystem] = {}
_INHERITED_CLIENTS: list[pafs.S3FileSystem] = []
_S3_LOCK = threading.Lock()


def _forget_clients_after_fork() -> None:
    global _S3_LOCK, _BOTO3_LOCK
    _INHERITED_CLIENTS.extend(_S3_CLIENTS.values())
    _S3_CLIENTS.clear()
    # A lock another thread held at the fork stays held in the child, where that thread does not exist:
    # the child's first S3 access would wait for ever.
    _S3_LOCK, _BOTO3_LOCK = threading.Lock(), threading.Lock()


os.register_at_fork(after_in_child=_forget_clients_after_fork)


def _s3_filesystem(settings: S3Settings) -> pafs.S3FileSystem:
    with _S3_LOCK:
        if settings not in _S3_CLIENTS:
            _S3_CLIENTS[settings] = _new_s3_filesystem(settings)
        return _S3_CLIENTS[settings]


class _EnvS3FileSystem(pafs.S3FileSystem):
    """The S3 client of this process, pickled as "this module's client for the environment where it lands".

    pyarrow pickles an S3FileSystem as its constructor options *without* the retry strategy (pyarrow 25),
    and with the access key and secret. Ray pickles the filesystem of a Train run (RunConfig's
    ``storage_filesystem``) into its controller and workers, so as a plain S3FileSystem their checkpoint
    uploads ran with pyarrow's default of 3 quick attempts (a 4 s outage failed the run at once, see
    tests/test_faults.py) and the secret travelled in actor arguments. Unpickled, this is rebuilt by
    `_env_s3_filesystem` from the receiving process's own environment (its node's credentials,
    ``P2P_S3_*`` retry settings), like every other S3 access of a worker."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_env_s3_filesystem, ())


def _env_s3_filesystem() -> pafs.S3FileSystem:
    return _s3_filesystem(S3Settings.from_env())


def _new_s3_filesystem(settings: S3Settings) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {
        "region": settings.region,
        "access_key": settings.access_key,
        "secret_key": settings.secret_key,
        "session_token": settings.session_token,
        # defer CreateMultipartUpload: an object smaller than one part becomes a single PutObject
        "allow_delayed_open": True,
        # the SDK's standard mode: network errors, throttling, 5xx and timeouts, with backoff
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=settings.max_attempts),
        "connect_timeout": settings.connect_timeout,
        "request_timeout": settings.request_timeout,
    }
    if settings.endpoint_url:
        parsed = urlparse(settings.endpoint_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise StorageError(
                f"AWS_ENDPOINT_URL must look like http(s)://host:port, got {settings.endpoint_url!r}"
            )
        # with endpoint_override set, pyarrow addresses buckets path-style (force_virtual_addressing=False)
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    return _EnvS3FileSystem(**kwargs)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a local path / ``file://`` URI or an ``s3://bucket/key`` URI."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return _s3_filesystem(S3Settings.from_env()), f"{bucket}/{key}" if key else bucket
    return pafs.LocalFileSystem(), _local_path(uri)


def normalize_uri(uri: str) -> str:
    """Absolute local path, or the s3:// URI without a trailing slash: the form listings come back in."""
    if is_s3(uri):
        return uri.rstrip("/")
    return _local_path(uri)


def _to_uri(like: str, path: str) -> str:
    """A filesystem path back to a URI of the same kind as ``like``."""
    return S3_PREFIX + path if is_s3(like) else path


# ---------------------------------------------------------------------------- errors


@contextlib.contextmanager
def s3_errors(uri: str, action: str) -> Iterator[None]:
    """Turn an S3 error that survived the SDK's retries into a StorageError naming endpoint, key and
    attempts. Local OSErrors and FileNotFoundError pass through unchanged. A slow request is said
    (`slow_notice`)."""
    try:
        with slow_notice(uri, action):
            yield
    except FileNotFoundError:
        raise
    except OSError as exc:
        if not is_s3(uri):
            raise
        raise StorageError(transient_message(uri, action, exc)) from exc


def transient_message(uri: str, action: str, exc: BaseException) -> str:
    """What an S3 error that outlasted the retries means: the cause when it is no outage (credentials
    rejected, bucket missing: retrying cannot help), else the attempts made."""
    settings = S3Settings.from_env()
    detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if any(code in detail for code in ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH")):
        return (
            f"credentials rejected by {settings.endpoint_label} for the S3 {action} of {uri}: "
            f"{_CREDENTIALS_HINT} ({settings.key_label})"
        )
    if "NO_SUCH_BUCKET" in detail:
        bucket = split_s3(uri)[0]
        return f"bucket '{bucket}' does not exist at {settings.endpoint_label} (S3 {action} of {uri})"
    return (
        f"S3 {action} of {uri} at {settings.endpoint_label} failed after {settings.max_attempts} attempts "
        f"(P2P_S3_MAX_ATTEMPTS): {detail}"
    )


# ---------------------------------------------------------------------------- slow requests
# While the SDK retries an outage (about half a minute with the defaults, minutes against a server that
# accepts connections and never answers) a job would otherwise print nothing at all.


@dataclass
class _Request:
    started: float
    uri: str
    action: str
    threshold: float
    noticed: bool = False  # its slowness was said (it, or another request said at the same time)
    named: bool = False  # it was the one named: its answer is said too


_REQUESTS: dict[int, _Request] = {}
_REQUESTS_LOCK = threading.Lock()
_request_ids = itertools.count()
_watcher: threading.Thread | None = None


@contextlib.contextmanager
def slow_notice(uri: str, action: str) -> Iterator[None]:
    """Say on stderr when this S3 request has run for ``P2P_S3_SLOW_NOTICE_S`` seconds, and again if it
    is then answered (a result, or "no such key"). One daemon thread per process looks once a second;
    requests slow at the same time share one line (a build's tasks all wait on the same outage). Local
    paths are never watched."""
    threshold = _env_int("P2P_S3_SLOW_NOTICE_S") if is_s3(uri) else 0
    if threshold <= 0:
        yield
        return
    global _watcher
    key, request = next(_request_ids), _Request(time.monotonic(), uri, action, threshold)
    with _REQUESTS_LOCK:
        _REQUESTS[key] = request
        if _watcher is None:
            _watcher = threading.Thread(target=_watch_requests, name="p2p-s3-slow", daemon=True)
            _watcher.start()
    answered = False  # the storage answered: a result, or "no such key"
    try:
        yield
        answered = True
    except FileNotFoundError:
        answered = True
        raise
    finally:
        with _REQUESTS_LOCK:
            _REQUESTS.pop(key, None)
            if request.named and answered:
                took = time.monotonic() - request.started
                with contextlib.suppress(Exception):  # a broken stderr must not fail the request
                    _say(f"[s3] {action} of {uri} answered after {took:.0f} s")


def _watch_requests() -> None:
    while True:
        time.sleep(1.0)
        # Printed under the lock, so that a request's "answered" never comes before its slowness.
        with _REQUESTS_LOCK, contextlib.suppress(Exception):  # a broken stderr must not end the watcher
            now = time.monotonic()
            due = sorted(
                (r for r in _REQUESTS.values() if not r.noticed and now - r.started >= r.threshold),
                key=lambda r: r.started,
            )
            if not due:
                continue
            for request in due:
                request.noticed = True
            oldest, settings = due[0], S3Settings.from_env()
            oldest.named = True
            others = f" (and {len(due) - 1} other request(s) of this process)" if len(due) > 1 else ""
            _say(
                f"[s3] {oldest.action} of {oldest.uri}{others} at {settings.endpoint_label} still running "
                f"after {now - oldest.started:.0f} s: a large transfer, a slow storage, or an outage being "
                f"retried (up to {settings.max_attempts} attempts per request, P2P_S3_MAX_ATTEMPTS)"
            )


def _say(line: str) -> None:
    """A line on stderr. Not print(): Ray Train patches print in its workers to log it too, which shows
    every line twice on the driver's console."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _forget_requests_after_fork() -> None:
    """The watcher thread does not exist in a forked child, and the parent's requests are not its own."""
    global _REQUESTS_LOCK, _watcher
    _REQUESTS.clear()
    _REQUESTS_LOCK, _watcher = threading.Lock(), None


os.register_at_fork(after_in_child=_forget_requests_after_fork)


class WatchedReads:
    """A stream whose reads are watched by `slow_notice` (a shard streamed from S3 stalls in ``read``)."""

    def __init__(self, raw: Any, uri: str) -> None:
        self.raw, self.uri = raw, uri

    def read(self, size: int | None = -1) -> bytes:
        with slow_notice(self.uri, "read"):
            return self.raw.read() if size is None or size < 0 else self.raw.read(size)


def find_io_error(exc: BaseException) -> BaseException | None:
    """The StorageError or OSError behind ``exc``, looking through Ray's task-error wrappers (whose
    ``cause`` is the worker's exception); None when the failure was not I/O."""
    todo: list[BaseException] = [exc]
    seen: set[int] = set()
    while todo:
        err = todo.pop(0)
        if id(err) in seen:
            continue
        seen.add(id(err))
        wrapper = type(err).__module__.startswith("ray")  # RayTaskError(StorageError) is both: unwrap it
        if not wrapper and isinstance(err, StorageError | OSError):
            return err
        todo += [e for e in (getattr(err, "cause", None), err.__cause__, err.__context__) if e is not None]
    return None


# ---------------------------------------------------------------------------- helpers


def join(uri: str, *parts: str) -> str:
    """Join with '/', whatever the backend: ``join("s3://b/p", "x", "y.tar") == "s3://b/p/x/y.tar"``."""
    out = uri
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out.rstrip('/')}/{part}"
    return out


def overlap(a: str, b: str) -> bool:
    """Whether two folders / prefixes are the same or one lies inside the other (local: after links)."""
    a, b = normalize_uri(a).rstrip("/"), normalize_uri(b).rstrip("/")
    if not is_s3(a) and not is_s3(b):
        a, b = os.path.realpath(_local_path(a)), os.path.realpath(_local_path(b))
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    with s3_errors(uri, "HEAD"):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def modified_time(uri: str) -> float:
    """A file's modification time (seconds since the epoch, the storage's clock); FileNotFoundError."""
    fs, path = resolve(uri)
    with s3_errors(uri, "HEAD"):
        info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(uri)
    return info.mtime.timestamp() if info.mtime else 0.0


def read_bytes(uri: str) -> bytes:
    """Whole file; ``FileNotFoundError`` if missing, on either backend."""
    fs, path = resolve(uri)
    # compression=None: the file's own bytes (pyarrow would decompress a name ending .gz, .bz2, .zst, ...).
    with s3_errors(uri, "read"), fs.open_input_stream(path, compression=None) as stream:
        return stream.read()


def write_bytes_atomic(uri: str, data: bytes | bytearray | memoryview) -> None:
    """Readers see the old content or the new, never a partial file.

    Local: write a temp file in the same folder, fsync, ``os.replace``. S3: a single PUT (multipart
    above pyarrow's part size), atomic either way: the object appears only once the upload completes.
    """
    if is_s3(uri):
        fs, path = resolve(uri)
        with s3_errors(uri, "write"), fs.open_output_stream(path, compression=None) as out:
            out.write(data)
        return
    path = _local_path(uri)
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"{_TMP_PREFIX}{name}.{uuid.uuid4().hex[:12]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, like a plain open()
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def list_files(uri: str, suffix: str | None = None, include_temp: bool = False) -> list[str]:
    """Files under ``uri`` (recursive), sorted, as URIs of the same kind; [] if the folder is missing.
    In-progress local writes are hidden unless ``include_temp`` (for cleaning up after a crash)."""
    return [u for u, _ in list_file_sizes(uri, suffix, include_temp)]


def list_file_sizes(
    uri: str, suffix: str | None = None, include_temp: bool = False, follow_links: bool = False
) -> list[tuple[str, int]]:
    """Like ``list_files``, with each file's size in bytes."""
    return [(u, size) for u, size, _ in list_file_infos(uri, suffix, include_temp, follow_links)]


def list_file_infos(
    uri: str,
    suffix: str | None = None,
    include_temp: bool = False,
    follow_links: bool = False,
    not_listed: list[tuple[str, str]] | None = None,
) -> list[tuple[str, int, float]]:
    """Like ``list_files``, with each file's size and modification time (seconds since the epoch, by the
    storage's own clock: compare them with each other, not with this machine's time).

    ``follow_links``: also list local folders reached through a symlink (a user's source folder, whose
    splits are often links), but not a link to the listed folder or any folder above it, which would loop
    or list what lies beside it (the job's own output, other teams' folders). Off for the project's own
    folders, whose listings decide deletions: a link there must not lead them elsewhere.
    ``not_listed`` (local): gets (path, reason) for each entry the walk passed over that a user may expect
    listed: such a link, a broken link or a link loop, a fifo or socket; so the caller can report them."""

    def wanted(name: str) -> bool:
        visible = include_temp or not name.startswith(_TMP_PREFIX)
        return visible and (suffix is None or name.endswith(suffix))

    if not is_s3(uri):
        # os.walk rather than pyarrow: pyarrow aborts the whole listing on one file name that is not UTF-8,
        # while os.walk hands it over (surrogate-escaped) so the caller can report it.
        root = _local_path(uri)
        found: list[tuple[str, int, float]] = []
        passed = not_listed if not_listed is not None else []
        # Followed links: each folder's own id and those of every folder above it (the root's ancestors
        # too), so that a link back up is not entered.
        chains: dict[str, frozenset[tuple[int, int]]] = {}
        if follow_links and os.path.isdir(root):
            chains[root] = frozenset(_folder_id(folder) for folder in _with_ancestors(root))
        for folder, subfolders, names in os.walk(root, followlinks=follow_links):
            if follow_links:
                chain, kept = chains.pop(folder, frozenset()), []
                for sub in subfolders:
                    sub_id = _folder_id(os.path.join(folder, sub))
                    if sub_id not in chain:
                        kept.append(sub)
                        chains[os.path.join(folder, sub)] = chain | {sub_id}
                    else:
                        passed.append(
                            (os.path.join(folder, sub), "a link to a folder above it, not followed")
                        )
                subfolders[:] = kept
            for name in names:
                path = os.path.join(folder, name)
                if not wanted(name):
                    continue
                if os.path.isfile(path):
                    try:
                        stat = os.stat(path)
                    except FileNotFoundError:  # removed since the walk saw it (a concurrent writer)
                        continue
                    found.append((path, stat.st_size, stat.st_mtime))
                elif os.path.islink(path):
                    passed.append((path, "a broken link (it points to nothing, or to itself)"))
                elif os.path.lexists(path):
                    passed.append((path, "not a regular file (a fifo, socket or device)"))
        return sorted(found)
    fs, path = resolve(uri)
    with s3_errors(uri, "listing"):
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(
        (_to_uri(uri, info.path), int(info.size or 0), info.mtime.timestamp() if info.mtime else 0.0)
        for info in infos
        if info.type == pafs.FileType.File and wanted(info.base_name)
    )


def _folder_id(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def _with_ancestors(path: str) -> list[str]:
    folders = [os.path.realpath(path)]
    while os.path.dirname(folders[-1]) != folders[-1]:
        folders.append(os.path.dirname(folders[-1]))
    return folders


def delete(uri: str, missing_ok: bool = True) -> None:
    """Delete a file, or a folder / prefix with everything under it."""
    fs, path = resolve(uri)
    with s3_errors(uri, "delete"):
        kind = fs.get_file_info(path).type
        try:
            if kind == pafs.FileType.File:
                fs.delete_file(path)
            elif kind == pafs.FileType.Directory:
                fs.delete_dir(path)
            elif not missing_ok:
                raise FileNotFoundError(uri)
        except FileNotFoundError:  # deleted by someone else between the look and the delete
            if not missing_ok:
                raise


def create_exclusive(uri: str, data: bytes) -> str | None:
    """Create ``uri`` with ``data`` only if nothing is there: a version tag (the S3 ETag) when created,
    None when the file exists. The one primitive behind build locks.

    Local: ``os.open(O_CREAT | O_EXCL)``, atomic on POSIX filesystems (NFSv3 and older excepted). S3: a
    conditional PutObject with ``If-None-Match: *``; AWS S3 honours it since 2024-08 and answers 412
    PreconditionFailed (or 409 ConditionalRequestConflict while another conditional write of the key is
    in flight), as does SeaweedFS 4.x (checked with weed 4.48, the test server). A store that ignores the
    header would let two writers in; `put_if_match` and the lock's ownership check narrow that. On S3 an
    object already holding exactly ``data`` counts as created (a retried PUT finding its own first
    attempt), so callers write contents no other writer could (a pid and time, a run id).
    """
    if is_s3(uri):
        return _s3_conditional_put(uri, data, IfNoneMatch="*")
    path = _local_path(uri)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return None
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return "local"


def put_if_match(uri: str, data: bytes, tag: str) -> str | None:
    """Overwrite an S3 object only if its ETag is still ``tag`` (``If-Match``); the new ETag, or None when
    someone else wrote or deleted it meanwhile. Local files: a plain atomic write (callers check content)."""
    if is_s3(uri):
        return _s3_conditional_put(uri, data, IfMatch=tag)
    write_bytes_atomic(uri, data)
    return "local"


def _s3_conditional_put(uri: str, data: bytes, **condition: str) -> str | None:
    from botocore.exceptions import BotoCoreError, ClientError

    settings = S3Settings.from_env()
    bucket, key = split_s3(uri)
    client = _boto3_client(settings)
    try:
        with slow_notice(uri, "conditional write"):
            answer = client.put_object(Bucket=bucket, Key=key, Body=data, **condition)
    except ClientError as exc:
        code = _error_code(exc)
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
            # botocore retries a PUT whose answer was lost (a timeout, a dropped connection): when the first
            # attempt landed, the retry finds its own write and fails the condition. Our bytes there mean
            # it was ours (callers write unique contents: pid and time, a run id).
            return _own_write(client, uri, data)
        if code in ("NoSuchKey", "404"):
            return None
        raise StorageError(f"S3 error {code} from {settings.endpoint_label} writing {uri}") from None
    except BotoCoreError as exc:
        raise StorageError(transient_message(uri, "conditional write", exc)) from None
    return str(answer.get("ETag", ""))


def _own_write(client: Any, uri: str, data: bytes) -> str | None:
    """The ETag of ``uri`` when it holds exactly ``data``, else None (someone else's, or gone)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3(uri)
    try:
        found = client.get_object(Bucket=bucket, Key=key)
        body = found["Body"].read()
    except ClientError:
        return None
    except BotoCoreError as exc:
        raise StorageError(transient_message(uri, "conditional write check", exc)) from None
    return str(found.get("ETag", "")) if body == data else None


def open_input_stream(uri: str) -> pa.NativeFile:
    """A readable stream; reads retry like every request, a read error after that is an OSError."""
    fs, path = resolve(uri)
    with s3_errors(uri, "open"):
        return fs.open_input_stream(path, compression=None)


def open_output_stream(uri: str) -> pa.NativeFile:
    """A writable stream (parent folders created locally). Not atomic: use write_bytes_atomic for that."""
    fs, path = resolve(uri)
    if not is_s3(uri):
        fs.create_dir(os.path.dirname(path), recursive=True)
    return fs.open_output_stream(path, compression=None)


# ---------------------------------------------------------------------------- preflight


def check_writable(uri: str) -> None:
    """Fail now, with a precise message, if ``uri`` cannot be written (see preflight())."""
    preflight(uri, write=True)


def preflight(uri: str, *, write: bool = True) -> None:
    """Check at start-up that ``uri`` is usable; raise StorageError naming the problem.

    Local: the folder exists or can be created (a file in its place is refused), and (``write``) a file
    can be created in it.
    S3: the endpoint answers, the credentials are accepted, the bucket exists, the prefix can be listed
    and (``write``) a tiny object can be put and deleted.
    """
    if is_s3(uri):
        _preflight_s3(uri, write=write)
    else:
        _preflight_local(uri, write=write)


@contextlib.contextmanager
def output_folder(uri: str) -> Iterator[None]:
    """A job's output: checked writable (`preflight`) on entry; if the job then fails, the local folders
    that made (the output and any parents) are removed again when nothing was written into them, so fixing
    the mistake and running again meets no stray empty folder. A folder that existed before, or holds a
    file, stays. On S3 there is nothing to remove: a prefix exists only through its objects."""
    if is_s3(uri):
        preflight(uri, write=True)
        yield
        return
    created = os.path.abspath(_local_path(uri))
    while not os.path.exists(os.path.dirname(created)):  # the topmost folder preflight will create
        created = os.path.dirname(created)
    fresh = not os.path.exists(created)
    try:
        preflight(uri, write=True)
        yield
    except BaseException:
        if fresh and os.path.isdir(created):
            for folder, _, _ in sorted(os.walk(created), key=lambda entry: -len(entry[0])):  # deepest first
                with contextlib.suppress(OSError):  # not empty: it stays
                    os.rmdir(folder)
        raise


def _preflight_local(uri: str, *, write: bool) -> None:
    path = _local_path(uri)
    if os.path.exists(path) and not os.path.isdir(path):  # e.g. one image given for the folder of inputs
        needed = "a folder to write into" if write else "the folder that holds the inputs"
        raise StorageError(f"local path {path} is a file, not a folder: give {needed}")
    try:
        if write:
            os.makedirs(path, exist_ok=True)
            probe = os.path.join(path, f"{_TMP_PREFIX}preflight.{uuid.uuid4().hex[:12]}")
            with open(probe, "wb"):
                pass
            os.unlink(probe)
        elif not os.path.isdir(path):
            raise StorageError(f"local folder {path} does not exist")
    except OSError as exc:
        raise StorageError(f"local folder {path} is not usable: {exc.strerror or exc}") from None


_BOTO3_SESSION: Any = None
_BOTO3_LOCK = threading.Lock()


def _boto3_client(settings: S3Settings, max_attempts: int | None = None) -> Any:
    """A boto3 client from one shared session (a new session re-reads the service model: ~0.15 s)."""
    global _BOTO3_SESSION
    import boto3
    from botocore.config import Config

    with _BOTO3_LOCK:  # boto3 sessions are not thread-safe; the clients they make are
        if _BOTO3_SESSION is None:
            _BOTO3_SESSION = boto3.session.Session()
        return _BOTO3_SESSION.client(
            "s3",
            endpoint_url=settings.endpoint_url,
            region_name=settings.region,
            aws_access_key_id=settings.access_key,
            aws_secret_access_key=settings.secret_key,
            aws_session_token=settings.session_token,
            config=Config(
                retries={"max_attempts": max_attempts or settings.max_attempts, "mode": "standard"},
                connect_timeout=settings.connect_timeout,
                read_timeout=settings.request_timeout,
                s3={"addressing_style": "path"} if settings.endpoint_url else {},
            ),
        )


def _preflight_s3(uri: str, *, write: bool) -> None:
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    settings = S3Settings.from_env()
    bucket, key = split_s3(uri)
    # A few attempts only: preflight exists to name a wrong endpoint at once, not to wait out an outage.
    client = _boto3_client(settings, max_attempts=min(settings.max_attempts, 3))
    where = settings.endpoint_label
    step = "connecting"
    try:
        step = f"checking bucket '{bucket}'"
        try:
            client.head_bucket(Bucket=bucket)
        except ClientError as exc:
            if _error_code(exc) not in {"403", "Forbidden"}:
                raise
            # HEAD answers carry no error code; a GET says whether the key or the signature is wrong.
            step = f"listing s3://{bucket}"
            client.list_objects_v2(Bucket=bucket, MaxKeys=1)
        step = f"listing {uri}"
        client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
        if write:
            probe = join(key, f".preflight-{uuid.uuid4().hex[:12]}").lstrip("/")
            step = f"writing s3://{bucket}/{probe}"
            client.put_object(Bucket=bucket, Key=probe, Body=b"")
            step = f"deleting s3://{bucket}/{probe}"
            client.delete_object(Bucket=bucket, Key=probe)
    except ClientError as exc:
        code = _error_code(exc)
        if code in _MISSING_BUCKET_CODES:
            hint = f"aws s3 mb s3://{bucket}" + (f" --endpoint-url {where}" if settings.endpoint_url else "")
            raise StorageError(
                f"bucket '{bucket}' does not exist at {where}; create it with: {hint}"
            ) from None
        if code in _CREDENTIAL_CODES:
            raise StorageError(
                f"credentials rejected by {where}: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                f"({code} while {step}; {settings.key_label})"
            ) from None
        message = exc.response.get("Error", {}).get("Message", "")
        raise StorageError(f"S3 error {code} from {where} while {step}: {message}") from None
    except NoCredentialsError:
        raise StorageError(
            f"no S3 credentials found for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        ) from None
    except BotoCoreError as exc:  # connection refused, DNS failure, timeouts, bad endpoint URL
        source = (
            "AWS_ENDPOINT_URL" if settings.endpoint_url else "the default AWS endpoint; set AWS_ENDPOINT_URL?"
        )
        raise StorageError(
            f"cannot reach S3 endpoint {where} (from {source}) while {step}: {_reason(exc)}"
        ) from None


def _error_code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", "")) or str(
        exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
    )


def _reason(exc: BaseException) -> str:
    """A short cause such as 'connection refused', found along the exception chain."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused"
        if isinstance(seen, TimeoutError):
            return "timed out"
        seen = seen.__cause__ or seen.__context__
    return f"{type(exc).__name__}: {exc}"
