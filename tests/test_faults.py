"""Transient storage faults are not bad data: the real S3 server (SeaweedFS) is stopped by PID for a few
seconds while a real Ray build runs. Nothing may be quarantined for I/O: either the build rides the outage
out on the SDK retries, or it fails with no manifest and the re-run completes with every sample."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from typing import Any

import cv2
import numpy as np
import pytest

from pipelines import storage
from pipelines.config import from_dict
from pipelines.dataset import build
from pipelines.dataset.build import DatasetBuildConfig, run_build
from pipelines.manifest import Manifest, verify_shards

SAMPLES = 12


def upload_photos(client: Any, bucket: str, prefix: str, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        photo = cv2.GaussianBlur(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8), (5, 5), 0)
        client.put_object(
            Bucket=bucket, Key=f"{prefix}/p{i:02d}.png", Body=cv2.imencode(".png", photo)[1].tobytes()
        )


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
        s3_server.interrupt()
        outage["stopped"] = time.monotonic()

        def restart() -> None:
            time.sleep(4)
            s3_server.start()
            outage["back"] = time.monotonic()

        outage["thread"] = threading.Thread(target=restart)
        outage["thread"].start()

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


def test_an_io_error_fails_the_shard_task_instead_of_quarantining(monkeypatch: pytest.MonkeyPatch) -> None:
    """An endpoint that stays down: the retries run out and the shard task raises a StorageError naming
    endpoint, key and attempts; nothing becomes a quarantine record."""
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("P2P_S3_MAX_ATTEMPTS", "2")
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


def test_retry_settings_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("P2P_S3_MAX_ATTEMPTS", "0")
    with pytest.raises(storage.StorageError, match="P2P_S3_MAX_ATTEMPTS must be an integer >= 1"):
        storage.S3Settings.from_env()
    monkeypatch.setenv("P2P_S3_MAX_ATTEMPTS", "5")
    monkeypatch.setenv("P2P_S3_REQUEST_TIMEOUT", "7")
    settings = storage.S3Settings.from_env()
    assert (settings.max_attempts, settings.request_timeout, settings.connect_timeout) == (5, 7, 5)
