"""`p2p segmenter train --manifest M`: the segmenter behind the FCN-score, trained on a labels→photo dataset's
real photos and registered in MLflow as `<dataset>-segmenter`, next to the dataset's generators.

The pix2pix paper's FCN-score needs a segmentation network that has only ever seen real photos: generated
photos are then scored by how much of their input label map it recovers, beside its score on the real
photos (the ceiling). This job trains one (`pix2pix.segmenter`, a small U-Net) on the dataset's train split:
the stored target photos are the inputs and the stored colour-coded label maps, mapped back to class ids with
the manifest's palette (`pipelines.quality.labels`), the targets; unlabelled pixels are ignored.

It runs like `p2p train` and reuses its data path: Ray Train's TorchTrainer, DDP over `workers` CPU or GPU
workers, each streaming its shards with `pipelines.training.loader` (the same augmentation: resize to
`load_size`, random crop, flip, nearest-neighbour label maps; loaders built once per run), an epoch-end
checkpoint to `storage` at most every `checkpoint_min_interval_s` and after the last epoch (a failed worker
restarts from it; `pipelines.training.loop.ReportPacer` says why), per-epoch validation (pixel accuracy,
class accuracy, class IoU on the val split) logged by rank 0 into the MLflow run the driver created, and the
final network logged and registered by the driver (`pipelines.quality.segmenter`).
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from pipelines import storage
from pipelines.config import ConfigError, from_dict, option
from pipelines.manifest import Manifest
from pipelines.quality.labels import IGNORE, ClassMap, confusion, fcn_scores
from pipelines.quality.segmenter import (
    DATASET_TAG,
    dataset_location,
    dataset_name,
    log_segmenter,
    metadata,
    segmenter_name,
)
from pipelines.registry import tracking
from pipelines.registry.models import check_model_name
from pipelines.runtime import check_cluster_fits, cluster_gpus, init_ray, interruptible_trainer
from pipelines.training.loader import (
    LoaderConfig,
    RunLoader,
    close_loader,
    make_eval_loader,
    steps_per_epoch,
)
from pipelines.training.loop import ReportPacer

CHECKPOINT_FILE = "segmenter.pt"
EXPERIMENT = "p2p-segmenters"


@dataclass
class SegmenterTrainConfig:
    data: LoaderConfig = field(default_factory=lambda: LoaderConfig(manifest=""))
    width: int = option(32, "channels of the U-Net's first level (doubled per level down)")
    depth: int = option(4, "downsamplings of the U-Net (crop_size must be divisible by 2**depth)")
    epochs: int = option(30, "passes over the train split")
    lr: float = option(1e-3, "Adam learning rate (cosine-annealed to 0 over the epochs)")
    workers: int = option(2, "DDP training workers (one GPU each when the cluster has a GPU per worker)")
    use_gpu: bool | None = option(None, "GPUs for the workers (default: when the cluster has one per worker)")
    cpus_per_worker: float = option(1.0, "CPUs Ray reserves per training worker")
    global_batch_size: int = option(8, "samples per step summed over the workers (a multiple of --workers)")
    max_failures: int = option(2, "worker failures survived, each restarting from the last checkpoint")
    checkpoint_min_interval_s: float = option(
        10.0,
        "seconds at least between two epoch-end checkpoints (the last is always taken): Ray Train takes "
        "one report per worker every 2 s, so faster ones stall training",
    )
    storage: str = option("runs/segmenter", "checkpoints: a folder or s3:// prefix that every node can reach")
    run_name: str = option("", "name of the run (default: seg-<time>-<random>)")
    register_as: str = option("", "registered model name (default: <dataset folder name>-segmenter)")
    experiment: str = option(EXPERIMENT, "MLflow experiment of the training run")
    tracking_uri: str = option("", tracking.URI_HELP)
    seed: int = option(0, "seed of initialisation, data order and augmentation")

    DERIVED: ClassVar[dict[str, str]] = {
        "data.batch_size": "global_batch_size / workers",
        "data.seed": "seed",
        "data.direction": "the dataset: stored target photos are segmented into the stored label maps",
    }

    def validate(self) -> None:
        if not self.data.manifest:
            raise ConfigError("set the dataset: --manifest DATASET (a labels→photo dataset)")
        if self.register_as:  # registered after training: a bad name would waste the run
            check_model_name(self.register_as, "register_as")
        for name in ("width", "depth", "epochs", "workers", "global_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.global_batch_size % self.workers:
            raise ConfigError(
                f"global_batch_size {self.global_batch_size} does not divide over {self.workers} workers"
            )
        if self.data.crop_size % 2**self.depth:
            raise ConfigError(
                f"data.crop_size {self.data.crop_size} must be divisible by 2**depth = {2**self.depth}"
            )
        try:
            self.data.validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

    def derive(self) -> None:
        self.data.batch_size = self.global_batch_size // self.workers
        self.data.seed = self.seed
        self.data.direction = "AtoB"


# ----------------------------------------------------------------------------------------------------------
# Workers
# ----------------------------------------------------------------------------------------------------------


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor


def evaluate_split(
    network: torch.nn.Module, loader: Iterable[dict[str, Any]], class_map: ClassMap
) -> dict[str, float]:
    """Pixel accuracy, class accuracy and class IoU on the val split (each rank a disjoint share, from
    ``loader``)."""
    device = next(network.parameters()).device
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Every rank's BatchNorm kept updating its own running statistics in its last training step (DDP
        # broadcasts rank 0's only at the start of each forward): score with the ones rank 0 checkpoints.
        for buffer in network.buffers():
            torch.distributed.broadcast(buffer, 0)
    matrix = torch.zeros(class_map.classes, class_map.classes, dtype=torch.long)
    network.eval()
    with torch.no_grad():
        for batch in loader:
            predicted = network(batch["B"].to(device)).argmax(1).cpu()
            matrix += confusion(predicted, class_map.labels(batch["A"]), class_map.classes)
    network.train()
    matrix = _all_reduce(matrix.to(device)).cpu()
    return {f"val_{k}": v for k, v in fcn_scores(matrix).items()}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    from torch.nn.parallel import DistributedDataParallel

    from pix2pix.segmenter import Segmenter, SegmenterConfig

    cfg = from_dict(SegmenterTrainConfig, config["job"])
    class_map = ClassMap.from_palette(config["palette"])
    run_id = config["mlflow_run_id"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    network = Segmenter(SegmenterConfig(class_map.classes, cfg.width, cfg.depth)).to(device)
    model: torch.nn.Module = network
    if world > 1:
        model = DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    start, last_metrics = 0, {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / CHECKPOINT_FILE, map_location=device, weights_only=True)
        network.load_state_dict(state["network"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start = int(state["epoch"])
        last_metrics = state.get("metrics", {"epoch": start})
    torch.manual_seed(cfg.seed + 1000 * rank + start)
    manifest = Manifest.read(cfg.data.manifest)
    mlflow = tracking.client(tracking.on_worker(cfg.tracking_uri)) if rank == 0 else None

    def report(metrics: dict[str, Any], epoch: int) -> None:
        # A barrier: every rank calls it alike; rank 0 hands over the state (written here, uploaded by Ray
        # before report returns).
        if rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            state = {
                "network": network.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "epoch": epoch,
                "metrics": metrics,
                "config": network.cfg.to_dict(),
            }
            torch.save(state, Path(directory) / CHECKPOINT_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    if start >= cfg.epochs:
        # Nothing left to train (a restart after the last checkpoint was written but before Ray recorded
        # it): reported again, so that Ray's result names that checkpoint.
        report(last_metrics, start)
        return
    # Loaders for the whole run: their worker processes fork once, not every epoch (a fork while one of
    # Ray's threads holds a lock can leave the child waiting on it forever).
    loader = RunLoader(cfg.data, "train", rank, world, manifest=manifest)
    val_loader = (
        make_eval_loader(cfg.data, "val", rank, world, manifest=manifest, persistent=True)
        if "val" in manifest.splits
        else None
    )
    pacer = ReportPacer(cfg.checkpoint_min_interval_s, world, device)  # Ray takes a report every 2 s
    try:
        for epoch in range(start, cfg.epochs):
            started, loss_sum, steps = time.perf_counter(), 0.0, 0
            for batch in loader.epoch(epoch):
                labels = class_map.labels(batch["A"]).to(device)
                logits = model(batch["B"].to(device))
                # Summed over labelled pixels / their count: a crop with no labelled pixel gives 0, not
                # NaN, and still runs backward (DDP needs every rank to).
                loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
                loss = loss / (labels != IGNORE).sum().clamp(min=1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum, steps = loss_sum + float(loss.detach()), steps + 1
            schedule.step()
            metrics = {"loss": loss_sum / max(steps, 1), "epoch": epoch + 1}
            if val_loader is not None:
                metrics.update(evaluate_split(network, val_loader, class_map))
            if mlflow is not None:
                mlflow.log_batch(run_id, metrics=tracking.metric_list(metrics, epoch + 1))
                shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "epoch")
                # Not print(): Ray Train patches print in workers to also log it, which shows every line
                # twice.
                took = time.perf_counter() - started
                sys.stdout.write(f"[segmenter] epoch {epoch + 1}/{cfg.epochs} {took:.1f}s  {shown}\n")
                sys.stdout.flush()
            if pacer.due(final=epoch + 1 == cfg.epochs):
                report(metrics, epoch + 1)
    finally:
        loader.close()
        if val_loader is not None:
            close_loader(val_loader)


# ----------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------


def worker_config(cfg: SegmenterTrainConfig, palette: Any, run_id: str) -> dict[str, Any]:
    """What every worker receives (Ray's train_loop_config): the config with the tracking URI stripped of
    credentials (see `tracking.for_workers`), the palette and the MLflow run id."""
    job = dataclasses.asdict(cfg)
    job["tracking_uri"] = tracking.for_workers(cfg.tracking_uri)
    return {"job": job, "palette": palette, "mlflow_run_id": run_id}


def run_segmenter_training(cfg: SegmenterTrainConfig) -> dict[str, Any]:
    """Train, log and register a segmenter; returns where it is and its last validation scores."""
    import ray.train

    from pix2pix.segmenter import Segmenter, SegmenterConfig

    cfg.validate()
    cfg.derive()
    manifest = Manifest.read(cfg.data.manifest)
    if not manifest.sample_format.input_is_label_map or not manifest.palette:
        raise ConfigError(
            f"{cfg.data.manifest} is not a labels→photo dataset (built with the labels builder): "
            "a segmenter needs label maps"
        )
    class_map = ClassMap.from_palette(manifest.palette)
    steps_per_epoch(manifest, "train", cfg.workers, cfg.data.batch_size)
    cfg.tracking_uri = tracking.tracking_uri(cfg.tracking_uri)
    cfg.storage = storage.normalize_uri(cfg.storage)
    cfg.data.manifest = storage.normalize_uri(cfg.data.manifest)  # the workers run in other folders
    cfg.run_name = cfg.run_name or f"seg-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    if storage.exists(storage.join(cfg.storage, cfg.run_name)):
        # Ray Train would silently carry on from that run's last checkpoint, into a new MLflow run.
        raise FileExistsError(
            f"segmenter run {cfg.run_name!r} already exists under {cfg.storage}: choose another run name"
        )
    register_as = cfg.register_as or segmenter_name(cfg.data.manifest)

    tracking.export_credentials(cfg.tracking_uri)  # before Ray starts: local workers inherit it
    init_ray()
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else cluster_gpus() >= cfg.workers
    check_cluster_fits(cfg.workers, cfg.cpus_per_worker, use_gpu)  # else Ray Train waits for ever
    filesystem, path = storage.resolve(cfg.storage) if storage.is_s3(cfg.storage) else (None, cfg.storage)
    # Only now, when the run can start, is its MLflow run created (else it would stay RUNNING).
    client = tracking.client(cfg.tracking_uri)
    exp_id = tracking.experiment_id(client, cfg.experiment, cfg.tracking_uri)
    run = client.create_run(exp_id, run_name=cfg.run_name, tags={"p2p.kind": "segmenter"})
    run_id = str(run.info.run_id)
    with tracking.ended_if_raised(client, run_id):
        tracking.log_params(client, run_id, dataclasses.asdict(cfg))
        tracking.log_dataset_input(
            client, run_id, cfg.data.manifest, dataset_name(cfg.data.manifest), manifest.build_id
        )
    trainer = interruptible_trainer(
        train_loop_per_worker,
        train_loop_config=worker_config(cfg, manifest.palette, run_id),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        # mypy sees Ray Train V1's RunConfig; V2 (Ray's default here) has logging_config.
        run_config=ray.train.RunConfig(  # type: ignore[call-arg]
            name=cfg.run_name,
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    stopped = f"segmenter run {cfg.run_name} stopped; nothing was registered"
    with tracking.failed_or_killed(client, run_id, trainer.interrupted, stopped):
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError("segmenter training ended without a checkpoint")
        with result.checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        network = Segmenter(SegmenterConfig(**state["config"]))
        network.load_state_dict(state["network"])
        meta = metadata(network, class_map, cfg.data.crop_size, cfg.data.manifest, manifest.build_id)
        info = log_segmenter(network, meta, run_id, cfg.tracking_uri, register_as)
    client.set_terminated(run_id, status="FINISHED")
    version = getattr(info, "registered_model_version", None)
    if version is not None:  # which dataset it is for: `find_segmenter` picks by it
        client.set_model_version_tag(
            register_as, str(version), DATASET_TAG, dataset_location(cfg.data.manifest)
        )
    print(f"[segmenter] registered {register_as} v{version} (MLflow run {run_id})", flush=True)
    return {
        "registered_name": register_as,
        "registered_version": None if version is None else str(version),
        "model_uri": info.model_uri,
        "mlflow_run_id": run_id,
        "metrics": dict(result.metrics or {}),
    }
