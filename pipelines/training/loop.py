"""The per-step training loop over a loader, without Ray: what a Ray Train worker runs each epoch.

    loader = RunLoader(cfg.data, "train", rank, world, manifest=manifest)  # once per run
    stats = run_steps(step, loader.epoch(epoch), skip=done_in_epoch, max_steps=final_step - step.step,
                      on_step=log_and_checkpoint)

On CUDA each batch is copied to the device on a side stream (the loader pins its batches, so the copy is
truly asynchronous) as soon as the loop asks for it, which is right after the previous step was queued:
the copy overlaps that step's kernels, and no step ever waits for a later batch to arrive. Batches of a
device-augmenting loader (uint8 with a "crop" entry) are cropped, flipped and converted there too
(`pipelines.training.loader.crop_flip`). Nothing waits for the device between steps: losses stay device
tensors until a callback converts them (`float(v)`), which is where logging pays for its synchronisation.

`LoopStats` says where the wall time went (waiting for batches, in the step, in the callback), so that a
caller can report it; on a GPU the step time is only the time to queue it, the device's share ends up in
the next synchronisation (a logging callback's float(), or the final one).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from pipelines.training.loader import crop_flip
from pix2pix import TrainingStep

# on_step(losses, batch_samples) after every step (the last one included); return True to stop early.
OnStep = Callable[[dict[str, torch.Tensor], int], bool | None]


@dataclass
class LoopStats:
    steps: int  # training steps run
    samples: int  # samples in those steps (this rank's)
    seconds: float  # wall time, loader start and the final device synchronisation included
    first_step_s: float  # wall time until the first batch was ready, before its step (loader start, skips)
    wait_s: float = 0.0  # waiting for batches (and copying them) after the first step
    step_s: float = 0.0  # in the step (on a GPU: queueing it)
    callback_s: float = 0.0  # in on_step (logging, checkpoints)


def to_device(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one batch on ``device``, as the model's float inputs (cropped there if the batch asks)."""
    a = batch["A"].to(device, non_blocking=True)
    b = batch["B"].to(device, non_blocking=True)
    if "crop" in batch:
        crops = batch["crop"]
        size = int(crops[0, 2])  # a host tensor: no synchronisation
        crops = crops.to(device, non_blocking=True)
        a, b = crop_flip(a, crops, size), crop_flip(b, crops, size)
    return a, b


def device_batches(
    batches: Iterable[dict[str, Any]], device: torch.device, prefetch: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) of each batch on ``device``. With ``prefetch`` on CUDA, each batch is copied (and cropped) on
    a side stream, so the copy overlaps the step queued before it; the compute stream waits for it.

    Off by default: pinned memory and non_blocking copies already overlap the transfer with the step. Its
    only measurements (bench/gpu_check on an H100 and an H200: 590 and 549 samples/s with it, 1,847 and
    1,564 without) came from runs in which it went first on the device-cropped layout and so also paid a
    compiled step's second compile; whether it pays is open."""
    if device.type != "cuda" or not prefetch:
        for batch in batches:
            yield to_device(batch, device)
        return
    copy_stream = torch.cuda.Stream(device)
    for batch in batches:
        compute = torch.cuda.current_stream(device)
        with torch.cuda.stream(copy_stream):
            ready = to_device(batch, device)
        compute.wait_stream(copy_stream)
        for tensor in ready:
            tensor.record_stream(compute)  # the allocator must not reuse them before the step is done
        yield ready


def run_steps(
    step: TrainingStep,
    batches: Iterable[dict[str, Any]],
    *,
    skip: int = 0,
    max_steps: int | None = None,
    on_step: OnStep | None = None,
    prefetch: bool = False,
) -> LoopStats:
    """Run ``step`` on the batches (dicts with "A" and "B", as `pipelines.training.loader` yields them).

    ``skip``: batches to pass over first without training (resuming mid-epoch on a deterministic loader).
    ``max_steps``: stop after this many steps (None: until the batches end). ``on_step`` is called after
    each step; returning True stops the loop. The device is synchronised once, at the end."""
    started = time.perf_counter()
    iterator = iter(batches)
    for _ in range(skip):
        if next(iterator, None) is None:
            break
    steps = samples = 0
    first_step_s = wait_s = step_s = callback_s = 0.0
    if max_steps is None or max_steps > 0:
        now = time.perf_counter()
        for a, b in device_batches(iterator, step.device, prefetch):
            got = time.perf_counter()
            if steps == 0:
                first_step_s = got - started
            else:
                wait_s += got - now
            losses = step(a, b)
            stepped = time.perf_counter()
            step_s += stepped - got
            steps += 1
            samples += int(a.shape[0])
            stop = on_step is not None and on_step(losses, int(a.shape[0]))
            now = time.perf_counter()
            callback_s += now - stepped
            if stop or (max_steps is not None and steps >= max_steps):
                break
    if step.device.type == "cuda":
        torch.cuda.synchronize(step.device)
    seconds = time.perf_counter() - started
    return LoopStats(steps, samples, seconds, first_step_s, wait_s, step_s, callback_s)


class ReportPacer:
    """Whether a run reports a checkpoint to Ray Train now: always the final one, the others at least
    `min_interval_s` apart and not while the previous one is still being written (`busy`). The first
    candidate is due, unless `since` (a `time.monotonic()`) starts the first interval. (`p2p train` paces
    its validations with one too.)

    Ray Train's controller takes one report per worker each time it polls (every 2 s), through a queue of
    one: a rank reporting faster blocks in `report` until then, and every other rank with it in the next
    all-reduce (2 CPU workers on 4-step epochs: 2 steps/s instead of 21), while asynchronous uploads queue
    behind each other, each holding its state in memory. Rank 0 decides for all (one scalar broadcast per
    call, so every rank must call it at the same points), since every rank must call `report` alike."""

    def __init__(
        self, min_interval_s: float, world: int, device: torch.device, since: float = -float("inf")
    ) -> None:
        self.min_interval_s, self.world, self.device = min_interval_s, world, device
        self.last = since  # time.monotonic() of the last report

    def due(self, final: bool, busy: bool = False) -> bool:
        due = final or (time.monotonic() - self.last >= self.min_interval_s and not busy)
        if self.world > 1:
            decision = torch.tensor([float(due)], device=self.device)
            torch.distributed.broadcast(decision, src=0)
            due = bool(decision.item())
        if due:
            self.last = time.monotonic()
        return due
