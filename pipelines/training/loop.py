"""The per-step training loop over a loader, without Ray: what a Ray Train worker runs each epoch.

    stats = run_steps(step, make_train_loader(cfg.data, "train", rank, world, epoch),
                      skip=done_in_epoch, max_steps=final_step - step.step, on_step=log_and_checkpoint)

On CUDA the next batch is copied to the device on a side stream while the current step computes (the
loader pins its batches, so these copies are truly asynchronous), and nothing waits for the device between
steps: losses stay device tensors until a callback converts them (`float(v)`), which is where logging pays
for its synchronisation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from pix2pix import TrainingStep

# on_step(losses, batch_samples) after every step (the last one included); return True to stop early.
OnStep = Callable[[dict[str, torch.Tensor], int], bool | None]


@dataclass
class LoopStats:
    steps: int  # training steps run
    samples: int  # samples in those steps (this rank's)
    seconds: float  # wall time, loader start and the final device synchronisation included
    first_step_s: float  # wall time until the first step was queued (loader start-up, skipped batches)


def device_batches(
    batches: Iterable[dict[str, Any]], device: torch.device, prefetch: bool = True
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) of each batch on ``device``. With ``prefetch`` on CUDA, batch k+1's host→device copy is queued
    on a side stream before batch k is handed out, so it overlaps batch k's step."""
    if device.type != "cuda" or not prefetch:
        for batch in batches:
            yield (
                batch["A"].to(device, non_blocking=True),
                batch["B"].to(device, non_blocking=True),
            )
        return
    copy_stream = torch.cuda.Stream(device)

    def start_copy(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.cuda.stream(copy_stream):
            return batch["A"].to(device, non_blocking=True), batch["B"].to(device, non_blocking=True)

    iterator = iter(batches)
    first = next(iterator, None)
    pending = None if first is None else start_copy(first)
    while pending is not None:
        compute = torch.cuda.current_stream(device)
        compute.wait_stream(copy_stream)
        for tensor in pending:
            tensor.record_stream(compute)  # the allocator must not reuse them before the step is done
        ready = pending
        upcoming = next(iterator, None)
        pending = None if upcoming is None else start_copy(upcoming)
        yield ready


def run_steps(
    step: TrainingStep,
    batches: Iterable[dict[str, Any]],
    *,
    skip: int = 0,
    max_steps: int | None = None,
    on_step: OnStep | None = None,
    prefetch: bool = True,
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
    first_step_s = 0.0
    if max_steps is None or max_steps > 0:
        for a, b in device_batches(iterator, step.device, prefetch):
            if steps == 0:
                first_step_s = time.perf_counter() - started
            losses = step(a, b)
            steps += 1
            samples += int(a.shape[0])
            if on_step is not None and on_step(losses, int(a.shape[0])):
                break
            if max_steps is not None and steps >= max_steps:
                break
    if step.device.type == "cuda":
        torch.cuda.synchronize(step.device)
    return LoopStats(steps, samples, time.perf_counter() - started, first_step_s)
