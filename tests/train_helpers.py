"""Helpers shared by the training, promotion and translation tests: small real CamVid datasets and
small training configurations."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import psutil

from pipelines.config import from_dict
from pipelines.dataset.build import DatasetBuildConfig, run_build
from pipelines.training.train import TrainJobConfig


def camvid_source(camvid: Path, dest: Path, train: int, val: int) -> Path:
    for split, n in (("train", train), ("val", val)):
        keys = sorted(p.stem for p in (camvid / split / "images").glob("*.jpg"))[:n]
        for sub, ext in (("images", "jpg"), ("labels", "png")):
            (dest / split / sub).mkdir(parents=True, exist_ok=True)
            for key in keys:
                shutil.copy(camvid / split / sub / f"{key}.{ext}", dest / split / sub)
    return dest


def build(
    camvid: Path,
    source: Path,
    output: str,
    samples_per_shard: int = 8,
    resize: dict[str, Any] | None = None,
    keep_replaced_hours: float = 24.0,
) -> str:
    """A labels→photo dataset of `source`, stored at 72×72 unless `resize` says otherwise."""
    cfg = from_dict(
        DatasetBuildConfig,
        {
            "source": {"uri": str(source), "a_dir": "labels", "b_dir": "images"},
            "output": output,
            "derive": {"builder": "labels", "palette": str(camvid / "classes.json")},
            "resize": resize or {"size": 72},
            "shards": {"samples_per_shard": samples_per_shard},
            "keep_replaced_hours": keep_replaced_hours,
        },
    )
    run_build(cfg)
    return output


def job(manifest: str, tmp: Path, **overrides: Any) -> TrainJobConfig:
    return from_dict(TrainJobConfig, job_values(manifest, tmp, **overrides))


def job_values(manifest: str, tmp: Path, **overrides: Any) -> dict[str, Any]:
    """A small training config as `--config` YAML takes it; `section__name=value` overrides a nested field."""
    values: dict[str, Any] = {
        "data": {
            "manifest": manifest,
            "load_size": 72,
            "crop_size": 64,
            "num_workers": 1,
            "shuffle_buffer": 8,
        },
        "model": {
            "netG": "unet",
            "unet_downs": 6,
            "ngf": 16,
            "ndf": 16,
            "n_epochs": 1,
            "n_epochs_decay": 1,
            "lr": 5e-4,
        },
        "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "log_every": 2},
        "storage": str(tmp / "runs"),
        "workers": 2,
        "global_batch_size": 2,
        "cpus_per_worker": 0.5,  # leaves room for the driver's work on 2 cores
    }
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        if name:
            values.setdefault(section, {})[name] = value
        else:
            values[key] = value
    return values


def own_processes(marker: str) -> list[psutil.Process]:
    """Processes of this test session's Ray cluster (descendants of this process: ray.init started its
    raylet) whose command line holds `marker`; never another cluster's on the same machine."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if marker in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found
