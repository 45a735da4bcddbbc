"""Transient storage faults are not bad data: the real S3 server (SeaweedFS) is stopped by PID for a few
seconds, then restarted on the same port and data, while a real Ray job runs: a dataset build, a training
run with its dataset and checkpoints on S3, a translation of an S3 prefix of images. Nothing may be
quarantined for I/O: each job either rides the outage out on the SDK retries or fails (no manifest, no
report; a training run resumable from its newest checkpoint), and the re-run completes with every sample."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import struct
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import train_helpers
from mlflow import MlflowClient
from train_helpers import camvid_source, job

from pipelines import storage
from pipelines.config import from_dict
from pipelines.dataset import build
from pipelines.dataset.build import DatasetBuildConfig, run_build
from pipelines.inference import translate
from pipelines.inference.translate import REPORT_NAME, TranslateConfig, run_translate
from pipelines.manifest import Manifest, verify_shards
from pipelines.training.train import resumed_run, run_training
from pix2pix import load_checkpoint

SAMPLES = 12
OUTAGE_S = 4.0  # seconds the server is down, its restart not included


def upload_photos(client: Any, bucket: str, prefix: str, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        photo = cv2.GaussianBlur(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8), (5, 5), 0)
        client.put_object(
            Bucket=bucket, Key=f"{prefix}/p{i:02d}.png", Body=cv2.imencode(".png", photo)[1].tobytes()
        )


def start_outage(
    s3_server: Any, outage: dict[str, Any], seconds: float = OUTAGE_S, until_attempted: bool = False
) -> None:
    """Stop the S3 server by PID now and restart it on the same port and data after ``seconds``, from a
    thread. Fills ``outage`` with "stopped" (a monotonic time), "thread" (the restarter), "attempts" and,
    once the server serves again, "back". Join the thread before the test ends, whatever happens, so that
    later tests find the server up.

    ``until_attempted``: while the server is down its port answers every connection with a reset (a
    network fault, as from a crashed server behind a load balancer) and counts them in "attempts"; the
    server comes back only once a client has tried at least once (at most 60 s), so the outage certainly
    overlaps the job's I/O however long the job takes to start."""
    port = int(s3_server.endpoint_url.rsplit(":", 1)[1])
    s3_server.interrupt()
    outage.update(stopped=time.monotonic(), attempts=0)
    listener: socket.socket | None = None
    if until_attempted:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(16)
        listener.settimeout(0.1)

    def restart() -> None:
        back_at, give_up = outage["stopped"] + seconds, outage["stopped"] + 60
        while (now := time.monotonic()) < back_at or (listener and not outage["attempts"] and now < give_up):
            if listener is None:
                time.sleep(back_at - now)
                continue
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
            conn.close()
            outage["attempts"] += 1
        if listener is not None:
            listener.close()
        s3_server.start()
        outage["back"] = time.monotonic()

    outage["thread"] = threading.Thread(target=restart, daemon=True)
    outage["thread"].start()


@pytest.mark.usefixtures("ray_session")
def test_s3_outage_during_a_build_is_retried_never_quarantined(
    s3_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = s3_server.buckets[0]
    prefix = f"faults-{uuid.uuid4().hex[:8]}"
    upload_photos(s3_server.client(), bucket, f"{prefix}/raw", SAMPLES)
    output = f"s3://{bucket}/{prefix}/ds"
    cfg = from_dict(
        DatasetBuildConfig,
        {
            "source": {"uri": f"s3://{bucket}/{prefix}/raw", "layout": "photos"},
            "output": output,
            "derive": {"builder": "grayscale"},
            "resize": {"size": 32},
            "split": {"train": 1.0, "val": 0.0, "test": 0.0},
            "shards": {"samples_per_shard": 2},
        },
    )
    # The outage starts once the plan is made, as the shard tasks start reading and writing, and lasts 4 s
    # plus the server's restart on the same port and data.
    outage: dict[str, Any] = {}
    real_init_ray = build.init_ray

    def init_ray_then_outage() -> None:
        real_init_ray()
        start_outage(s3_server, outage)

    monkeypatch.setattr(build, "init_ray", init_ray_then_outage)
    try:
        manifest: Manifest | None = run_build(cfg)
    except storage.StorageError as exc:  # retries exhausted: a clear failure naming endpoint and key
        message = str(exc)
        assert "no manifest was written" in message and s3_server.endpoint_url in message, message
        assert f"s3://{bucket}/{prefix}/" in message, message
        manifest = None
    finally:
        if "thread" in outage:
            outage["thread"].join()
    assert outage["back"] - outage["stopped"] >= 4
    if manifest is not None:
        assert manifest.totals.samples_written == SAMPLES and manifest.quarantine == ()
    else:
        assert not storage.exists(storage.join(output, "manifest.json"))

    monkeypatch.setattr(build, "init_ray", real_init_ray)
    again = run_build(cfg)
    assert again.totals.samples_written == SAMPLES and again.quarantine == ()
    assert verify_shards(output, again) == []


@pytest.mark.usefixtures("ray_session")
def test_an_outage_after_the_manifest_is_written_does_not_fail_the_build(
    s3_server: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Once the manifest is written the build has happened: a storage failure while cleaning up after it
    is said, and the command succeeds (it printed an error while the dataset had been replaced)."""
    bucket = s3_server.buckets[0]
    prefix = f"faults-{uuid.uuid4().hex[:8]}"
    upload_photos(s3_server.client(), bucket, f"{prefix}/raw", 4)
    cfg = from_dict(
        DatasetBuildConfig,
        {
            "source": {"uri": f"s3://{bucket}/{prefix}/raw", "layout": "photos"},
            "output": f"s3://{bucket}/{prefix}/ds",
            "derive": {"builder": "grayscale"},
            "resize": {"size": 32},
            "split": {"train": 1.0, "val": 0.0, "test": 0.0},
        },
    )
    outage: dict[str, Any] = {}
    real_clean_up = build.clean_up

    def outage_then_clean_up(*args: Any, **kwargs: Any) -> None:
        start_outage(s3_server, outage, seconds=3)
        real_clean_up(*args, **kwargs)

    monkeypatch.setattr(build, "clean_up", outage_then_clean_up)
    monkeypatch.setenv("P2P_S3_MAX_ATTEMPTS", "1")  # fail at once rather than ride the outage out
    try:
        manifest = run_build(cfg)
    finally:
        if "thread" in outage:
            outage["thread"].join()
    printed = capsys.readouterr()
    assert f"dataset {manifest.build_id} is written; cleaning up after it failed" in printed.out
    assert "could not release the lock" in printed.err  # the same outage: left for the next build
    assert Manifest.read(cfg.output) == manifest and verify_shards(cfg.output, manifest) == []


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_s3_outage_during_training_resumes_from_the_newest_checkpoint(
    s3_server: Any, camvid_dir: Path, tmp_path: Path
) -> None:
    """Dataset and checkpoints on S3; the server goes down for 4 s as soon as the first checkpoint is on
    it, while the workers stream shards and save checkpoints. Either training rides the outage out on the
    retries, or it fails and `--resume` continues from the newest complete checkpoint (never step 0).
    Either way the run ends at the planned step with every loss step logged exactly once."""
    prefix = f"s3://{s3_server.buckets[0]}/faults-{uuid.uuid4().hex[:8]}"
    source = camvid_source(camvid_dir, tmp_path / "src", 8, 2)
    manifest = train_helpers.build(camvid_dir, source, f"{prefix}/dataset", samples_per_shard=4)
    runs = f"{prefix}/runs"
    cfg = job(
        manifest,
        tmp_path,
        run_name="outage",
        storage=runs,
        checkpoint_every=2,
        model__n_epochs=1,
        model__n_epochs_decay=1,
        mlflow__log_every=1,
    )
    final_step = 8  # 8 samples / global batch 2 = 4 steps per epoch, × 2 epochs

    outage: dict[str, Any] = {}
    watching = threading.Event()
    watching.set()

    def outage_after_first_checkpoint() -> None:
        while watching.is_set():
            with contextlib.suppress(storage.StorageError):
                if any(u.endswith("/checkpoint.pt") for u in storage.list_files(f"{runs}/outage")):
                    start_outage(s3_server, outage)
                    return
            time.sleep(0.1)

    watcher = threading.Thread(target=outage_after_first_checkpoint, daemon=True)
    watcher.start()
    failure: BaseException | None = None
    began = time.monotonic()
    try:
        try:
            outcome = run_training(cfg)
        except Exception as exc:  # the outage outlasted some retry: the run is FAILED, resumable
            failure = exc
        ended = time.monotonic()
    finally:
        watching.clear()
        watcher.join()
        if "thread" in outage:
            outage["thread"].join()
    assert "stopped" in outage and outage["stopped"] < ended, "the outage did not happen during training"
    assert outage["back"] - outage["stopped"] >= OUTAGE_S
    client = MlflowClient(cfg.mlflow.tracking_uri)
    if failure is not None:
        print(f"training failed during the outage: {type(failure).__name__}: {failure}"[:500])
        resumed, run_id = resumed_run("outage", runs, {})
        outcome = run_training(resumed, resume=run_id)
        assert outcome["mlflow_run_id"] == run_id
    else:
        print("training rode the outage out")
    print(
        f"outage {outage['back'] - outage['stopped']:.1f} s from {outage['stopped'] - began:.1f} s into "
        f"a run of {ended - began:.1f} s"
    )

    state = load_checkpoint(storage.read_bytes(f"{outcome['checkpoint']}/checkpoint.pt"))
    assert state["step"] == final_step and state["epoch"] == 2
    run_id = outcome["mlflow_run_id"]
    experiment = client.get_experiment_by_name("pix2pix").experiment_id
    runs_found = client.search_runs([experiment])
    assert [r.info.run_id for r in runs_found] == [run_id] and runs_found[0].info.status == "FINISHED"
    resumed_at = [m.value for m in client.get_metric_history(run_id, "resumed_at_step")]
    assert all(value > 0 for value in resumed_at), resumed_at  # checkpoints existed: never step 0
    if failure is not None:
        assert resumed_at, "the resumed run did not start from a checkpoint"
    for key in client.get_run(run_id).data.metrics:
        if key == "resumed_at_step":  # one value per restart: two restarts may share a checkpoint
            continue
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), (key, sorted(steps))
    losses = sorted(m.step for m in client.get_metric_history(run_id, "loss_g_rec"))
    assert losses == list(range(1, final_step + 1))  # every step once, ending where it was planned to


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_s3_outage_during_translate_of_a_prefix_is_retried_never_quarantined(
    s3_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`p2p translate` of an S3 prefix of images (not a dataset split) into an S3 prefix; the server goes
    down once the inputs are listed and stays down until the actors have tried to reach it. The I/O errors
    are retried or fail the job with no report; they never become quarantine records. A corrupt image among
    the inputs is quarantined either way, and the re-run translates every good image."""
    from pipelines.preprocessing import Preprocessing
    from pix2pix import Pix2PixConfig, TrainingStep, save_checkpoint

    bucket = s3_server.buckets[0]
    prefix = f"faults-{uuid.uuid4().hex[:8]}"
    client = s3_server.client()
    upload_photos(client, bucket, f"{prefix}/in", 6)
    corrupt = f"s3://{bucket}/{prefix}/in/corrupt.png"
    photo = np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    cut = cv2.imencode(".png", photo)[1].tobytes()[:3000]  # a real PNG cut short
    client.put_object(Bucket=bucket, Key=corrupt.split("/", 3)[3], Body=cut)
    checkpoint = tmp_path / "checkpoint.pt"
    prep = Preprocessing(3, 3, "AtoB", 32, 32, "resize_and_crop", False)
    step = TrainingStep(Pix2PixConfig(netG="unet", unet_downs=5, ngf=8, ndf=8))
    save_checkpoint(checkpoint, step, extra={"preprocessing": prep.to_dict()})
    output = f"s3://{bucket}/{prefix}/out"

    def config() -> TranslateConfig:
        source = f"s3://{bucket}/{prefix}/in"
        return TranslateConfig(str(checkpoint), source, output, tracking_uri=f"sqlite:///{tmp_path}/m.db")

    def check(report: dict[str, Any]) -> None:
        assert (report["seen"], report["translated"], report["quarantined"]) == (7, 6, 1), report
        (record,) = report["quarantine"]  # the corrupt file, for what it is, and nothing for I/O
        assert record["paths"] == [corrupt] and "truncated or corrupt image" in record["reason"], record
        written = sorted(u.rsplit("/", 1)[1] for u in storage.list_files(output, ".png"))
        assert written == [f"p{i:02d}.png" for i in range(6)]

    outage: dict[str, Any] = {}
    real_cluster_gpus = translate.cluster_gpus

    def cluster_gpus_then_outage() -> int:  # called once the inputs are listed, before any actor reads
        gpus = real_cluster_gpus()
        start_outage(s3_server, outage, until_attempted=True)
        return gpus

    monkeypatch.setattr(translate, "cluster_gpus", cluster_gpus_then_outage)
    try:
        report: dict[str, Any] | None = run_translate(config())
    except storage.StorageError as exc:  # retries exhausted: the job fails, naming the endpoint
        message = str(exc)
        assert "no report written" in message and s3_server.endpoint_url in message, message
        report = None
    finally:
        if "thread" in outage:
            outage["thread"].join()
    assert outage["attempts"] >= 1, "no S3 request was attempted during the outage"
    print(
        f"translate: {outage['attempts']} connection(s) reset during the outage, report {report is not None}"
    )
    if report is not None:
        check(report)
        assert json.loads(storage.read_bytes(storage.join(output, REPORT_NAME))) == report
    else:
        assert not storage.exists(storage.join(output, REPORT_NAME))

    monkeypatch.setattr(translate, "cluster_gpus", real_cluster_gpus)
    check(run_translate(config()))


def dead_endpoint(monkeypatch: pytest.MonkeyPatch) -> str:
    """Point the S3 settings at a port nothing listens on, with 2 attempts per request; the endpoint."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("P2P_S3_MAX_ATTEMPTS", "2")
    return endpoint


def test_an_io_error_fails_the_shard_task_instead_of_quarantining(monkeypatch: pytest.MonkeyPatch) -> None:
    """An endpoint that stays down: the retries run out and the shard task raises a StorageError naming
    endpoint, key and attempts; nothing becomes a quarantine record."""
    endpoint = dead_endpoint(monkeypatch)
    cfg = from_dict(
        DatasetBuildConfig,
        {
            "source": {"uri": "s3://gone/raw", "layout": "photos"},
            "output": "/unused",
            "derive": {"builder": "grayscale"},
        },
    )
    builder = build.ShardBuilder(dataclasses.asdict(cfg), "/unused/shards/x")
    plan = {
        "split": "train",
        "index": 0,
        "samples": [{"key": "p0", "split": "train", "a": "", "b": "s3://gone/raw/p0.png"}],
    }
    with pytest.raises(storage.StorageError) as err:
        builder.build_shard(plan)
    message = str(err.value)
    assert endpoint in message and "s3://gone/raw/p0.png" in message and "after 2 attempts" in message, (
        message
    )


def test_translate_fails_on_an_io_error_instead_of_quarantining(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An endpoint that stays down: reading an input image runs out of retries and raises a StorageError
    naming endpoint, key and attempts (the job fails with no report); it never becomes a quarantine record."""
    from pipelines.preprocessing import Preprocessing
    from pix2pix import Pix2PixConfig, TrainingStep, save_checkpoint

    endpoint = dead_endpoint(monkeypatch)
    checkpoint = tmp_path / "checkpoint.pt"
    prep = Preprocessing(3, 3, "AtoB", 32, 32, "resize_and_crop", False)
    save_checkpoint(
        checkpoint,
        TrainingStep(Pix2PixConfig(netG="unet", unet_downs=5, ngf=8, ndf=8)),
        extra={"preprocessing": prep.to_dict()},
    )
    cfg = TranslateConfig(str(checkpoint), "s3://gone/in", str(tmp_path / "out"), tracking_uri="unused")
    translator = translate.Translator(dataclasses.asdict(cfg))
    item = {"kind": "file", "uri": "s3://gone/in/p0.png", "key": "p0"}
    with pytest.raises(storage.StorageError) as err:
        translator({"item": [json.dumps(item)]})
    message = str(err.value)
    assert endpoint in message and item["uri"] in message and "after 2 attempts" in message, message


def test_an_s3_filesystem_sent_to_ray_carries_no_secret_and_keeps_its_retries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ray pickles a Train run's storage filesystem into its controller and workers. pyarrow's own pickle
    drops the retry strategy (the controller then failed a checkpoint upload at once when S3 blinked) and
    carries the secret key; ours unpickles as the receiving process's client, from its own environment."""
    import ray.cloudpickle

    dead_endpoint(monkeypatch)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "pickled-secret-998877")
    filesystem, _ = storage.resolve("s3://bucket/runs")
    data = ray.cloudpickle.dumps(filesystem)
    assert b"pickled-secret-998877" not in data
    assert ray.cloudpickle.loads(data) is filesystem  # the client built here: same settings, retries included


def test_retry_settings_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("P2P_S3_MAX_ATTEMPTS", "0")
    with pytest.raises(storage.StorageError, match="P2P_S3_MAX_ATTEMPTS must be an integer >= 1"):
        storage.S3Settings.from_env()
    monkeypatch.setenv("P2P_S3_MAX_ATTEMPTS", "5")
    monkeypatch.setenv("P2P_S3_REQUEST_TIMEOUT", "7")
    settings = storage.S3Settings.from_env()
    assert (settings.max_attempts, settings.request_timeout, settings.connect_timeout) == (5, 7, 5)
