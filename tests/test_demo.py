"""The README's demo: the whole pipeline on photos shipped by dependencies, locally and against S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
from mlflow import MlflowClient

from pipelines.demo import MODEL_NAME, DemoConfig, run_demo
from pipelines.manifest import read_manifest, verify_shards

pytestmark = pytest.mark.slow


@pytest.mark.usefixtures("ray_session")
def test_demo_runs_the_whole_pipeline_locally(tmp_path: Path) -> None:
    result = run_demo(DemoConfig(output_dir=str(tmp_path / "demo"), crops=20, epochs=2))
    manifest = read_manifest(result["dataset"])
    assert manifest.builder == "canny"
    assert verify_shards(result["dataset"], manifest) == []
    report = json.loads((Path(result["translated"]) / "translate_report.json").read_text())
    assert report["translated"] == manifest.splits["test"].samples > 0
    sheet = cv2.imread(result["sheet"])  # input | output | target, one row per test sample
    assert sheet is not None and sheet.shape[1] == 3 * 128
    assert sheet.shape[0] > manifest.splits["test"].samples * 128
    client = MlflowClient(result["tracking_uri"])
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert str(champion.version) == result["version"] == result["champion"]
    # Translated with the champion, by number (another demo in the folder could have left another one).
    assert report["model_version_uri"] == f"models:/{MODEL_NAME}/{result['champion']}"
    assert client.get_model_version(MODEL_NAME, result["version"]).tags["promotion.decision"] == "promoted"


def test_demo_against_local_s3_as_a_user_runs_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    command = [
        str(Path(sys.executable).parent / "p2p"),
        "demo",
        "--s3",
        "--crops",
        "16",
        "--epochs",
        "1",
        "--output-dir",
        str(tmp_path / "demo"),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "local S3 (SeaweedFS)" in result.stdout and "[demo] done in" in result.stdout
    assert "s3://p2p-demo/" in result.stdout  # dataset and outputs went to the bucket
    assert "mlflow ui --backend-store-uri sqlite:///" in result.stdout
    # Ray's notes about its own defaults (token auth on, Ray Data's bars off, as the jobs set them) are not
    # printed on every command.
    assert "Token authentication is enabled" not in result.stderr
    assert "Progress bars disabled" not in result.stderr
