"""Does the loader starve the training step? End-to-end samples/s of `p2p train` from real shards (loader,
DDP and all) against the training step alone on synthetic tensors, at 1 and 2 workers, as JSON.

    python -m bench.train_throughput [--camvid DIR] [--workers 1 2] [--steps 30] [--size 128]

A ratio (end-to-end / step alone) near 1 means the data path keeps up; well below 1 means it starves
the step. The step-alone figure uses as many torch threads as each worker gets CPUs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from pix2pix import Pix2PixConfig, TrainingStep

DEFAULT_CAMVID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"
MODEL = {"netG": "unet_128", "ngf": 32, "ndf": 32}


def step_alone(batch: int, size: int, steps: int, threads: int) -> float:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        step = TrainingStep(Pix2PixConfig(**MODEL))  # type: ignore[arg-type]
        a, b = torch.rand(batch, 3, size, size) * 2 - 1, torch.rand(batch, 3, size, size) * 2 - 1
        step(a, b)
        start = time.perf_counter()
        for _ in range(steps):
            step(a, b)
        return steps * batch / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)


def build_dataset(camvid: Path, root: Path, size: int) -> str:
    from pipelines.config import from_dict
    from pipelines.dataset.build import DatasetBuildConfig, run_build

    source = root / "src"
    for sub, ext in (("images", "jpg"), ("labels", "png")):
        (source / "train" / sub).mkdir(parents=True)
        for path in sorted((camvid / "train" / sub).glob(f"*.{ext}"))[:96]:
            shutil.copy(path, source / "train" / sub)
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


def end_to_end(manifest: str, root: Path, workers: int, size: int, steps: int) -> float:
    from mlflow import MlflowClient

    from pipelines.config import from_dict
    from pipelines.training.train import TrainJobConfig, run_training

    cfg = from_dict(
        TrainJobConfig,
        {
            "data": {
                "manifest": manifest,
                "load_size": size + size // 8,
                "crop_size": size,
                "num_workers": 1,
            },
            "model": {**MODEL, "n_epochs": 100, "n_epochs_decay": 0},
            "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "log_every": 1},
            "storage": str(root / "runs"),
            "run_name": f"bench-{workers}",
            "workers": workers,
            "global_batch_size": 2 * workers,
            "cpus_per_worker": 2 / workers,
            "max_steps": steps,
            "val_split": "none",
        },
    )
    outcome = run_training(cfg)
    history = MlflowClient(cfg.mlflow.tracking_uri).get_metric_history(
        outcome["mlflow_run_id"], "samples_per_s"
    )
    # samples/s since the epoch's start at the last step: warm-up steps of each epoch are included
    return float(sorted(history, key=lambda m: m.step)[-1].value)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--camvid", type=Path, default=DEFAULT_CAMVID)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = build_dataset(args.camvid, Path(tmp), args.size)
        for workers in args.workers:
            e2e = end_to_end(manifest, Path(tmp), workers, args.size, args.steps)
            alone = step_alone(2, args.size, min(args.steps, 10), threads=max(1, 2 // workers)) * workers
            result = {
                "workers": workers,
                "per_worker_batch": 2,
                "size": args.size,
                "end_to_end_samples_per_s": round(e2e, 2),
                "step_alone_samples_per_s": round(alone, 2),
                "ratio": round(e2e / alone, 3),
            }
            results.append(result)
            print(json.dumps(result), flush=True)
    print(json.dumps({"benchmark": "train_throughput", "model": MODEL, "results": results}))


if __name__ == "__main__":
    main()
