"""Shared test fixtures. Servers and Ray sessions cost seconds on 2 cores: share them per module."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# ../shared sits beside the checkout in CI and on developer machines; it is never copied into the repo.
SHARED = Path(os.environ.get("P2P_SHARED_DIR", REPO_ROOT.parent / "shared"))
CAMVID = SHARED / "data" / "camvid"
HED_WEIGHTS = SHARED / "weights" / "hed" / "hed_bsds500.weights.h5"


@pytest.fixture(scope="session")
def camvid_dir() -> Path:
    if not (CAMVID / "classes.json").exists():
        pytest.fail(
            f"CamVid sample not found at {CAMVID}: put ../shared beside the checkout or set P2P_SHARED_DIR"
        )
    return CAMVID


S3_TEST_BUCKET = "p2p-test"
# Variables that would override or confuse the local server's settings for the session.
_AWS_OVERRIDES = ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SHARED_CREDENTIALS_FILE")


@pytest.fixture(scope="session")
def s3_server():
    """One local SeaweedFS S3 server for the whole session, with AWS_* pointing at it (restored after).

    The bucket ``S3_TEST_BUCKET`` exists (``s3_server.buckets[0]``); give each test its own prefix.
    """
    from devtools.local_s3 import LocalS3Server

    with LocalS3Server(buckets=[S3_TEST_BUCKET]) as server, pytest.MonkeyPatch.context() as mp:
        for name in _AWS_OVERRIDES:
            mp.delenv(name, raising=False)
        for name, value in server.env().items():
            mp.setenv(name, value)
        yield server


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray cluster for the whole test session (each start costs ~20 s on 2 cores).

    It starts after the S3 server so that Ray's workers inherit the AWS_* settings, as on a real
    cluster where nodes have their own credentials: nothing passes secrets through runtime_env.

    A fresh temp dir keeps a stale `ray_current_cluster` file of an earlier run from breaking init.
    """
    import tempfile

    import ray

    temp_dir = tempfile.mkdtemp(prefix="ray_p2p_", dir="/tmp")
    # Test traffic stays on loopback: without this Ray swaps 127.0.0.1 for the machine's outward address.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray.init(
        address="local",
        _node_ip_address="127.0.0.1",
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=temp_dir,
        log_to_driver=True,
        configure_logging=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()
