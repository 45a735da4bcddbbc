"""Scoring a model on a dataset split, and recording the score as an MLflow evaluation run.

Shared by `p2p evaluate` and `p2p promote` (which scores candidate and champion the same way). The
model's recorded preprocessing is applied without random jitter and every sample of the split is read
once, so two models scored on the same manifest, split and seed are comparable.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from pipelines.manifest import Manifest, manifest_sha256
from pipelines.preprocessing import Preprocessing
from pipelines.progress import Progress
from pipelines.registry import tracking
from pipelines.registry.models import LoadedModel, check_task
from pipelines.training.loader import LoaderConfig, make_eval_loader

METRICS = {"l1": "lower", "psnr": "higher", "ssim": "higher"}  # which way is better
EVALUATION_EXPERIMENT = "p2p-evaluations"


def eval_loader_config(
    prep: Preprocessing, manifest: str, seed: int = 0, batch_size: int = 8
) -> LoaderConfig:
    """The loader settings that prepare a split exactly as the model's recorded preprocessing says."""
    return LoaderConfig(
        manifest=manifest,
        batch_size=batch_size,
        load_size=prep.load_size,
        crop_size=prep.crop_size,
        preprocess=prep.preprocess,
        direction=prep.direction,
        num_workers=1,
        seed=seed,
    )


@torch.no_grad()
def score(
    model: LoadedModel, manifest_location: str, split: str, seed: int = 0, batch_size: int = 8
) -> dict[str, float]:
    """Mean L1, PSNR and SSIM over every sample of `split` (in [0, 1] units), deterministic."""
    from pix2pix.metrics import metric_sums, to_unit

    manifest = Manifest.read(manifest_location)
    if split not in manifest.splits:
        raise ValueError(
            f"split {split!r} is not in {manifest_location} (it has {', '.join(manifest.splits)})"
        )
    check_task(model, manifest)
    prep = model.preprocessing
    torch.manual_seed(seed)
    loader = make_eval_loader(
        eval_loader_config(prep, manifest_location, seed, batch_size), split, manifest=manifest
    )
    sums = {"l1": 0.0, "psnr": 0.0, "ssim": 0.0, "count": 0.0}
    progress = Progress("evaluate", manifest.split(split).samples, "samples")
    for batch in loader:
        progress.update(len(batch["key"]))
        for key, value in metric_sums(to_unit(model.generator(batch["A"])), to_unit(batch["B"])).items():
            sums[key] += value
    count = sums.pop("count")
    if count == 0:
        raise ValueError(f"split {split!r} of {manifest_location} has no samples")
    return {**{k: v / count for k, v in sums.items()}, "samples": float(count)}


def evaluate_model(
    model: LoadedModel,
    manifest_location: str,
    split: str,
    seed: int,
    tracking_uri: str,
    experiment: str = EVALUATION_EXPERIMENT,
) -> dict[str, Any]:
    """Score `model` and log an evaluation run; the model version (if any) gets a tag pointing to it."""
    started = time.perf_counter()
    metrics = score(model, manifest_location, split, seed)
    digest = manifest_sha256(manifest_location)
    client = tracking.client(tracking_uri)
    exp_id = tracking.experiment_id(client, experiment, tracking_uri)
    tags = {
        "p2p.kind": "evaluation",
        "p2p.model_uri": f"models:/{model.name}/{model.version}" if model.name else model.uri,
        "p2p.manifest": manifest_location,
        "p2p.manifest_sha256": digest,
        "p2p.split": split,
        "p2p.seed": str(seed),
    }
    if model.name:
        tags.update({"p2p.model_name": model.name, "p2p.model_version": str(model.version)})
    run = client.create_run(exp_id, run_name=f"eval-{split}", tags=tags)
    values = {f"eval_{key}": value for key, value in metrics.items()}
    values["eval_seconds"] = time.perf_counter() - started
    client.log_batch(run.info.run_id, metrics=tracking.metric_list(values, 0))
    client.set_terminated(run.info.run_id, "FINISHED")
    if model.name:
        client.set_model_version_tag(model.name, str(model.version), f"eval.{split}.run_id", run.info.run_id)
    return {
        "metrics": metrics,
        "run_id": run.info.run_id,
        "manifest_sha256": digest,
        "split": split,
        "model_name": model.name,
        "model_version": model.version,
    }
