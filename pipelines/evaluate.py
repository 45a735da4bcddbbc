"""`p2p evaluate MODEL_URI --manifest M --split test`: L1 / PSNR / SSIM of a model on a dataset split,
logged to MLflow as an evaluation run linked to the model version.

MODEL_URI is anything a user has in hand: `models:/NAME/VERSION`, `models:/NAME@champion`,
`runs:/ID/generator`, or a training checkpoint (`checkpoint.pt`, or the Ray checkpoint folder holding
it; local or s3://). The model's recorded preprocessing (crop size, direction, channels) is applied to
the data without the random jitter, so scores are comparable between models evaluated on the same
manifest, split and seed.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from pipelines import storage
from pipelines.manifest import manifest_uri, read_manifest
from pipelines.shard_loader import LoaderConfig, channels, make_eval_loader

METRICS = {"l1": "lower", "psnr": "higher", "ssim": "higher"}  # which way is better


@dataclass
class LoadedModel:
    generator: Any  # callable N×C×H×W → N×C×H×W in [-1, 1], eval mode
    preprocessing: dict[str, Any]  # recorded at training time (see pipelines.train.preprocessing)
    uri: str
    name: str | None = None  # registry name and version, when the URI points into the registry
    version: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


def resolve_registry(uri: str, client: Any) -> tuple[str | None, str | None]:
    """(name, version) for models:/NAME/VERSION and models:/NAME@ALIAS; (None, None) otherwise."""
    if not uri.startswith("models:/"):
        return None, None
    target = uri.removeprefix("models:/").rstrip("/")
    if "@" in target:
        name, alias = target.split("@", 1)
        return name, str(client.get_model_version_by_alias(name, alias).version)
    name, _, version = target.partition("/")
    if version in ("", "latest"):
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            raise ValueError(f"registered model {name!r} has no versions")
        version = str(max(int(v.version) for v in versions))
    return name, version


def load_model(uri: str, tracking_uri: str | None = None, device: str = "cpu") -> LoadedModel:
    import mlflow
    from mlflow import MlflowClient

    if uri.startswith(("models:/", "runs:/")):
        client = MlflowClient(tracking_uri)
        name, version = resolve_registry(uri, client)
        exact = f"models:/{name}/{version}" if name else uri
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        info = mlflow.models.get_model_info(exact)
        recorded = (info.metadata or {}).get("p2p")
        if not recorded:
            raise ValueError(f"{uri} was not logged by `p2p train`: it has no recorded preprocessing")
        generator = mlflow.pytorch.load_model(exact, map_location=device)
        return LoadedModel(generator, dict(recorded), uri, name, version, {"run_id": info.run_id})
    from pix2pix import load_checkpoint
    from pix2pix.inference import load_generator

    path = uri if uri.endswith(".pt") else storage.join(uri, "checkpoint.pt")
    data = storage.read_bytes(path)
    state = load_checkpoint(data)
    recorded = state.get("extra", {}).get("preprocessing")
    if not recorded:
        raise ValueError(
            f"{path} has no recorded preprocessing: evaluate a checkpoint written by `p2p train`"
        )
    generator, _ = load_generator(data, device=device)
    return LoadedModel(generator, dict(recorded), uri, info={"step": state["step"], "epoch": state["epoch"]})


def mlflow_tracking_uri() -> str:
    import mlflow

    return str(mlflow.get_tracking_uri())


def manifest_sha256(location: str) -> str:
    return hashlib.sha256(storage.read_bytes(manifest_uri(location))).hexdigest()


def check_task(model: LoadedModel, manifest: dict[str, Any]) -> None:
    recorded = model.preprocessing
    expected = channels(manifest, recorded["direction"])
    if expected != (recorded["input_nc"], recorded["output_nc"]):
        raise ValueError(
            f"{model.uri} maps {recorded['input_nc']}→{recorded['output_nc']} channels "
            f"({recorded['direction']}) but this dataset gives {expected[0]}→{expected[1]}: "
            "it was trained on a different task"
        )


@torch.no_grad()
def score(
    model: LoadedModel, manifest_location: str, split: str, seed: int = 0, batch_size: int = 8
) -> dict[str, float]:
    """Mean L1, PSNR and SSIM over every sample of `split` (in [0, 1] units), deterministic."""
    from pix2pix.metrics import metric_sums, to_unit

    manifest = read_manifest(manifest_location)
    if split not in manifest["splits"]:
        raise ValueError(
            f"split {split!r} is not in {manifest_location} (it has {', '.join(manifest['splits'])})"
        )
    check_task(model, manifest)
    recorded = model.preprocessing
    torch.manual_seed(seed)
    loader = make_eval_loader(
        LoaderConfig(
            manifest=manifest_location,
            batch_size=batch_size,
            load_size=recorded["load_size"],
            crop_size=recorded["crop_size"],
            preprocess=recorded["preprocess"],
            direction=recorded["direction"],
            num_workers=1,
            seed=seed,
        ),
        split,
    )
    sums = {"l1": 0.0, "psnr": 0.0, "ssim": 0.0, "count": 0.0}
    for batch in loader:
        for key, value in metric_sums(to_unit(model.generator(batch["A"])), to_unit(batch["B"])).items():
            sums[key] += value
    count = sums.pop("count")
    if count == 0:
        raise ValueError(f"split {split!r} of {manifest_location} has no samples")
    return {**{k: v / count for k, v in sums.items()}, "samples": float(count)}


def evaluate(
    model_uri: str,
    manifest_location: str,
    split: str = "test",
    seed: int = 0,
    tracking_uri: str | None = None,
    experiment: str = "p2p-evaluations",
    model: LoadedModel | None = None,
) -> dict[str, Any]:
    """Score a model and log an evaluation run; the model version (if any) gets a tag pointing to it."""
    from mlflow import MlflowClient

    model = model or load_model(model_uri, tracking_uri)
    started = time.perf_counter()
    metrics = score(model, manifest_location, split, seed)
    digest = manifest_sha256(manifest_location)
    from pipelines.train import experiment_id

    client = MlflowClient(tracking_uri)
    exp_id = experiment_id(client, experiment, tracking_uri or mlflow_tracking_uri())
    tags = {
        "p2p.kind": "evaluation",
        "p2p.model_uri": model_uri,
        "p2p.manifest": manifest_location,
        "p2p.manifest_sha256": digest,
        "p2p.split": split,
        "p2p.seed": str(seed),
    }
    if model.name:
        tags.update({"p2p.model_name": model.name, "p2p.model_version": str(model.version)})
    run = client.create_run(exp_id, run_name=f"eval-{split}", tags=tags)
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, f"eval_{key}", value)
    client.log_metric(run.info.run_id, "eval_seconds", time.perf_counter() - started)
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
