"""The FCN-score on real CamVid: `p2p segmenter train` on Ray Train, registered next to the generators, found
by `evaluate` and `promote`, and telling real photos from noise. Small on purpose (64 px, tens of images)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow import MlflowClient
from train_helpers import build, camvid_source

from pipelines.config import from_dict
from pipelines.preprocessing import Preprocessing
from pipelines.quality.train_segmenter import SegmenterTrainConfig, run_segmenter_training
from pipelines.registry.models import LoadedModel, log_generator
from pipelines.registry.promote import PromoteConfig, promote
from pipelines.registry.scoring import resolve_quality, score_split
from pipelines.registry.tracking import experiment_id
from pix2pix import Pix2PixConfig, build_generator

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]
PREPROCESSING = {
    "input_nc": 3,
    "output_nc": 3,
    "direction": "AtoB",
    "load_size": 72,
    "crop_size": 64,
    "preprocess": "resize_and_crop",
    "input_is_label_map": True,
    "builder": "labels",
}


@pytest.fixture(scope="module")
def trained(camvid_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fcn")
    source = camvid_source(camvid_dir, root / "src", 48, 12)
    manifest = build(camvid_dir, source, str(root / "camvid"), samples_per_shard=12)
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = from_dict(
        SegmenterTrainConfig,
        {
            "data": {"manifest": manifest, "load_size": 72, "crop_size": 64, "num_workers": 1},
            "width": 16,
            "depth": 3,
            "epochs": 15,
            "lr": 3e-3,
            "workers": 2,
            "cpus_per_worker": 0.5,
            "global_batch_size": 4,
            "storage": str(root / "segmenter"),
            "tracking_uri": tracking_uri,
        },
    )
    result = run_segmenter_training(cfg)
    return {"root": root, "manifest": manifest, "tracking_uri": tracking_uri, "result": result}


def test_the_segmenter_scores_real_photos_far_above_noise(trained: dict[str, Any]) -> None:
    result = trained["result"]
    assert result["registered_name"] == "camvid-segmenter" and result["registered_version"] == "1"
    # Epochs of well under a second report to Ray Train only at the checkpoint floor, yet every epoch's
    # validation is in MLflow, and the last report carries the last epoch's scores.
    history = MlflowClient(trained["tracking_uri"]).get_metric_history(result["mlflow_run_id"], "val_iou")
    assert sorted(m.step for m in history) == list(range(1, 16))
    assert result["metrics"]["epoch"] == 15
    quality = resolve_quality(trained["manifest"], trained["tracking_uri"], sheet=0)
    assert quality.segmenter is not None and quality.segmenter.class_map.classes == 11

    def noise(inputs: torch.Tensor) -> torch.Tensor:
        return torch.rand(inputs.shape[0], 3, *inputs.shape[2:]) * 2 - 1

    torch.manual_seed(0)
    model = LoadedModel(noise, Preprocessing.from_dict(PREPROCESSING), "noise")
    metrics = score_split(model, trained["manifest"], "val", quality=quality).metrics
    print(
        f"segmenter val (training) {result['metrics']}; real photos: pixel "
        f"{metrics['fcn_real_pixel_acc']:.3f} class {metrics['fcn_real_class_acc']:.3f} IoU "
        f"{metrics['fcn_real_iou']:.3f}; noise: pixel {metrics['fcn_pixel_acc']:.3f} class "
        f"{metrics['fcn_class_acc']:.3f} IoU {metrics['fcn_iou']:.3f}"
    )
    assert metrics["fcn_real_iou"] == pytest.approx(result["metrics"]["val_iou"], abs=1e-6)
    # Measured: real photos pixel 0.555 / class 0.296 / IoU 0.206, noise 0.299 / 0.092 / 0.035 (11 classes).
    assert metrics["fcn_real_iou"] > 0.12 and metrics["fcn_real_pixel_acc"] > 0.45
    assert metrics["fcn_iou"] < 0.4 * metrics["fcn_real_iou"]
    assert metrics["fcn_class_acc"] < 0.6 * metrics["fcn_real_class_acc"]


def test_promotion_decides_on_fcn_iou_and_evaluation_logs_a_sheet(trained: dict[str, Any]) -> None:
    uri, manifest = trained["tracking_uri"], trained["manifest"]
    client = MlflowClient(uri)
    torch.manual_seed(1)
    config = Pix2PixConfig(netG="unet", unet_downs=6, ngf=16, ndf=16)
    # Artifacts beside the database, as p2p places them (MLflow's default is ./mlruns in the cwd).
    run_id = client.create_run(experiment_id(client, "fcn-generators", uri)).info.run_id
    recorded = Preprocessing.from_dict({**PREPROCESSING, "manifest": manifest})
    log_generator(build_generator(config).eval(), config, recorded, run_id, uri, "camvid-l2p")
    decision = promote(PromoteConfig("camvid-l2p", "1", "", "val", tracking_uri=uri, sheet_samples=4))
    assert decision["metric"] == "fcn_iou" and decision["promoted"]
    assert {"fcn_iou", "fcn_real_iou", "fcn_pixel_acc", "l1"} <= set(decision["candidate_metrics"])
    tags = client.get_model_version("camvid-l2p", "1").tags
    assert tags["promotion.metric"] == "fcn_iou" and "fcn_real_iou" in tags["promotion.candidate_metrics"]
    evaluation = client.get_run(decision["candidate_eval_run_id"])
    assert "sheets/eval-val.png" in [a.path for a in client.list_artifacts(evaluation.info.run_id, "sheets")]
    assert evaluation.data.tags["p2p.segmenter"].startswith("models:/camvid-segmenter/")


def test_a_segmenter_run_name_is_not_reused(trained: dict[str, Any]) -> None:
    """Ray Train would resume the finished run under that name and register its network again."""
    run_name = MlflowClient(trained["tracking_uri"]).get_run(trained["result"]["mlflow_run_id"]).info.run_name
    again = from_dict(
        SegmenterTrainConfig,
        {
            "data": {"manifest": trained["manifest"]},
            "storage": str(trained["root"] / "segmenter"),
            "run_name": run_name,
            "tracking_uri": trained["tracking_uri"],
        },
    )
    with pytest.raises(FileExistsError, match=f"segmenter run '{run_name}' already exists"):
        run_segmenter_training(again)


def test_a_segmenter_larger_than_the_machine_is_refused_before_its_run_exists(
    trained: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray Train would wait for the third CPU without end, with an MLflow run left RUNNING."""
    from pipelines.config import ConfigError

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    big = from_dict(
        SegmenterTrainConfig,
        {
            "data": {"manifest": trained["manifest"]},
            "storage": str(tmp_path / "segmenter"),
            "tracking_uri": uri,
            "workers": 3,
            "global_batch_size": 3,
        },
    )
    with pytest.raises(ConfigError, match=r"3 workers need 3 CPUs and the cluster has 2"):
        run_segmenter_training(big)
    client = MlflowClient(uri)
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_auto_finds_only_a_segmenter_of_this_very_dataset(trained: dict[str, Any]) -> None:
    """Another dataset in a folder of the same name shares the registered name, not the segmenter: one
    trained on other photos may have seen this dataset's validation images."""
    from pipelines.manifest import read_manifest
    from pipelines.quality.segmenter import DATASET_TAG, find_segmenter

    uri, manifest = trained["tracking_uri"], trained["manifest"]
    version = MlflowClient(uri).get_model_version("camvid-segmenter", "1")
    assert version.tags[DATASET_TAG] == str(trained["root"] / "camvid")
    palette = read_manifest(manifest).palette
    same = f"{manifest}/manifest.json"  # this dataset, written another way
    found, why = find_segmenter("auto", same, palette, uri)
    assert found is not None and found.version == "1" and why == ""
    other = str(trained["root"] / "elsewhere" / "camvid")
    found, why = find_segmenter("auto", other, palette, uri)
    assert found is None and f"was trained on {trained['root'] / 'camvid'}, not {other}" in why
    # The same folder rebuilt (another split salt could move its val photos into the segmenter's training
    # data): not that segmenter either. The rebuild's manifest, put back afterwards.
    original = read_manifest(manifest)
    dataclasses.replace(original, build_id="0123456789abcdef").write(manifest)
    try:
        found, why = find_segmenter("auto", manifest, palette, uri)
    finally:
        original.write(manifest)
    assert found is None and f"trained on dataset build {original.build_id}" in why, why
    assert "is now build 0123456789abcdef" in why
