"""`p2p train`: pix2pix on Ray Train's TorchTrainer, DDP over N workers (NCCL on GPUs, gloo on CPUs), from a
dataset manifest, tracked in MLflow.

The job reads top to bottom:
1. `prepare_run` (driver): a new run (unique name) or `--resume RUN` (same name, same MLflow run); model
   channels from the manifest; the MLflow run is created here and its id handed to rank 0, so a worker
   restart keeps logging into the same run and the driver can always close it.
2. `train_loop_per_worker` (every rank): build the `TrainingStep` with DDP-wrapped G and D, restore the
   latest checkpoint (step, epoch, optimizers, LR schedule), stream this rank's shards through one loader
   per run (its workers persist across epochs; on CUDA the crop and flip run on the GPU), train with
   `pipelines.training.loop.run_steps`, report checkpoints every N steps and at epoch ends (at most one
   per `checkpoint_min_interval_s`, see `ReportPacer`), validate at epoch ends (at most one per
   `val_min_interval_s`; the run's last epoch end always, every one under the plateau LR policy). Rank 0
   logs to MLflow,
   including where each epoch's time went (``time_*`` metrics: waiting for data, steps, logging,
   checkpoints, validation), and converts losses to numbers only when it logs them: nothing else waits for
   the device inside an epoch.
3. `finish_run` (driver): log the final generator as an MLflow model with a signature and an input
   example, register it as a new version, and mark the run FINISHED (or FAILED).

Batch and LR rule when the number of workers changes: the config fixes the *global* batch; each worker
takes global_batch_size / workers samples per step, and the LR and its per-epoch schedule are left
unchanged. Steps per epoch = samples // global batch, so a run resumed on a different number of workers
follows the same schedule in steps, epochs and LR.

On a cluster of several nodes: checkpoints must be on storage every node sees (s3://, or a folder mounted on
every node, declared with `storage_shared`), because a worker restarted on another node and the driver's
final read must find what rank 0 wrote; a plain folder is refused before anything starts. Each attempt
records which node every rank runs on (tag `p2p.worker_nodes`), and a restarted attempt logs only the steps
the failed one had not logged, so every loss has one value per step.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import io
import json
import logging
import math
import re
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipelines import storage
from pipelines.config import ConfigError, flat_paths, from_dict, merge, option, value_at
from pipelines.dataset.lock import BuildLock, LockConfig
from pipelines.manifest import Manifest, ManifestError, dataset_root, read_manifest, replaced_manifest_uri
from pipelines.preprocessing import Preprocessing
from pipelines.registry import tracking
from pipelines.registry.models import RUN_RECORD, check_model_name, log_generator
from pipelines.runtime import alive_nodes, check_cluster_fits, cluster_gpus, init_ray, interruptible_trainer
from pipelines.secrets import redact
from pipelines.training.loader import (
    LoaderConfig,
    RunLoader,
    augments_on_device,
    close_loader,
    make_eval_loader,
    steps_per_epoch,
    workers_started,
)
from pipelines.training.loop import ReportPacer, run_steps
from pix2pix import Pix2PixConfig, TrainingStep
from pix2pix.networks import check_discriminator_size, check_input_size, size_factor

CHECKPOINT_FILE = "checkpoint.pt"
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass
class MlflowConfig:
    tracking_uri: str = option("", tracking.URI_HELP)
    experiment: str = option("pix2pix", "MLflow experiment of the training run")
    register_as: str = option("", "register the final generator as a new version of this model name")
    log_every: int = option(10, "steps between loss logs")
    parent_run_id: str = option("", "MLflow run this run is nested under (`p2p sweep` sets it)")


@dataclass
class TrainJobConfig:
    data: LoaderConfig = field(default_factory=lambda: LoaderConfig(manifest=""))
    model: Pix2PixConfig = field(default_factory=lambda: Pix2PixConfig(n_epochs=5, n_epochs_decay=5))
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    run_name: str = option("", "name of a new run (default: p2p-<time>-<random>)")
    storage: str = option("runs/train", "checkpoints: a folder or s3:// prefix that every node can reach")
    storage_shared: bool = option(
        False, "the --storage folder is on a filesystem every node mounts (NFS, ...): allowed on multi-node"
    )
    workers: int = option(2, "DDP training workers (one GPU each when the cluster has a GPU per worker)")
    use_gpu: bool | None = option(None, "GPUs for the workers (default: when the cluster has one per worker)")
    cpus_per_worker: float = option(1.0, "CPUs Ray reserves per training worker")
    placement_strategy: Literal["PACK", "SPREAD"] = option(
        "PACK", "workers on as few nodes as possible (PACK) or spread over the nodes (SPREAD)"
    )
    global_batch_size: int = option(2, "samples per step summed over the workers (a multiple of --workers)")
    lr_batch_rule: Literal["none", "sqrt", "linear"] = option(
        "none",
        "scale model.lr with the global batch B: sqrt (lr × √B, Adam's rule), linear (lr × B), none",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", "arithmetic: auto is bf16 autocast on GPUs, fp32 on CPUs"
    )
    max_steps: int = option(0, "stop after this many steps in total (0: train every epoch)")
    checkpoint_every: int = option(0, "steps between checkpoints, besides every epoch end (0: epoch ends)")
    checkpoint_min_interval_s: float = option(
        10.0,
        "seconds at least between two checkpoints (epoch ends and checkpoint_every closer than this are "
        "skipped; the last is always taken): Ray Train takes one report per worker every 2 s, so faster "
        "ones stall training",
    )
    keep_checkpoints: int = option(3, "checkpoints kept on storage")
    max_failures: int = option(2, "worker failures survived, each restarting from the last checkpoint")
    val_split: str = option(
        "val",
        "split validated in eval mode at epoch ends, if the dataset has it ('' or none: no validation)",
    )
    val_min_interval_s: float = option(
        30.0,
        "seconds at least from the start (of each attempt) or the last validation to the next (closer epoch "
        "ends are not validated; the run's last epoch end always is, and every one under lr_policy plateau; "
        "0: every epoch)",
    )
    grid_samples: int = option(4, "rows of each validation's sample grid")
    progress_every_s: float = option(
        15.0,
        "seconds between console progress lines: within a longer epoch, and between epoch lines of shorter "
        "ones (the last epoch's always prints)",
    )
    seed: int = option(0, "seed of initialisation, data order, augmentation and dropout")

    # Set by the job, not by users: where each value comes from.
    DERIVED: ClassVar[dict[str, str]] = {
        "model.input_nc": "the dataset's input channels (and data.direction)",
        "model.output_nc": "the dataset's target channels (and data.direction)",
        "model.precision": "precision (auto: bf16 on GPUs, fp32 on CPUs)",
        "data.batch_size": "global_batch_size / workers",
        "data.seed": "seed",
    }
    # What `--resume RUN` may change; everything else is the run's recorded config.
    RESUMABLE: ClassVar[tuple[str, ...]] = (
        "max_steps",
        "workers",
        "use_gpu",
        "cpus_per_worker",
        "placement_strategy",
        "storage_shared",
        "checkpoint_every",
        "checkpoint_min_interval_s",
        "val_min_interval_s",
        "keep_checkpoints",
        "max_failures",
        "progress_every_s",
        "mlflow.log_every",
    )

    @property
    def epochs(self) -> int:
        return self.model.n_epochs + self.model.n_epochs_decay

    def validate(self) -> None:
        """Checks that need no data and no cluster, so a mistake fails before Ray starts."""
        if not self.data.manifest:
            raise ConfigError("set the dataset: --manifest DATASET (built with `p2p dataset build`)")
        if self.run_name and not RUN_NAME.fullmatch(self.run_name):
            raise ConfigError(
                f"run_name {self.run_name!r}: use letters, digits, '.', '_' and '-' (it names a folder)"
            )
        if self.mlflow.register_as:  # registered after the last step: a bad name would waste the run
            check_model_name(self.mlflow.register_as, "mlflow.register_as")
        for name in ("workers", "global_batch_size", "keep_checkpoints", "grid_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "max_steps",
            "checkpoint_every",
            "checkpoint_min_interval_s",
            "val_min_interval_s",
            "max_failures",
            "progress_every_s",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.epochs < 1:
            raise ConfigError(
                "model.n_epochs + model.n_epochs_decay must be >= 1 (the run's length in epochs), got 0"
            )
        if self.mlflow.log_every < 1:
            raise ConfigError(f"mlflow.log_every must be >= 1, got {self.mlflow.log_every}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.global_batch_size % self.workers:
            raise ConfigError(
                f"global_batch_size {self.global_batch_size} does not divide over {self.workers} workers: "
                "choose a multiple of the worker count"
            )
        try:
            self.data.validate()
            check_input_size(self.model, self.data.crop_size, self.data.crop_size)
            check_discriminator_size(self.model, self.data.crop_size, self.data.crop_size)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

    def effective_lr(self) -> float:
        """model.lr after `lr_batch_rule`; model.lr itself stays as set, so a resumed run scales it once."""
        scale = {"none": 1.0, "sqrt": math.sqrt(self.global_batch_size), "linear": self.global_batch_size}
        return self.model.lr * scale[self.lr_batch_rule]

    def derive(self, manifest: Manifest) -> None:
        """Fill in the DERIVED fields."""
        self.model.input_nc, self.model.output_nc = manifest.channels(self.data.direction)
        self.data.batch_size = self.global_batch_size // self.workers
        self.data.seed = self.seed


# ----------------------------------------------------------------------------------------------------------
# 1. Driver: the run
# ----------------------------------------------------------------------------------------------------------


def run_info_uri(cfg: TrainJobConfig) -> str:
    return storage.join(cfg.storage, cfg.run_name, RUN_RECORD)


def run_exists(cfg: TrainJobConfig) -> FileExistsError:
    return FileExistsError(
        f"run {cfg.run_name!r} already exists under {cfg.storage}: use --resume {cfg.run_name} to "
        "continue it, or choose another run name"
    )


def check_s3_locations(cfg: TrainJobConfig) -> None:
    """Wrong credentials or a missing bucket named as such, before anything is created (the first request
    would fail later as an S3 error of its own, worded as an outage)."""
    if storage.is_s3(cfg.storage):
        storage.preflight(cfg.storage, write=True)
    if storage.is_s3(cfg.data.manifest):
        storage.preflight(dataset_root(cfg.data.manifest), write=False)


def new_run(cfg: TrainJobConfig) -> tuple[TrainJobConfig, Manifest]:
    """A new run's config with its derived fields and the dataset manifest; nothing is created yet."""
    cfg.validate()
    cfg.storage = storage.normalize_uri(cfg.storage)
    # Workers run in their own folders: a relative dataset path would point elsewhere there.
    cfg.data.manifest = storage.normalize_uri(cfg.data.manifest)
    cfg.run_name = cfg.run_name or f"p2p-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    check_s3_locations(cfg)
    if storage.exists(run_info_uri(cfg)):
        raise run_exists(cfg)
    manifest = read_manifest(cfg.data.manifest)
    check_against_dataset(cfg, manifest)
    if cfg.val_split not in manifest.splits:
        print(f"[train] the dataset has no {cfg.val_split!r} split: the run is not validated", flush=True)
    cfg.derive(manifest)
    cfg.mlflow.tracking_uri = tracking.tracking_uri(cfg.mlflow.tracking_uri)
    return cfg, manifest


def check_against_dataset(cfg: TrainJobConfig, manifest: Manifest) -> None:
    """What a run's settings must fit in its dataset, checked before anything starts (here and for every
    run of a sweep): enough samples for the batch, the validation split, the stored image sizes."""
    steps_per_epoch(manifest, "train", cfg.workers, cfg.global_batch_size // cfg.workers)
    splits = ", ".join(manifest.splits)
    if cfg.model.lr_policy == "plateau" and cfg.val_split not in manifest.splits:
        raise ConfigError(
            f"lr_policy plateau follows the validation L1, but the dataset has no {cfg.val_split!r} split "
            f"(it has {splits}): choose another lr_policy or val_split"
        )
    unnamed = (TrainJobConfig.__dataclass_fields__["val_split"].default, "", "none")
    if cfg.val_split not in manifest.splits and cfg.val_split not in unnamed:
        # A dataset without the default split trains without validation, as asked with '' or none; a split
        # named on purpose and missing (a typo) would silently do the same.
        raise ConfigError(
            f"val_split {cfg.val_split!r} is not a split of the dataset (it has {splits}; '' or none: no "
            "validation)"
        )
    check_stored_size(cfg, manifest)


def check_stored_size(cfg: TrainJobConfig, manifest: Manifest) -> None:
    """With ``data.preprocess none`` the networks see the images at their stored size, which the crop_size
    checks of `validate` say nothing about: a size the generator cannot take, or a batch of native-size
    images that differ, would fail in every worker at the first step."""
    if cfg.data.preprocess != "none":
        return
    resize = manifest.config.get("resize", {})
    per_worker = cfg.global_batch_size // cfg.workers
    if resize.get("mode") == "native":
        multiple, factor = int(resize.get("multiple", 1)), size_factor(cfg.model)
        if per_worker > 1:
            raise ConfigError(
                f"data.preprocess none keeps each image's own size, and this dataset was built at native "
                f"size (sizes differ): a batch of {per_worker} per worker cannot be stacked; use a global "
                "batch of one per worker, or data.preprocess crop"
            )
        if multiple % factor:
            raise ConfigError(
                f"data.preprocess none feeds the native-size images, cut to multiples of {multiple} px, and "
                f"netG={cfg.model.netG} needs multiples of {factor}: rebuild with resize.multiple {factor}, "
                "or use data.preprocess crop"
            )
        return
    size = int(resize.get("size", 0))
    try:
        check_input_size(cfg.model, size, size)
        check_discriminator_size(cfg.model, size, size)
    except ValueError as exc:
        raise ConfigError(f"data.preprocess none trains on the stored {size}x{size} images: {exc}") from exc


def resumed_run(run_name: str, storage_uri: str, changes: dict[str, Any]) -> tuple[TrainJobConfig, str]:
    """The stopped run's recorded config with the RESUMABLE `changes` applied, and its MLflow run id. A
    change of another setting is refused; repeating its recorded value (the same command again) is not."""
    storage_uri = storage.normalize_uri(storage_uri)
    if storage.is_s3(storage_uri):
        storage.preflight(storage_uri, write=True)
    info_uri = storage.join(storage_uri, run_name, RUN_RECORD)
    try:
        info = json.loads(storage.read_bytes(info_uri))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no run {run_name!r} under {storage_uri} to resume") from exc
    # Recorded as absolute URIs (`new_run`): the same command again may give them relative.
    changes = copy.deepcopy(changes)
    if isinstance(changes.get("storage"), str):
        changes["storage"] = storage.normalize_uri(changes["storage"])
    if isinstance(changes.get("data"), dict) and isinstance(changes["data"].get("manifest"), str):
        changes["data"]["manifest"] = storage.normalize_uri(changes["data"]["manifest"])
    if isinstance(changes.get("mlflow"), dict) and changes["mlflow"].get("tracking_uri"):
        changes["mlflow"]["tracking_uri"] = tracking.absolute_sqlite(str(changes["mlflow"]["tracking_uri"]))
    given_uri = str(value_at(changes, "mlflow.tracking_uri", "") or "")
    compared = changes
    if given_uri:  # recorded without its credentials: the same URI given again is no change
        compared = merge(changes, {"mlflow": {"tracking_uri": redact(given_uri, environ={})}})
    refused = sorted(
        path
        for path in set(flat_paths(compared)) - set(TrainJobConfig.RESUMABLE)
        if value_at(compared, path) != value_at(info["config"], path)
    )
    if refused:
        raise ConfigError(
            f"--resume keeps the run's recorded settings; these cannot change: {', '.join(refused)} "
            f"(allowed: {', '.join(TrainJobConfig.RESUMABLE)}). Start a new run to change them."
        )
    cfg = from_dict(TrainJobConfig, merge(info["config"], changes))
    recorded_uri = str(info["config"]["mlflow"]["tracking_uri"])
    cfg.mlflow.tracking_uri = given_uri or tracking.recorded_with_credentials(recorded_uri)
    if not cfg.mlflow.tracking_uri:  # any other store would not have this run
        raise ConfigError(
            f"run {run_name!r} logs to {recorded_uri}, whose credentials are not recorded: give that URI "
            "again with --tracking-uri, or set MLFLOW_TRACKING_URI to it"
        )
    batch = cfg.global_batch_size
    if batch % cfg.workers:  # the global batch is the run's, kept on resume: the worker count must fit it
        fitting = ", ".join(str(n) for n in range(1, batch + 1) if batch % n == 0)
        raise ConfigError(
            f"run {run_name!r} trains at a global batch of {batch}, which --resume keeps: resume it on a "
            f"worker count that divides it ({fitting}), not {cfg.workers}"
        )
    cfg.validate()
    cfg.derive(build_to_resume_on(info.get("dataset_build"), cfg.data.manifest, run_name))
    return cfg, str(info["mlflow_run_id"])


def record_names(record_uri: str, run_id: str) -> bool:
    """Whether the run record at `record_uri` exists and names MLflow run `run_id`."""
    try:
        return bool(json.loads(storage.read_bytes(record_uri)).get("mlflow_run_id") == run_id)
    except (FileNotFoundError, ValueError, UnicodeDecodeError, AttributeError):
        return False


def build_to_resume_on(recorded: str | None, location: str, run_name: str, say: bool = True) -> Manifest:
    """The manifest of the dataset build a run started on (`recorded`), which it continues on: resuming
    on new shards would skip a different epoch's batches, or not fit the model. After a rebuild into the
    same folder, that is the manifest the build kept beside the new one while it keeps the old shards
    (`keep_replaced_hours`). Its shard paths are relative to that same folder: the run's `data.manifest`
    stays the folder's own manifest location."""
    manifest = read_manifest(location)
    if not recorded or manifest.build_id == recorded:
        return manifest
    kept = replaced_manifest_uri(location, recorded)
    try:
        old: Manifest | None = read_manifest(kept)
    except ManifestError:
        old = None
    present = dict(storage.list_file_sizes(storage.join(dataset_root(kept), "shards", recorded)))
    if (
        old is None
        or old.build_id != recorded
        or any(present.get(storage.join(dataset_root(kept), s.path)) != s.bytes for s in old.shards())
    ):
        raise ConfigError(
            f"run {run_name!r} trained on dataset build {recorded}, and {location} now holds build "
            f"{manifest.build_id}; the old build's shards are gone (a rebuild keeps them for "
            "keep_replaced_hours): start a new run on the new build"
        )
    if say:
        print(
            f"[train] {location} was rebuilt since run {run_name!r} started ({manifest.build_id} now): "
            f"continuing on its own build {recorded}, kept at {kept}",
            flush=True,
        )
    return old


def last_step(cfg: TrainJobConfig, per_epoch: int) -> int:
    """The step the run ends at: its epochs' steps, or max_steps if that comes first."""
    return cfg.epochs * per_epoch if not cfg.max_steps else min(cfg.max_steps, cfg.epochs * per_epoch)


def finished_before(cfg: TrainJobConfig, run_id: str) -> dict[str, Any] | None:
    """A resumed run whose generator is already logged at its last step: its outcome, found on the driver
    (without starting Ray Train, waiting for GPU nodes and writing one more checkpoint for nothing); None
    when there is training or logging left to do."""
    tags = tracking.client(cfg.mlflow.tracking_uri).get_run(run_id).data.tags
    logged = tags.get(LOGGED_STEP_TAG, "")
    if not logged.isdigit():
        return None
    manifest = build_to_resume_on(recorded_build(cfg), cfg.data.manifest, cfg.run_name, say=False)
    if int(logged) < last_step(cfg, steps_per_epoch(manifest, "train", cfg.workers, cfg.data.batch_size)):
        return None
    version = tags.get(LOGGED_VERSION_TAG, "")
    print(
        f"[train] run {cfg.run_name} had already finished at step {logged}: its generator is logged"
        f"{f' and registered as {cfg.mlflow.register_as} v{version}' if version else ''}; nothing left to "
        "train or log",
        flush=True,
    )
    return {
        "model_uri": tags.get(LOGGED_URI_TAG),
        "registered_version": int(version) if version else None,
        "run_name": cfg.run_name,
        "mlflow_run_id": run_id,
        "tracking_uri": cfg.mlflow.tracking_uri,
        "checkpoint": None,
        "metrics": {},
    }


def recorded_build(cfg: TrainJobConfig) -> str | None:
    """The dataset build id in the run's record (None for a record written before it held one)."""
    build = json.loads(storage.read_bytes(run_info_uri(cfg))).get("dataset_build")
    return str(build) if build else None


def check_storage_reachable(cfg: TrainJobConfig) -> None:
    """On a cluster of several nodes a plain folder as storage is each node's own disk: a worker restarted
    elsewhere, and the driver reading the final checkpoint, would not find what rank 0 wrote. Refused before
    the run is created, unless the user declares the folder shared (`storage_shared`). Counts the nodes
    alive now: a node that joins later is not seen, as any pre-flight check."""

    if storage.is_s3(cfg.storage) or cfg.storage_shared:
        return
    nodes = alive_nodes()
    if nodes > 1:
        raise ConfigError(
            f"--storage {cfg.storage} is a local folder but the Ray cluster has {nodes} nodes: checkpoints "
            "must be on storage every node sees (e.g. --storage s3://bucket/runs), or add --storage-shared "
            "if the folder is mounted on every node (NFS, ...)"
        )


def open_run(cfg: TrainJobConfig, manifest: Manifest) -> str:
    """Create the MLflow run (params, dataset) and the run record on storage; returns the MLflow run id.
    The record is what `--resume` finds: a run created without one (a start interrupted before writing it,
    or that lost the name to another start) is deleted, or, if this process was killed there, ended as
    KILLED by the next start that claims the name (`tracking.end_orphans`)."""
    client = tracking.client(cfg.mlflow.tracking_uri)
    exp_id = tracking.experiment_id(client, cfg.mlflow.experiment, cfg.mlflow.tracking_uri)
    record_uri = run_info_uri(cfg)
    tags = {"p2p.dataset_build": manifest.build_id, tracking.RECORD_TAG: record_uri}
    if cfg.mlflow.parent_run_id:
        tags["mlflow.parentRunId"] = cfg.mlflow.parent_run_id
    run = client.create_run(exp_id, run_name=cfg.run_name, tags=tags)
    run_id = str(run.info.run_id)
    try:
        tracking.log_params(client, run_id, {**dataclasses.asdict(cfg), "effective_lr": cfg.effective_lr()})
        name = dataset_root(cfg.data.manifest).rstrip("/").rsplit("/", 1)[-1]
        tracking.log_dataset_input(client, run_id, cfg.data.manifest, name, manifest.build_id)
        tracking.log_bytes(client, run_id, "dataset", "manifest.json", redact(manifest.to_json()).encode())
        recorded = dataclasses.asdict(cfg)
        recorded["mlflow"]["tracking_uri"] = redact(cfg.mlflow.tracking_uri)  # resume takes credentials anew
        info = {"config": recorded, "mlflow_run_id": run_id, "dataset_build": manifest.build_id}
        # Created only if absent: of two runs started under one name at once, the second stops here rather
        # than training into the first one's checkpoints.
        claimed = storage.create_exclusive(record_uri, json.dumps(info, indent=2).encode()) is not None
    except BaseException:
        # Interrupted (Ctrl-C, a storage or tracking error) before the record named this run: nothing could
        # resume it. (A write that failed only in its answer may have landed: that run stays.)
        with contextlib.suppress(Exception):
            if not record_names(record_uri, run_id):
                client.delete_run(run_id)
        raise
    if not claimed:
        client.delete_run(run_id)
        raise run_exists(cfg)
    tracking.end_orphans(client, exp_id, cfg.run_name, record_uri, run_id, "[train]")
    return run_id


# ----------------------------------------------------------------------------------------------------------
# 2. Workers: the training loop
# ----------------------------------------------------------------------------------------------------------


def new_training_step(cfg: TrainJobConfig, device: torch.device, wrap: Any = None) -> TrainingStep:
    """G and D initialised from `cfg.seed`: the same weights from run to run (a sweep's seeds mean
    something) and on every rank."""
    torch.manual_seed(cfg.seed)
    return TrainingStep(cfg.model, device, wrap=wrap)


def distributed_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def validate(
    step: Any, cfg: TrainJobConfig, loader: Iterable[dict[str, Any]], rank: int
) -> tuple[dict[str, float], np.ndarray | None]:
    """L1 / PSNR / SSIM over the whole validation split (each rank a disjoint part, from ``loader``), in
    eval mode; the sample grid comes from rank 0's first batch."""
    from pix2pix.metrics import metric_sums, to_unit
    from pix2pix.visualize import sample_grid

    step.G.eval()
    totals, grid = {"l1": 0.0, "psnr": 0.0, "ssim": 0.0, "count": 0.0}, None
    with torch.no_grad():
        for batch in loader:
            a = batch["A"].to(step.device, non_blocking=True)
            b = batch["B"].to(step.device, non_blocking=True)
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
    from torch.nn.parallel import DistributedDataParallel

    from pix2pix import save_checkpoint

    quiet_train_reports()
    cfg = from_dict(TrainJobConfig, config["job"])
    run_id = config["mlflow_run_id"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    nodes: list[Any] = [ray.get_runtime_context().get_node_id()]
    if world > 1:
        nodes = [None] * world
        torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    cfg.model.precision = (
        ("bf16" if device.type == "cuda" else "fp32") if cfg.precision == "auto" else cfg.precision
    )
    cfg.model.lr = cfg.effective_lr()

    def ddp(module: torch.nn.Module) -> torch.nn.Module:
        if world == 1:
            return module
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)

    step = new_training_step(cfg, device, ddp)
    state, source = newest_checkpoint(cfg, ray.train.get_checkpoint(), device)
    if state is not None:
        step.load_state_dict(state)
        console(
            f"[train] rank {rank}: resumed at step {step.step}, epoch {step.epoch}, lr {step.lr:.2e} "
            f"from {source}"
        )
    # Each rank its own dropout/augmentation stream, reproducible from the resume point.
    torch.manual_seed(cfg.seed + 1000 * rank + step.step)

    # Its own build, also when restarted after a rebuild of the folder (the build keeps the old manifest).
    # (The driver said so on --resume.)
    manifest = build_to_resume_on(config["dataset_build"], cfg.data.manifest, cfg.run_name, say=False)
    per_epoch = steps_per_epoch(manifest, "train", world, cfg.data.batch_size)
    has_val = cfg.val_split in manifest.splits
    mlflow = tracking.client(tracking.on_worker(cfg.mlflow.tracking_uri)) if rank == 0 else None
    logged: dict[str, int] = {}  # metric -> last step an earlier attempt logged
    if mlflow is not None:
        mlflow.set_tag(run_id, "p2p.worker_nodes", json.dumps(nodes))  # this attempt's placement, by rank
        console(f"[train] {world} worker(s) on {len(set(nodes))} node(s): {', '.join(n[:8] for n in nodes)}")
        logged = tracking.last_logged_steps(mlflow, run_id)  # {} on a new run's first attempt
        if state is not None:  # where each attempt (a restart, a --resume) picked the run up
            mlflow.log_batch(run_id, metrics=tracking.metric_list({"resumed_at_step": step.step}, step.step))

    def log_metrics(values: dict[str, float], at_step: int) -> None:
        assert mlflow is not None
        fresh = {k: v for k, v in values.items() if at_step > logged.get(k, -1)}
        if fresh:
            mlflow.log_batch(run_id, metrics=tracking.metric_list(fresh, at_step))

    final_step = last_step(cfg, per_epoch)

    # One loader per run: its worker processes persist across epochs. "auto" workers: the CPUs Ray
    # reserved for this worker minus one (the training process), at least one, shared by the two
    # DataLoaders of overlapped epochs (on an H200's 16-core host, 2 × 7 fed the step better than 2 × 15);
    # none when one CPU rank's threads already keep this machine's CPUs busy (`LoaderConfig.workers`).
    # Several ranks on one machine wait for each other in every all-reduce, and a loader process fills
    # those waits: the demo's 2 CPU ranks ran 4.78 steps/s with one loader worker each, 4.34 with none.
    on_device = augments_on_device(cfg.data, device)
    loaders = 2 if cfg.data.overlaps(on_device) else 1
    alone = context.get_local_world_size() == 1
    busy = torch.get_num_threads() if device.type == "cpu" and alone else 0
    cfg.data.num_workers = cfg.data.workers(cpus=cfg.cpus_per_worker, loaders=loaders, busy_cpus=busy)
    planned = resumed_loader_workers(state, step.step % per_epoch > 0, cfg.data.num_workers)
    if planned != cfg.data.num_workers:
        console(
            f"[train] rank {rank}: resuming mid-epoch with the interrupted attempt's {planned} loader "
            f"workers (here it would be {cfg.data.num_workers}), so that the epoch's batches stay the same"
        )
        cfg.data.num_workers = planned
    loader = RunLoader(cfg.data, "train", rank, world, manifest=manifest, device_augment=on_device)
    val_loader = (
        make_eval_loader(cfg.data, cfg.val_split, rank, world, manifest=manifest, persistent=True)
        if has_val
        else None
    )
    if rank == 0:
        workers = f"{cfg.data.num_workers} loader workers"
        if len(loader.loaders) > 1:
            workers = f"2 × {cfg.data.num_workers} loader workers (epochs overlapped)"
        where = "the GPU" if on_device else "the CPU workers"
        console(
            f"[train] rank 0: {torch.get_num_threads()} torch threads, {workers}, crop/flip on {where}, "
            f"{per_epoch} steps per epoch"
        )
    # This epoch's (or stretch's) accounting, reset at its start: samples, last losses, seconds spent.
    current: dict[str, Any] = {"logged_losses": {}}
    lines = {"any": time.monotonic(), "epoch": -math.inf}  # when rank 0 last printed a progress line

    run_storage = ray.train.get_context().get_storage()
    uploads = PendingUploads()

    def report(metrics: dict[str, float], with_checkpoint: bool) -> None:
        # Every rank reports equally often (it is a barrier); only rank 0 hands over the state: serialised
        # in memory here (a consistent snapshot), written to storage by Ray's upload thread while training
        # goes on (`upload_checkpoint`).
        began = time.perf_counter()
        metrics = {**metrics, "step": step.step, "epoch": step.epoch}
        if with_checkpoint and rank == 0:
            snapshot = io.BytesIO()
            extra = {
                "mlflow_run_id": run_id,
                "preprocessing": preprocessing(cfg, manifest).to_dict(),
                "loader_workers": cfg.data.num_workers,  # the epoch's plan, for a mid-epoch resume
            }
            save_checkpoint(snapshot, step, extra=extra)
            upload = functools.partial(upload_checkpoint, cfg, run_storage, snapshot.getbuffer(), uploads)
            uploads.started()  # counted before Ray's thread can start it: no fork slips in between
            try:
                ray.train.report(
                    metrics,
                    # Ray wants a local folder to upload; the file goes straight from memory instead.
                    checkpoint=ray.train.Checkpoint.from_directory(
                        tempfile.mkdtemp(prefix="p2p-checkpoint-")
                    ),
                    checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                    checkpoint_upload_fn=upload,
                )
            except BaseException:
                uploads.finished()
                raise
        else:
            ray.train.report(metrics)
        current["checkpoint_s"] += time.perf_counter() - began

    pacer = ReportPacer(cfg.checkpoint_min_interval_s, world, device)  # see its docstring
    # Validation is paced too, counted from this attempt's start: validating CamVid's 101 val frames each
    # epoch took 6% of a 1-worker CPU loop, and epochs of a small dataset on GPUs last less than the
    # validation's own fixed costs (its loader's first batch, the sample sheet to MLflow). The plateau
    # schedule counts its patience in epochs, so it still gets every epoch's metric.
    val_pacer = ReportPacer(cfg.val_min_interval_s, world, device, since=time.monotonic())
    every_epoch = cfg.model.lr_policy == "plateau"
    last_epoch_end = final_step - final_step % per_epoch  # a max_steps run may stop mid-epoch after it

    def on_step(losses: dict[str, torch.Tensor], batch_samples: int) -> bool:
        current["losses"] = losses
        current["samples"] += batch_samples * world
        current["steps"] += 1
        if mlflow is not None and step.step % cfg.mlflow.log_every == 0:
            began = time.perf_counter()
            metrics = {f"loss_{k}": float(v) for k, v in losses.items()}  # the one host sync
            current["logged_losses"] = {k: metrics[f"loss_{k}"] for k in losses}
            metrics["samples_per_s"] = current["samples"] / (began - current["started"])
            metrics["lr"] = step.lr
            log_metrics(metrics, step.step)
            current["log_s"] += time.perf_counter() - began
        epoch_ends = step.step % per_epoch == 0 or step.step >= final_step  # its own line follows
        if rank == 0 and not epoch_ends and time.monotonic() - lines["any"] >= cfg.progress_every_s:
            # Within a long epoch: no device sync for it, so the losses are the last ones logged.
            rate = current["steps"] / max(time.perf_counter() - current["started"], 1e-9)
            label = f"epoch {step.epoch + 1}/{cfg.epochs}"
            console(progress_line(label, step.step, final_step, rate, current["logged_losses"], {}))
            lines["any"] = time.monotonic()
        if step.step >= final_step:
            return True
        every = cfg.checkpoint_every and step.step % cfg.checkpoint_every == 0 and step.step % per_epoch
        if every and pacer.due(final=False, busy=uploads.running()):
            report({k: float(v) for k, v in losses.items()}, with_checkpoint=True)
        return False

    try:
        if step.step >= final_step:
            # Nothing left to train: a finished run resumed, or a restart after the last checkpoint was
            # written but before Ray recorded it. Reported again, so that Ray's result is that checkpoint
            # (Ray's own record may lack it, or name none at all).
            current.update(checkpoint_s=0.0)
            report({}, with_checkpoint=True)
        while step.step < final_step:
            epoch = step.epoch
            done_in_epoch = step.step - epoch * per_epoch  # > 0 when resuming mid-epoch
            started = time.perf_counter()
            current.update(started=started, samples=0, steps=0, losses={}, log_s=0.0, checkpoint_s=0.0)
            uploads.before_fork(loader)
            # The loader is deterministic per (seed, epoch, rank): skipping what was trained resumes.
            stats = run_steps(
                step,
                loader.epoch(epoch),
                skip=done_in_epoch,
                max_steps=final_step - step.step,
                on_step=on_step,
            )
            if step.step < final_step and step.step % per_epoch:
                raise RuntimeError(
                    f"rank {rank}: the loader ended epoch {epoch} after {step.step - epoch * per_epoch} of "
                    f"{per_epoch} steps; every rank must run the same number of steps"
                )
            val_metrics: dict[str, float] = {}
            validate_s = 0.0
            if step.step % per_epoch == 0:  # a whole epoch ended (not a max_steps stop)
                began = time.perf_counter()
                grid = None
                final = step.step >= final_step
                last_epoch = step.step >= last_epoch_end
                if val_loader is not None and val_pacer.due(final=last_epoch or every_epoch):
                    uploads.before_fork(val_loader)
                    val_metrics, grid = validate(step, cfg, val_loader, rank)
                step.end_epoch(metric=val_metrics.get("val_l1"))
                if mlflow is not None:
                    log_metrics({**val_metrics, "epoch": step.epoch}, step.step)
                    if grid is not None:
                        mlflow.log_image(run_id, grid, artifact_file=f"samples/epoch_{step.epoch:03d}.png")
                validate_s = time.perf_counter() - began
                if pacer.due(final=final, busy=uploads.running()):
                    report(val_metrics, with_checkpoint=True)
            elif step.step >= final_step:
                report({}, with_checkpoint=True)
            seconds = time.perf_counter() - started
            if mlflow is not None:
                # Where this epoch's (or this stretch's) wall time went; data_wait_s includes the wait for
                # the first batch (loader start-up, resume skipping), step_s the queueing of the steps.
                breakdown = {
                    "time_epoch_s": seconds,
                    "time_data_wait_s": stats.first_step_s + stats.wait_s,
                    "time_first_batch_s": stats.first_step_s,
                    "time_step_s": stats.step_s,
                    "time_log_s": current["log_s"],
                    "time_checkpoint_s": current["checkpoint_s"],
                    "time_validate_s": validate_s,
                    "epoch_samples": float(current["samples"]),
                    "loader_workers": float(cfg.data.workers()),
                    "torch_threads": float(torch.get_num_threads()),
                }
                log_metrics(breakdown, step.step)
            # Every epoch's line when epochs take longer than progress_every_s; else one per interval.
            if rank == 0 and (
                step.step >= final_step or time.monotonic() - lines["epoch"] >= cfg.progress_every_s
            ):
                losses = {k: float(v) for k, v in current["losses"].items()}
                label = f"epoch {step.epoch}/{cfg.epochs}"
                console(
                    progress_line(
                        label, step.step, final_step, stats.steps / max(seconds, 1e-9), losses, val_metrics
                    )
                )
                lines["epoch"] = lines["any"] = time.monotonic()
    finally:
        loader.close()
        if val_loader is not None:
            close_loader(val_loader)


class PendingUploads:
    """Checkpoint uploads still running in Ray Train's upload thread of this process.

    A DataLoader forks its worker processes while that thread may be inside the S3 client; a lock it
    holds at that moment stays held in the child, whose own S3 client then never finishes building (seen:
    a validation loader forked during an S3 outage's retried upload hung the run). So a loader starts its
    workers (persistent: once per attempt) only when no upload is running."""

    def __init__(self) -> None:
        self._running = 0
        self._changed = threading.Condition()

    def started(self) -> None:
        with self._changed:
            self._running += 1

    def finished(self) -> None:
        with self._changed:
            self._running -= 1
            self._changed.notify_all()

    def before_fork(self, loader: RunLoader | DataLoader) -> None:
        """Wait for uploads in flight if iterating `loader` now starts worker processes."""
        if not workers_started(loader):
            self.wait()

    def running(self) -> bool:
        with self._changed:
            return self._running > 0

    def wait(self, timeout_s: float = 900.0) -> None:
        # Bounded: Ray skips a report (and its upload) when a failed rank reset the barrier; this attempt
        # is then being torn down, and must not wait here for an upload that never runs.
        with self._changed:
            if not self._changed.wait_for(lambda: self._running <= 0, timeout=timeout_s):
                console(f"[train] a checkpoint upload still runs after {timeout_s:.0f} s; going on")


def upload_checkpoint(
    cfg: TrainJobConfig,
    run_storage: Any,
    data: memoryview,
    uploads: PendingUploads,
    _local: Any,
    directory_name: str,
) -> Any:
    """Ray Train's `checkpoint_upload_fn`, in its upload thread: the serialised state written atomically
    into the run's `directory_name` (no local copy first: one write instead of two), returned as the
    checkpoint Ray registers. Ray reports checkpoints in order and waits for the last upload before the
    worker ends; a failed upload fails the attempt, which restarts from the previous checkpoint."""
    import ray.train

    try:
        uri = storage.join(cfg.storage, cfg.run_name, directory_name, CHECKPOINT_FILE)
        storage.write_bytes_atomic(uri, data)
    finally:
        uploads.finished()
    return ray.train.Checkpoint(
        f"{run_storage.experiment_fs_path}/{directory_name}", filesystem=run_storage.storage_filesystem
    )


def resumed_loader_workers(state: dict[str, Any] | None, mid_epoch: bool, default: int) -> int:
    """The DataLoader worker count to train with: ``default``, unless resuming mid-epoch from a checkpoint
    made with a count that plans the epoch differently. The count is part of the epoch's plan (shares,
    quotas, seeds; 0 and 1 plan alike), and skipping the batches already trained this epoch is right only
    with the plan they came from: a restart on a node with other CPUs would skip other samples."""
    recorded = (state or {}).get("extra", {}).get("loader_workers")
    if recorded is None or not mid_epoch or max(recorded, 1) == max(default, 1):
        return default
    return int(recorded)


def newest_checkpoint(
    cfg: TrainJobConfig, reported: Any, device: torch.device
) -> tuple[dict[str, Any] | None, str]:
    """The training state to resume from: the newer of Ray's registered checkpoint and the newest complete
    `checkpoint.pt` under the run's storage folder, with where it came from.

    Ray restores only what its checkpoint-manager snapshot lists; when that snapshot is missing or stale
    (storage was down while Ray wrote it), the checkpoints themselves are still there, and restarting at
    step 0 would repeat the run and its metric steps. A file that does not load (cut short) is skipped."""
    from pix2pix import load_checkpoint

    best: tuple[dict[str, Any] | None, str] = (None, "")
    if reported is not None:
        with reported.as_directory() as directory:
            best = (load_checkpoint(Path(directory) / CHECKPOINT_FILE, map_location=device), "Ray's snapshot")
    run_folder = storage.join(cfg.storage, cfg.run_name)
    found = [u for u in storage.list_files(run_folder) if u.endswith(f"/{CHECKPOINT_FILE}")]
    for uri in sorted(found, reverse=True):  # checkpoint_<timestamp>/ folders: newest first
        try:
            state = load_checkpoint(storage.read_bytes(uri), map_location=device)
        except (OSError, RuntimeError, ValueError, EOFError, storage.StorageError):
            continue  # incomplete or unreadable: try the next older one
        if best[0] is None or state["step"] > best[0]["step"]:
            best = (state, uri.removeprefix(run_folder).lstrip("/"))
        break
    return best


def console(line: str) -> None:
    """A line for the driver's console. Not print(): Ray Train patches print in workers to also log it,
    which shows every line twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def quiet_train_reports() -> None:
    """Ray Train logs every report call at INFO from a worker logger named by its file (so RunConfig's
    logging_config does not reach it): keep those lines in Ray's log files, off the console."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: nothing to quieten
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def progress_line(
    label: str,
    at_step: int,
    final_step: int,
    steps_per_s: float,
    losses: dict[str, float],
    val_metrics: dict[str, float],
) -> str:
    """One console progress line: where the run is, speed, ETA, losses and validation metrics."""
    eta = int((final_step - at_step) / steps_per_s) if steps_per_s > 0 else 0
    hours, minutes, seconds = eta // 3600, eta % 3600 // 60, eta % 60
    parts = [
        f"[train] {label} step {at_step}/{final_step}",
        f"{steps_per_s:.2f} steps/s",
        f"ETA {hours}h{minutes:02d}m" if hours else f"ETA {minutes}m{seconds:02d}s",
        " ".join(f"{k} {v:.3f}" for k, v in losses.items()),
        " ".join(f"{k} {v:.4g}" for k, v in val_metrics.items()),
    ]
    return "  ".join(p for p in parts if p)


def preprocessing(cfg: TrainJobConfig, manifest: Manifest) -> Preprocessing:
    """How inputs must be prepared for this model: recorded with checkpoints and the MLflow model so that
    evaluation and batch translation do exactly what training did (minus the random jitter)."""
    return Preprocessing(
        input_nc=cfg.model.input_nc,
        output_nc=cfg.model.output_nc,
        direction=cfg.data.direction,
        load_size=cfg.data.load_size,
        crop_size=cfg.data.crop_size,
        preprocess=cfg.data.preprocess,
        input_is_label_map=manifest.sample_format.input_is_label_map and cfg.data.direction == "AtoB",
        builder=manifest.builder,
        dataset_build_id=manifest.build_id,
        manifest=cfg.data.manifest,
        palette=manifest.palette if manifest.sample_format.input_is_label_map else None,
        label_remap={
            str(k): int(v) for k, v in (manifest.config.get("derive", {}).get("label_remap") or {}).items()
        }
        or None,
    )


# ----------------------------------------------------------------------------------------------------------
# 3. Driver: fit, then the model into MLflow
# ----------------------------------------------------------------------------------------------------------


def run_config(cfg: TrainJobConfig) -> Any:
    import ray.train

    filesystem, path = None, cfg.storage
    if storage.is_s3(cfg.storage):
        filesystem, path = storage.resolve(cfg.storage)
    # mypy sees Ray Train V1's RunConfig; V2 (Ray's default here) has logging_config.
    return ray.train.RunConfig(  # type: ignore[call-arg]
        name=cfg.run_name,
        storage_path=path,
        storage_filesystem=filesystem,
        failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        # Ray Train's per-report INFO lines stay in its log files; the console gets one line per epoch.
        logging_config=ray.train.LoggingConfig(log_level="WARNING"),
    )


# Tags of the training run naming the generator it logged last: the step it was trained to, its model URI
# and its registered version ("" if not registered).
LOGGED_STEP_TAG, LOGGED_URI_TAG, LOGGED_VERSION_TAG = (
    "p2p.generator_step",
    "p2p.generator_uri",
    "p2p.generator_version",
)
# Set before logging: "<step>:<versions of register_as the run had>" (`registered_before`).
LOGGING_TAG = "p2p.logging_step"


def finish_run(cfg: TrainJobConfig, run_id: str, result: Any) -> dict[str, Any]:
    """Log (and register) the final checkpoint's generator, once per trained step: resuming a run that had
    already finished trains nothing, and logging its generator again would register an identical new
    version. A run that finished training but failed to log (registry down) logs on its resume."""
    from mlflow.entities import RunTag

    from pix2pix import load_checkpoint
    from pix2pix.inference import generator_from_state

    if result.checkpoint is None:
        raise RuntimeError("training ended without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        state = load_checkpoint(Path(directory) / CHECKPOINT_FILE)
    client = tracking.client(cfg.mlflow.tracking_uri)
    tags = client.get_run(run_id).data.tags
    if tags.get(LOGGED_STEP_TAG) == str(state["step"]):
        version = tags.get(LOGGED_VERSION_TAG, "")
        console(
            f"[train] run {cfg.run_name} had already finished at step {state['step']}: its generator is "
            f"logged{f' and registered as {cfg.mlflow.register_as} v{version}' if version else ''}; "
            "nothing left to train or log"
        )
        return {
            "model_uri": tags.get(LOGGED_URI_TAG),
            "registered_version": int(version) if version else None,
        }
    name = cfg.mlflow.register_as
    earlier = registered_before(client, name, run_id, tags.get(LOGGING_TAG), state["step"]) if name else None
    if earlier is not None:  # an interrupted finish registered this step but did not get to record it
        model_uri, version = str(earlier.source), str(earlier.version)
        console(f"[train] run {cfg.run_name}: step {state['step']} was registered as {name} v{version}")
    else:
        # Recorded first: a finish interrupted between registering and the tags below is then found again.
        mine = len(client.search_model_versions(f"name='{name}' and run_id='{run_id}'")) if name else 0
        client.set_tag(run_id, LOGGING_TAG, f"{state['step']}:{mine}")
        generator, model_cfg = generator_from_state(state)
        # As the workers recorded it with the checkpoint, from the build they trained on (which a rebuild of
        # the folder may have replaced since, or removed).
        with_state = state.get("extra", {}).get("preprocessing")
        recorded = (
            Preprocessing.from_dict(with_state)
            if isinstance(with_state, dict)
            else preprocessing(cfg, read_manifest(cfg.data.manifest))
        )
        info = log_generator(generator, model_cfg, recorded, run_id, cfg.mlflow.tracking_uri, name)
        model_uri, version = info.model_uri, getattr(info, "registered_model_version", None)
    logged = {
        LOGGED_STEP_TAG: state["step"],
        LOGGED_URI_TAG: model_uri,
        LOGGED_VERSION_TAG: version or "",
    }
    client.log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in logged.items()])
    return {"model_uri": model_uri, "registered_version": int(version) if version else None}


def registered_before(client: Any, name: str, run_id: str, intent: str | None, step: int) -> Any:
    """The model version that an interrupted `finish_run` of this run's ``step`` registered, or None.
    ``intent`` is the LOGGING_TAG it set first: the step and how many versions of ``name`` the run had
    then, so that a version made since is that finish's, whatever the clocks (MLflow numbers versions)."""
    if not intent or intent.split(":")[0] != str(step):
        return None
    had = int(intent.split(":")[1])
    versions = sorted(
        client.search_model_versions(f"name='{name}' and run_id='{run_id}'"), key=lambda v: int(v.version)
    )
    return versions[-1] if len(versions) > had else None


def worker_config(cfg: TrainJobConfig, run_id: str, build_id: str) -> dict[str, Any]:
    """What every training worker receives (Ray's train_loop_config, which Ray may log): the job's config
    with the tracking URI stripped of credentials (`tracking.for_workers`; workers authenticate with
    MLflow's variables, which `tracking.export_credentials` set on the driver), the MLflow run id and the
    dataset build the run trains on (a restart finding another build stops instead)."""
    job = dataclasses.asdict(cfg)
    job["mlflow"]["tracking_uri"] = tracking.for_workers(cfg.mlflow.tracking_uri)
    return {"job": job, "mlflow_run_id": run_id, "dataset_build": build_id}


class DriverLock(BuildLock):
    """One driver per run, held from before training until the generator is logged: two drivers of one run
    (a `--resume` while the first still runs, its terminal gone; two sweeps of one name) would train into
    one checkpoint folder, prune each other's checkpoints and log every step twice into one MLflow run.
    The build lock's machinery (`pipelines.dataset.lock`: exclusive create, heartbeat); a stale one, left
    by a driver that died, is taken over."""

    BUSY = (
        "run folder {output} has a driver running: {holder}; stop that one (Ctrl-C there) or let it finish "
        "(lock {uri})"
    )
    LABEL = "[train]"


def run_training(
    cfg: TrainJobConfig, resume: str | None = None, wait_for_driver: bool = False
) -> dict[str, Any]:
    """Train a new run (`resume=None`), or continue the run whose config `resumed_run` returned, with its
    MLflow run id as `resume`. ``wait_for_driver``: wait while another driver holds the run (a sweep's
    retried trial, whose killed attempt on another node leaves a lock that goes stale within its TTL)
    instead of failing at once."""

    manifest: Manifest | None = None
    if resume is None:
        cfg, manifest = new_run(cfg)
    elif (outcome := finished_before(cfg, str(resume))) is not None:
        return outcome
    tracking.export_credentials(cfg.mlflow.tracking_uri)  # before Ray starts: local workers inherit it
    init_ray()
    check_storage_reachable(cfg)
    gpus = cluster_gpus()
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else gpus >= cfg.workers
    check_cluster_fits(cfg.workers, cfg.cpus_per_worker, use_gpu)
    if cfg.precision == "fp16" and not use_gpu:
        raise ConfigError("precision fp16 needs GPU workers: fp32 or bf16 on CPUs (or --set use_gpu=true)")
    # Only now, when the run can start, is its MLflow run created.
    run_id = open_run(cfg, manifest) if manifest is not None else str(resume)
    # A resumed run's build: the one in its record (checked there by `resumed_run`), whatever the folder
    # holds now.
    build_id = (
        manifest.build_id
        if manifest is not None
        else recorded_build(cfg) or read_manifest(cfg.data.manifest).build_id
    )
    client = tracking.client(cfg.mlflow.tracking_uri)
    with DriverLock(storage.join(cfg.storage, cfg.run_name), LockConfig(wait_for_driver, break_lock=True)):
        return _train_and_finish(cfg, run_id, build_id, use_gpu, client)


def checkpoint_uri(cfg: TrainJobConfig, path: str) -> str:
    """A Ray checkpoint's path as a URI the other verbs take: Ray gives it relative to its pyarrow
    filesystem, `bucket/runs/...` on S3, which read as a local path."""
    return f"s3://{path}" if storage.is_s3(cfg.storage) and not path.startswith("s3://") else path


def _train_and_finish(
    cfg: TrainJobConfig, run_id: str, build_id: str, use_gpu: bool, client: Any
) -> dict[str, Any]:
    """`run_training`'s part under the run's driver lock: fit, then log (and register) the generator."""
    import ray.train

    client.update_run(run_id, status="RUNNING")
    print(
        f"[train] run {cfg.run_name}: {cfg.workers} {'GPU' if use_gpu else 'CPU'} workers, global batch "
        f"{cfg.global_batch_size}, MLflow run {run_id} at {redact(cfg.mlflow.tracking_uri)}",
        flush=True,
    )
    trainer = interruptible_trainer(
        train_loop_per_worker,
        train_loop_config=worker_config(cfg, run_id, build_id),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
            placement_strategy=cfg.placement_strategy,
        ),
        run_config=run_config(cfg),
    )
    stopped = (
        f"run {cfg.run_name} stopped; p2p train --resume {cfg.run_name} --storage {cfg.storage} "
        "continues it (from its last checkpoint, if it wrote one)"
    )
    with tracking.failed_or_killed(client, run_id, trainer.interrupted, stopped):
        result = trainer.fit()
        outcome = finish_run(cfg, run_id, result)
    client.set_terminated(run_id, status="FINISHED")
    outcome.update(
        run_name=cfg.run_name,
        mlflow_run_id=run_id,
        tracking_uri=cfg.mlflow.tracking_uri,
        checkpoint=checkpoint_uri(cfg, result.checkpoint.path) if result.checkpoint else None,
        metrics=result.metrics,
    )
    registered = (
        f"; registered {cfg.mlflow.register_as} v{outcome['registered_version']}"
        if cfg.mlflow.register_as
        else ""
    )
    print(f"[train] done: run {cfg.run_name}, checkpoint {outcome['checkpoint']}{registered}", flush=True)
    return outcome
