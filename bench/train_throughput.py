"""Does `p2p train` keep its step busy? Samples/s of real `p2p train` runs (Ray Train, DDP, shards, MLflow,
checkpoints, validation: the product's defaults) against the training step alone on synthetic tensors in
the same configuration, with where the time went, printed as JSON.

    python -m bench.train_throughput [--camvid DIR] [--workers 1 2] [--epochs 2] [--size 128]
                                     [--loader-workers auto] [--train-samples 96] [--val-samples 16]
                                     [--batch 2] [--ngf 32]

Per worker count, from one run each, every number measured in this run on this machine:

- ``step_alone_samples_per_s``: `TrainingStep` on synthetic batches of the per-worker batch, measured in
  Ray tasks that get the CPUs each training worker gets (so the same torch threads and the same process
  priority: Ray starts its workers at niceness 15, which on a machine shared with other work slows them
  several-fold against the driver's niceness 0), one task per training worker at once, rates summed.
  With several workers the tasks form a gloo process group and G and D are wrapped in DDP, as in the
  run: the same configuration, gradient all-reduce included (``step_alone_without_ddp_samples_per_s``
  leaves it out, for the cost of DDP itself). Measured just before and just after the run, each the
  median of 3 windows; the ratio uses their mean, both are reported.
  ``step_alone_driver_samples_per_s`` is the same step in this (niceness 0) process, for reference.
- ``end_to_end_samples_per_s``: the training loop of rank 0, from its first epoch's start to its last
  epoch's end: loader start-up, waiting for data, steps, DDP, MLflow logging, checkpoints and validation
  included (the job logs this per epoch as ``time_*`` metrics; this sums them). ``ratio`` divides it by
  the step alone: the issue's target is >= 0.9.
- ``breakdown_s``: those seconds by cause; ``other`` is the loop's remainder (epoch bookkeeping).
- ``step_in_loop_samples_per_s``: the same step's rate inside the run (its ``step`` seconds; on CPU,
  where a step's time is its compute: this benchmark's workers are CPU workers), and
  ``ratio_to_step_in_loop`` the loop's share of wall time in steps: the ratio against the run's own step,
  free of the machine's drift between the measurements. On this 2-core machine the step alone, measured
  around the run, has come out both above and below the step in the run (by up to 11%, which no input,
  warm-up or process difference tried explained), so ``ratio`` can exceed 1; both are reported.
- ``run_wall_s``: the whole `run_training` call, Ray Train's start-up and the model's registration
  included (fixed costs that a real run of hours amortises), with its own ratio for reference.

The dataset is real CamVid (labels → photo), 96 training and 16 validation samples at size + size/8 px
by default: short epochs, so the per-epoch costs (checkpoint, loader start) weigh about four times what
they weigh over CamVid's whole training split (``--train-samples 367 --val-samples 101``). Validation
follows the product's default pace (`val_min_interval_s`, 30 s): in such short runs only the last epoch.
Issue 10's own setting (the paper's unet_128 with ngf 64, batch 1, 6 epochs of CamVid's whole split):
``--batch 1 --ngf 64 --epochs 6 --train-samples 367 --val-samples 101`` (about 11 minutes here).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pix2pix import Pix2PixConfig, TrainingStep

DEFAULT_CAMVID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"
NET_G = "unet_128"
BREAKDOWN = {
    "data_wait": "time_data_wait_s",
    "first_batch": "time_first_batch_s",
    "step": "time_step_s",
    "log": "time_log_s",
    "checkpoint": "time_checkpoint_s",
    "validate": "time_validate_s",
}


def model_of(ngf: int) -> dict[str, Any]:
    return {"netG": NET_G, "ngf": ngf, "ndf": ngf}


def step_alone(batch: int, size: int, steps: int, threads: int, ddp: bool = False, ngf: int = 32) -> float:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        wrap = torch.nn.parallel.DistributedDataParallel if ddp else None
        step = TrainingStep(Pix2PixConfig(**model_of(ngf)), wrap=wrap)
        a, b = torch.rand(batch, 3, size, size) * 2 - 1, torch.rand(batch, 3, size, size) * 2 - 1
        for _ in range(5):  # warm-up; DDP also builds its gradient buckets on the first steps
            step(a, b)
        rates = []
        for _ in range(3):  # the median of 3 windows: one window of a second or two swung by 50% here
            start = time.perf_counter()
            for _ in range(steps):
                step(a, b)
            rates.append(steps * batch / (time.perf_counter() - start))
        return sorted(rates)[1]
    finally:
        torch.set_num_threads(previous)


def worker_threads(workers: int) -> int:
    """Torch threads of a training worker: Ray starts its process with OMP_NUM_THREADS = its CPUs. A task
    may run in a reused process started for another CPU count, so the step alone sets them itself (left
    to the process, 2 DDP tasks measured after a 1-worker run ran 2 threads each on 2 cores: 13 samples/s
    instead of 19-20)."""
    return max(1, int(2 / workers))


def step_alone_in_ray(workers: int, batch: int, size: int, steps: int, ngf: int) -> float:
    """Summed samples/s of ``workers`` concurrent step-alone Ray tasks with a training worker's CPUs."""
    import ray

    @ray.remote(num_cpus=2 / workers)
    def measure() -> float:
        return step_alone(batch, size, steps, worker_threads(workers), ngf=ngf)

    return float(sum(ray.get([measure.remote() for _ in range(workers)])))


def step_alone_ddp_in_ray(workers: int, batch: int, size: int, steps: int, ngf: int) -> float:
    """The same, with the tasks joined in one gloo process group and G and D wrapped in DDP as in
    `p2p train`: the step of the same configuration, gradient all-reduce included."""
    import socket

    import ray

    with socket.socket() as probe:  # a free port for the rendezvous (one node)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    @ray.remote(num_cpus=2 / workers)
    def measure(rank: int) -> float:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=workers)
        try:
            return step_alone(batch, size, steps, worker_threads(workers), ddp=True, ngf=ngf)
        finally:
            dist.destroy_process_group()

    return float(sum(ray.get([measure.remote(rank) for rank in range(workers)])))


def build_dataset(camvid: Path, root: Path, size: int, train_samples: int, val_samples: int) -> str:
    from pipelines.config import from_dict
    from pipelines.dataset.build import DatasetBuildConfig, run_build

    source = root / "src"
    for split, count in (("train", train_samples), ("val", val_samples)):
        for sub, ext in (("images", "jpg"), ("labels", "png")):
            (source / split / sub).mkdir(parents=True)
            paths = sorted((camvid / split / sub).glob(f"*.{ext}"))
            if len(paths) < count:
                raise SystemExit(
                    f"{camvid / split / sub} has {len(paths)} images, fewer than the {count} asked"
                )
            for path in paths[:count]:
                shutil.copy(path, source / split / sub)
    cfg = from_dict(
        DatasetBuildConfig,
        {
            "source": {"uri": str(source), "a_dir": "labels", "b_dir": "images"},
            "output": str(root / "dataset"),
            "derive": {"builder": "labels", "palette": str(camvid / "classes.json")},
            "resize": {"size": size + size // 8},
            "shards": {"samples_per_shard": 16},
        },
    )
    run_build(cfg)
    return str(root / "dataset")


def end_to_end(
    manifest: str,
    root: Path,
    workers: int,
    batch: int,
    size: int,
    epochs: int,
    ngf: int,
    loader_workers: str = "auto",
) -> dict[str, Any]:
    from mlflow import MlflowClient

    from pipelines.config import from_dict
    from pipelines.training.train import TrainJobConfig, run_training

    cfg = from_dict(
        TrainJobConfig,
        {
            # Everything else is the product's default: num_workers auto, log_every 10, checkpoints at
            # epoch ends (at most one per 10 s), validation at most one per 30 s and at the last epoch.
            "data": {
                "manifest": manifest,
                "load_size": size + size // 8,
                "crop_size": size,
                "num_workers": loader_workers if loader_workers == "auto" else int(loader_workers),
            },
            "model": {**model_of(ngf), "n_epochs": epochs, "n_epochs_decay": 0},
            "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"},
            "storage": str(root / "runs"),
            "run_name": f"bench-{workers}",
            "workers": workers,
            "global_batch_size": batch * workers,
            "cpus_per_worker": 2 / workers,
            "use_gpu": False,  # CPU workers, as the step alone: its time is its compute
        },
    )
    began = time.perf_counter()
    outcome = run_training(cfg)
    run_wall = time.perf_counter() - began
    client = MlflowClient(cfg.mlflow.tracking_uri)
    run_id = outcome["mlflow_run_id"]

    def total(key: str) -> float:
        return sum(m.value for m in client.get_metric_history(run_id, key))

    def last(key: str) -> float | None:
        history = client.get_metric_history(run_id, key)
        return history[-1].value if history else None

    loop_s, samples = total("time_epoch_s"), total("epoch_samples")
    breakdown = {name: round(total(key), 2) for name, key in BREAKDOWN.items()}
    # first_batch is part of data_wait; the rest are disjoint.
    accounted = sum(v for k, v in breakdown.items() if k != "first_batch")
    breakdown["other"] = round(loop_s - accounted, 2)
    return {
        "epochs": epochs,
        "steps": int(samples) // (batch * workers),
        "samples": int(samples),
        "loop_s": round(loop_s, 2),
        "run_wall_s": round(run_wall, 2),
        "end_to_end_samples_per_s": samples / loop_s,
        "run_samples_per_s": samples / run_wall,
        "breakdown_s": breakdown,
        "loader_workers": last("loader_workers"),
        "torch_threads": last("torch_threads"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--camvid", type=Path, default=DEFAULT_CAMVID)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run")
    parser.add_argument("--train-samples", type=int, default=96, help="training samples (an epoch)")
    parser.add_argument("--val-samples", type=int, default=16, help="validation samples")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2, help="samples per step per worker")
    parser.add_argument("--ngf", type=int, default=32, help="G and D filters (the paper: 64)")
    parser.add_argument(
        "--loader-workers", default="auto", help="data.num_workers of the runs (default auto)"
    )
    parser.add_argument("--alone-steps", type=int, default=20, help="timed steps of the step alone")
    args = parser.parse_args()
    import ray

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = build_dataset(args.camvid, Path(tmp), args.size, args.train_samples, args.val_samples)
        for workers in args.workers:
            threads = max(1, 2 // workers)
            driver = step_alone(args.batch, args.size, args.alone_steps, threads, ngf=args.ngf) * workers
            alone_of = step_alone_in_ray if workers == 1 else step_alone_ddp_in_ray
            setting = (workers, args.batch, args.size, args.alone_steps, args.ngf)
            before = alone_of(*setting)
            e2e = end_to_end(
                manifest,
                Path(tmp),
                workers,
                args.batch,
                args.size,
                args.epochs,
                args.ngf,
                args.loader_workers,
            )
            after = alone_of(*setting)
            alone = (before + after) / 2
            no_ddp = step_alone_in_ray(*setting) if workers > 1 else alone
            validate = e2e["breakdown_s"]["validate"]
            result = {
                "workers": workers,
                "per_worker_batch": args.batch,
                "size": args.size,
                "train_samples": args.train_samples,
                "val_samples": args.val_samples,
                **e2e,
                "end_to_end_samples_per_s": round(e2e["end_to_end_samples_per_s"], 2),
                "run_samples_per_s": round(e2e["run_samples_per_s"], 2),
                "step_alone_samples_per_s": round(alone, 2),
                "step_alone_before_after": [round(before, 2), round(after, 2)],
                "step_alone_without_ddp_samples_per_s": round(no_ddp, 2),
                "step_alone_driver_samples_per_s": round(driver, 2),
                "step_alone_driver_threads": threads,
                "ratio": round(e2e["end_to_end_samples_per_s"] / alone, 3),
                "step_in_loop_samples_per_s": round(e2e["samples"] / e2e["breakdown_s"]["step"], 2),
                "ratio_to_step_in_loop": round(e2e["breakdown_s"]["step"] / e2e["loop_s"], 3),
                "ratio_without_validation": round(e2e["samples"] / (e2e["loop_s"] - validate) / alone, 3),
                "run_ratio": round(e2e["run_samples_per_s"] / alone, 3),
            }
            results.append(result)
            print(json.dumps(result), flush=True)
    model = model_of(args.ngf)
    print(json.dumps({"benchmark": "train_throughput", "model": model, "results": results}))


if __name__ == "__main__":
    main()
