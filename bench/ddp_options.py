"""Which DistributedDataParallel options pay for the pix2pix step? Samples/s per option set, printed as JSON.

    python -m bench.ddp_options [--workers 2] [--size 128] [--batch 2] [--steps 10] [--rounds 3]

`--workers` processes form a gloo group on this machine (CPU; NCCL needs a GPU per process) and train
`TrainingStep` (unet_128, ngf/ndf 32, as `bench.train_throughput`) on synthetic batches with G and D wrapped
in DDP, as `p2p train` wraps them, under each option set:

- ``default``: what `p2p train` uses (25 MB gradient buckets, buffers broadcast every forward);
- ``bucket_view``: ``gradient_as_bucket_view=True`` (gradients live in the all-reduce buckets: one copy
  fewer per step, and less memory);
- ``bucket_100mb``: ``bucket_cap_mb=100`` (fewer, larger all-reduces; less overlap with the backward);
- ``static_graph``: ``static_graph=True`` (DDP records the first iteration's graph and skips the per-step
  search for unused parameters);
- ``no_ddp``: each process trains alone (no gradient all-reduce): the bound DDP cannot beat.

Each option set runs in fresh processes; every round measures all of them in turn (so that drifts of the
machine's speed hit each alike), each the median of 3 windows of ``--steps`` steps after a warm-up; the
JSON gives each one's median over the rounds and its ratio to ``default`` from this run. One torch thread
per process when the processes fill the cores (as Ray gives a training worker its CPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from pix2pix import Pix2PixConfig, TrainingStep

MODEL: dict[str, Any] = {"netG": "unet_128", "ngf": 32, "ndf": 32}
OPTIONS: dict[str, dict[str, Any] | None] = {
    "default": {},
    "bucket_view": {"gradient_as_bucket_view": True},
    "bucket_100mb": {"bucket_cap_mb": 100},
    "static_graph": {"static_graph": True},
    "no_ddp": None,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker(rank: int, world: int, port: int, name: str, args: argparse.Namespace, out: Any) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    options = OPTIONS[name]
    if options is not None:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        return module if options is None else DistributedDataParallel(module, **options)

    torch.manual_seed(0)
    step = TrainingStep(Pix2PixConfig(**MODEL), "cpu", wrap=wrap)
    gen = torch.Generator().manual_seed(rank)
    a = torch.rand(args.batch, 3, args.size, args.size, generator=gen) * 2 - 1
    b = torch.rand(args.batch, 3, args.size, args.size, generator=gen) * 2 - 1
    for _ in range(3):
        step(a, b)
    windows = []
    for _ in range(3):
        began = time.perf_counter()
        for _ in range(args.steps):
            step(a, b)
        windows.append(time.perf_counter() - began)
    rate = args.batch * args.steps / statistics.median(windows)
    if options is not None:
        dist.destroy_process_group()
    out.put((rank, rate))


def measure(name: str, args: argparse.Namespace) -> float:
    """Samples/s summed over the processes, under one option set."""
    context = mp.get_context("spawn")
    out = context.Queue()
    port = free_port()
    procs = [
        context.Process(target=worker, args=(rank, args.workers, port, name, args, out))
        for rank in range(args.workers)
    ]
    for p in procs:
        p.start()
    rates = [out.get(timeout=600)[1] for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"{name}: a worker exited with {p.exitcode}")
    return sum(rates)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2, help="samples per step per process")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed window")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=list(OPTIONS), default=list(OPTIONS))
    args = parser.parse_args()
    rates: dict[str, list[float]] = {name: [] for name in args.only}
    for round_ in range(args.rounds):
        for name in args.only:
            rates[name].append(measure(name, args))
            print(f"round {round_ + 1}: {name} {rates[name][-1]:.2f} samples/s", file=sys.stderr, flush=True)
    median = {name: statistics.median(values) for name, values in rates.items()}
    base = median.get("default")
    result = {
        "bench": "ddp_options",
        "backend": "gloo",
        "device": "cpu",
        "workers": args.workers,
        "cpu_count": os.cpu_count(),
        "model": MODEL,
        "size": args.size,
        "batch_per_worker": args.batch,
        "samples_per_s": {name: round(v, 2) for name, v in median.items()},
        "samples_per_s_per_round": {name: [round(v, 2) for v in values] for name, values in rates.items()},
        "ratio_to_default": {name: round(v / base, 3) for name, v in median.items()} if base else None,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
