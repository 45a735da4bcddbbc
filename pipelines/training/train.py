"""`p2p train`: pix2pix on Ray Train's TorchTrainer, DDP over N workers (NCCL on GPUs, gloo on CPUs), from a
dataset manifest, tracked in MLflow.

The job reads top to bottom:
1. `prepare_run` (driver): a new run (unique name) or `--resume RUN` (same name, same MLflow run); model
   channels from the manifest; the MLflow run is created here and its id handed to rank 0, so a worker
   restart keeps logging into the same run and the driver can always close it.
2. `train_loop_per_worker` (every rank): build the `TrainingStep` with DDP-wrapped G and D, restore the
   latest checkpoint (step, epoch, optimizers, LR schedule), stream this rank's shards, train, report
   checkpoints every N steps and at epoch ends, validate each epoch. Rank 0 logs to MLflow.
3. `finish_run` (driver): log the final generator as an MLflow model with a signature and an input
   example, register it as a new version, and mark the run FINISHED (or FAILED).

Batch and LR rule when the number of workers changes: the config fixes the *global* batch; each worker
takes global_batch_size / num_workers samples per step, and the LR and its per-epoch schedule are left
unchanged. Steps per epoch = samples // global batch, so a run resumed on a different number of workers
follows the same schedule in steps, epochs and LR.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pipelines import storage
from pipelines.config import from_dict
from pipelines.manifest import Manifest, read_manifest
from pipelines.runtime import cluster_gpus, init_ray
from pipelines.training.loader import (
    LoaderConfig,
    channels,
    make_eval_loader,
    make_train_loader,
    steps_per_epoch,
)
from pix2pix import Pix2PixConfig

CHECKPOINT_FILE = "checkpoint.pt"
RUN_INFO_FILE = "p2p_run.json"
SECRET_VARIABLES = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)


@dataclass
class MlflowConfig:
    tracking_uri: str = ""  # "" → $MLFLOW_TRACKING_URI, else sqlite at <storage>/mlflow.db (absolute path)
    experiment: str = "pix2pix"
    register_as: str = ""  # registered model name; each run adds a new version ("" = don't register)
    log_every: int = 10  # steps between loss logs


@dataclass
class TrainJobConfig:
    data: LoaderConfig = field(default_factory=lambda: LoaderConfig(manifest=""))
    model: Pix2PixConfig = field(default_factory=lambda: Pix2PixConfig(n_epochs=5, n_epochs_decay=5))
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    run_name: str = ""  # "" → p2p-<time>-<random>; reusing a name resumes that run
    storage: str = "runs/train"  # folder or s3:// prefix for checkpoints (shared by all nodes)
    num_workers: int = 2
    use_gpu: bool | None = None  # None → GPUs when the cluster has one per worker
    cpus_per_worker: float = 1.0
    global_batch_size: int = 1  # summed over workers; the paper trains with 1
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPUs, fp32 on CPUs
    max_steps: int = 0  # stop after this many steps in total (0 = all epochs)
    checkpoint_every: int = 0  # steps between checkpoints, besides every epoch end (0 = epoch ends only)
    keep_checkpoints: int = 3
    max_failures: int = 2  # worker failures survived (each restarts from the last checkpoint)
    val_split: str = "val"  # evaluated in eval mode at each epoch end, if the manifest has it
    grid_samples: int = 4  # rows of the per-epoch sample grid
    seed: int = 0

    @property
    def epochs(self) -> int:
        return self.model.n_epochs + self.model.n_epochs_decay


# ----------------------------------------------------------------------------------------------------------
# 1. Driver: the run
# ----------------------------------------------------------------------------------------------------------


def redact(value: str) -> str:
    """No secret ever goes into params, tags or artifacts, even if a user pastes one into a config."""
    for name in SECRET_VARIABLES:
        secret = os.environ.get(name)
        if secret and secret in value:
            value = value.replace(secret, "***")
    return value


def flatten(prefix: str, values: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(f"{name}.", value))
        else:
            out[name] = redact(str(value))[:6000]
    return out


def default_tracking_uri(cfg: TrainJobConfig) -> str:
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    base = Path(cfg.storage if not storage.is_s3(cfg.storage) else "runs").resolve()
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{base / 'mlflow.db'}"  # an absolute path: sqlite:////abs/...


def experiment_id(client: Any, name: str, tracking_uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    location = None
    if tracking_uri.startswith("sqlite:///"):  # artifacts beside the database, not in the cwd
        location = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return str(client.create_experiment(name, artifact_location=location))


def run_info_uri(cfg: TrainJobConfig) -> str:
    return storage.join(cfg.storage, cfg.run_name, RUN_INFO_FILE)


def prepare_run(cfg: TrainJobConfig, resume: bool) -> tuple[TrainJobConfig, str]:
    """Fill in derived settings, create (or reopen) the MLflow run; returns (config, MLflow run id)."""
    from mlflow import MlflowClient

    cfg.storage = storage.normalize_uri(cfg.storage)
    if resume:
        try:
            info = json.loads(storage.read_bytes(run_info_uri(cfg)))
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"no run {cfg.run_name!r} under {cfg.storage} to resume") from exc
        resumed = from_dict(TrainJobConfig, info["config"])
        resumed.max_steps = cfg.max_steps or resumed.max_steps  # a resume may extend the run
        resumed.num_workers = cfg.num_workers  # and may change the worker count (see the batch rule)
        return prepare_resumed(resumed, info["mlflow_run_id"])
    if not cfg.data.manifest:
        raise ValueError("set data.manifest (--manifest): a dataset built with `p2p dataset build`")
    cfg.run_name = cfg.run_name or f"p2p-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    if storage.exists(run_info_uri(cfg)):
        raise FileExistsError(
            f"run {cfg.run_name!r} already exists under {cfg.storage}: use --resume {cfg.run_name} to "
            "continue it, or choose another run name"
        )
    manifest = read_manifest(cfg.data.manifest)
    input_nc, output_nc = channels(manifest, cfg.data.direction)
    cfg.model.input_nc, cfg.model.output_nc = input_nc, output_nc
    cfg.mlflow.tracking_uri = default_tracking_uri(cfg)
    check_batch(cfg)

    client = MlflowClient(cfg.mlflow.tracking_uri)
    exp_id = experiment_id(client, cfg.mlflow.experiment, cfg.mlflow.tracking_uri)
    run = client.create_run(exp_id, run_name=cfg.run_name, tags={"p2p.dataset_build": manifest.build_id})
    run_id = run.info.run_id
    from mlflow.entities import Param

    params = flatten("", dataclasses.asdict(cfg))
    items = [Param(k, v) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "manifest.json"
        path.write_text(redact(manifest.to_json()))
        client.log_artifact(run_id, str(path), artifact_path="dataset")
    info = {
        "config": dataclasses.asdict(cfg),
        "mlflow_run_id": run_id,
        "tracking_uri": cfg.mlflow.tracking_uri,
    }
    storage.write_bytes_atomic(run_info_uri(cfg), json.dumps(info, indent=2).encode())
    return cfg, run_id


def prepare_resumed(cfg: TrainJobConfig, run_id: str) -> tuple[TrainJobConfig, str]:
    from mlflow import MlflowClient

    check_batch(cfg)
    MlflowClient(cfg.mlflow.tracking_uri).update_run(run_id, status="RUNNING")
    return cfg, run_id


def check_batch(cfg: TrainJobConfig) -> None:
    if cfg.global_batch_size % cfg.num_workers:
        raise ValueError(
            f"global_batch_size {cfg.global_batch_size} does not divide over {cfg.num_workers} workers: "
            "choose a multiple of the worker count"
        )
    cfg.data.batch_size = cfg.global_batch_size // cfg.num_workers


# ----------------------------------------------------------------------------------------------------------
# 2. Workers: the training loop
# ----------------------------------------------------------------------------------------------------------


def distributed_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def validate(
    step: Any, cfg: TrainJobConfig, rank: int, world: int
) -> tuple[dict[str, float], np.ndarray | None]:
    """L1 / PSNR / SSIM over the whole validation split (each rank a disjoint part), in eval mode; the
    sample grid comes from rank 0's first batch."""
    from pix2pix.metrics import metric_sums, to_unit
    from pix2pix.visualize import sample_grid

    step.G.eval()
    totals, grid = {"l1": 0.0, "psnr": 0.0, "ssim": 0.0, "count": 0.0}, None
    with torch.no_grad():
        for batch in make_eval_loader(cfg.data, cfg.val_split, rank, world):
            a, b = batch["A"].to(step.device), batch["B"].to(step.device)
            fake = step.G(a)
            for key, value in metric_sums(to_unit(fake), to_unit(b)).items():
                totals[key] += value
            if grid is None and rank == 0:
                grid = sample_grid(a, fake, b, max_rows=cfg.grid_samples)
    step.G.train()
    l1_sum, psnr_sum, ssim_sum, count = distributed_sum(list(totals.values()), step.device)
    count = max(count, 1.0)
    return {"val_l1": l1_sum / count, "val_psnr": psnr_sum / count, "val_ssim": ssim_sum / count}, grid


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    from mlflow import MlflowClient
    from torch.nn.parallel import DistributedDataParallel

    from pix2pix import TrainingStep, load_checkpoint, save_checkpoint

    cfg = from_dict(TrainJobConfig, config["job"])
    run_id = config["mlflow_run_id"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if cfg.precision == "auto":
        cfg.model.precision = "bf16" if device.type == "cuda" else "fp32"
    else:
        cfg.model.precision = cfg.precision

    def ddp(module: torch.nn.Module) -> torch.nn.Module:
        if world == 1:
            return module
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)

    step = TrainingStep(cfg.model, device, wrap=ddp)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            step.load_state_dict(load_checkpoint(Path(directory) / CHECKPOINT_FILE, map_location=device))
        print(
            f"[train] rank {rank}: resumed at step {step.step}, epoch {step.epoch}, lr {step.lr:.2e}",
            flush=True,
        )
    # Each rank its own dropout/augmentation stream, reproducible from the resume point.
    torch.manual_seed(cfg.seed + 1000 * rank + step.step)

    manifest = read_manifest(cfg.data.manifest)
    per_epoch = steps_per_epoch(manifest, "train", world, cfg.data.batch_size)
    has_val = cfg.val_split in manifest.splits
    mlflow = MlflowClient(cfg.mlflow.tracking_uri) if rank == 0 else None
    final_step = cfg.epochs * per_epoch if not cfg.max_steps else min(cfg.max_steps, cfg.epochs * per_epoch)

    def report(metrics: dict[str, float], with_checkpoint: bool) -> None:
        # Every rank reports equally often (it is a barrier); only rank 0 hands over the state.
        metrics = {**metrics, "step": step.step, "epoch": step.epoch}
        if with_checkpoint and rank == 0:
            with tempfile.TemporaryDirectory() as directory:
                extra = {"mlflow_run_id": run_id, "preprocessing": preprocessing(cfg, manifest)}
                save_checkpoint(Path(directory) / CHECKPOINT_FILE, step, extra=extra)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)

    while step.step < final_step:
        epoch = step.epoch
        done_in_epoch = step.step - epoch * per_epoch  # > 0 when resuming mid-epoch
        started, samples = time.perf_counter(), 0
        for i, batch in enumerate(make_train_loader(cfg.data, "train", rank, world, epoch, manifest)):
            if i < done_in_epoch:
                continue  # the loader is deterministic per (seed, epoch, rank): skip what was trained
            losses = step(batch["A"], batch["B"])
            samples += batch["A"].shape[0] * world
            if mlflow is not None and step.step % cfg.mlflow.log_every == 0:
                metrics = {f"loss_{k}": float(v) for k, v in losses.items()}
                metrics["samples_per_s"] = samples / (time.perf_counter() - started)
                metrics["lr"] = step.lr
                mlflow.log_batch(run_id, metrics=metric_list(metrics, step.step))
            if step.step >= final_step:
                break
            if cfg.checkpoint_every and step.step % cfg.checkpoint_every == 0 and (step.step % per_epoch):
                report({k: float(v) for k, v in losses.items()}, with_checkpoint=True)
        if step.step < final_step and step.step % per_epoch:
            raise RuntimeError(
                f"rank {rank}: the loader ended epoch {epoch} after {step.step - epoch * per_epoch} of "
                f"{per_epoch} steps; every rank must run the same number of steps"
            )
        if step.step % per_epoch == 0:  # a whole epoch ended (not a max_steps stop)
            val_metrics, grid = validate(step, cfg, rank, world) if has_val else ({}, None)
            step.end_epoch(metric=val_metrics.get("val_l1"))
            if mlflow is not None:
                mlflow.log_batch(run_id, metrics=metric_list({**val_metrics, "epoch": step.epoch}, step.step))
                if grid is not None:
                    mlflow.log_image(run_id, grid, artifact_file=f"samples/epoch_{step.epoch:03d}.png")
            report(val_metrics, with_checkpoint=True)
        elif step.step >= final_step:
            report({}, with_checkpoint=True)


def preprocessing(cfg: TrainJobConfig, manifest: Manifest) -> dict[str, Any]:
    """How inputs must be prepared for this model: recorded with checkpoints and the MLflow model so that
    evaluation and batch translation do exactly what training did (minus the random jitter)."""
    return {
        "input_nc": cfg.model.input_nc,
        "output_nc": cfg.model.output_nc,
        "direction": cfg.data.direction,
        "load_size": cfg.data.load_size,
        "crop_size": cfg.data.crop_size,
        "preprocess": cfg.data.preprocess,
        "input_is_label_map": manifest.sample_format.input_is_label_map and cfg.data.direction == "AtoB",
        "builder": manifest.builder,
        "dataset_build_id": manifest.build_id,
        "manifest": cfg.data.manifest,
    }


def metric_list(values: dict[str, float], step: int) -> list[Any]:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in values.items() if np.isfinite(v)]


# ----------------------------------------------------------------------------------------------------------
# 3. Driver: fit, then the model into MLflow
# ----------------------------------------------------------------------------------------------------------


def run_config(cfg: TrainJobConfig) -> Any:
    import ray.train

    filesystem, path = None, cfg.storage
    if storage.is_s3(cfg.storage):
        filesystem, path = storage.resolve(cfg.storage)
    return ray.train.RunConfig(
        name=cfg.run_name,
        storage_path=path,
        storage_filesystem=filesystem,
        failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
    )


def finish_run(cfg: TrainJobConfig, run_id: str, result: Any) -> dict[str, Any]:
    import mlflow
    from mlflow.models import infer_signature

    import pix2pix
    from pix2pix import load_generator

    if result.checkpoint is None:
        raise RuntimeError("training ended without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        generator, model_cfg = load_generator(Path(directory) / CHECKPOINT_FILE)
    recorded = preprocessing(cfg, read_manifest(cfg.data.manifest))
    size = cfg.data.crop_size
    example = np.random.default_rng(0).uniform(-1, 1, (2, model_cfg.input_nc, size, size)).astype(np.float32)
    with torch.no_grad():
        output = generator(torch.from_numpy(example)).numpy()
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            generator,
            name="generator",
            signature=infer_signature(example, output),
            input_example=example,
            registered_model_name=cfg.mlflow.register_as or None,
            code_paths=[str(Path(pix2pix.__file__).parent)],
            # Stated, not inferred: inference runs a subprocess that takes ~12 s and adds nothing here.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
            metadata={"p2p": recorded},
        )
    return {
        "model_uri": info.model_uri,
        "registered_version": getattr(info, "registered_model_version", None),
    }


def run_training(cfg: TrainJobConfig, resume: bool = False) -> dict[str, Any]:
    import ray
    import ray.train
    from mlflow import MlflowClient
    from ray.train.torch import TorchTrainer

    init_ray()
    cfg, run_id = prepare_run(cfg, resume)
    gpus = cluster_gpus()
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else gpus >= cfg.num_workers
    print(
        f"[train] run {cfg.run_name}: {cfg.num_workers} {'GPU' if use_gpu else 'CPU'} workers, global batch "
        f"{cfg.global_batch_size}, MLflow run {run_id} at {cfg.mlflow.tracking_uri}",
        flush=True,
    )
    client = MlflowClient(cfg.mlflow.tracking_uri)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": dataclasses.asdict(cfg), "mlflow_run_id": run_id},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        run_config=run_config(cfg),
    )
    try:
        result = trainer.fit()
        outcome = finish_run(cfg, run_id, result)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    outcome.update(
        run_name=cfg.run_name,
        mlflow_run_id=run_id,
        tracking_uri=cfg.mlflow.tracking_uri,
        checkpoint=result.checkpoint.path,
        metrics=result.metrics,
    )
    print(f"[train] done: {json.dumps({k: str(v) for k, v in outcome.items()})}", flush=True)
    return outcome
