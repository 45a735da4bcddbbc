"""The Ray-free training loop: skip / max_steps / early stop, and the CUDA prefetch changing no numbers."""

from __future__ import annotations

import time

import pytest
import torch

from pipelines.training.loader import crop_flip
from pipelines.training.loop import ReportPacer, run_steps
from pipelines.training.train import TrainJobConfig, new_training_step
from pix2pix import Pix2PixConfig, TrainingStep

SMALL = {"netG": "unet", "unet_downs": 5, "ngf": 8, "ndf": 8}  # 32 px inputs


def batches(count: int, size: int = 32) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        {"A": torch.rand(2, 3, size, size, generator=gen) * 2 - 1, "B": torch.rand(2, 3, size, size) * 2 - 1}
        for _ in range(count)
    ]


def test_run_steps_skips_stops_and_counts() -> None:
    torch.manual_seed(0)
    step = TrainingStep(Pix2PixConfig(**SMALL))
    seen: list[float] = []
    stats = run_steps(
        step, batches(6), skip=1, max_steps=3, on_step=lambda losses, n: seen.append(n) and None
    )
    assert (stats.steps, stats.samples, step.step) == (3, 6, 3)
    assert seen == [2, 2, 2]
    assert stats.seconds >= stats.first_step_s > 0

    stats = run_steps(step, batches(6), on_step=lambda losses, n: float(losses["g_total"]) > 0)
    assert stats.steps == 1  # the callback asked to stop


def _trained_weights(device: str, prefetch: bool) -> torch.Tensor:
    torch.manual_seed(0)
    step = TrainingStep(Pix2PixConfig(**SMALL, channels_last=True), device=device)
    data = batches(4)
    if device == "cuda":
        data = [{k: v.pin_memory() for k, v in b.items()} for b in data]
    run_steps(step, data, prefetch=prefetch)
    return torch.cat([p.detach().flatten().cpu() for p in step.G.parameters()])


def test_prefetch_changes_no_numbers_on_cpu() -> None:
    assert torch.equal(_trained_weights("cpu", True), _trained_weights("cpu", False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_prefetch_changes_no_numbers() -> None:
    torch.backends.cudnn.deterministic = True
    try:
        # A copy racing the step would give garbage, not rounding differences.
        with_prefetch, without = _trained_weights("cuda", True), _trained_weights("cuda", False)
        assert torch.allclose(with_prefetch, without, rtol=0, atol=1e-5)
    finally:
        torch.backends.cudnn.deterministic = False


def raw_batches(count: int) -> list[dict[str, torch.Tensor]]:
    """Device-augmenting loader batches: uint8 36 px images with (top, left, 32, flip) crops."""
    gen = torch.Generator().manual_seed(2)
    out = []
    for _ in range(count):
        crops = torch.stack(
            [torch.randint(0, 5, (2,), generator=gen), torch.randint(0, 5, (2,), generator=gen)], dim=1
        )
        crops = torch.cat([crops, torch.full((2, 1), 32), torch.tensor([[0], [1]])], dim=1)
        images = [torch.randint(0, 256, (2, 36, 36, 3), generator=gen, dtype=torch.uint8) for _ in "AB"]
        out.append({"A": images[0], "B": images[1], "crop": crops})
    return out


def _weights_from(device: str, data: list[dict[str, torch.Tensor]], prefetch: bool = True) -> torch.Tensor:
    torch.manual_seed(0)
    step = TrainingStep(Pix2PixConfig(**SMALL, channels_last=True), device=device)
    run_steps(step, data, prefetch=prefetch)
    return torch.cat([p.detach().flatten().cpu() for p in step.G.parameters()])


def test_uint8_batches_are_cropped_on_the_device_like_float_batches() -> None:
    raw = raw_batches(3)
    cropped = [{k: crop_flip(b[k], b["crop"], 32) for k in "AB"} for b in raw]
    assert torch.equal(_weights_from("cpu", raw), _weights_from("cpu", cropped))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_crop_flip_and_prefetch_of_uint8_batches() -> None:
    raw = raw_batches(3)
    for batch in raw:
        on_gpu = crop_flip(batch["A"].cuda(), batch["crop"].cuda(), 32)
        assert torch.equal(on_gpu.cpu(), crop_flip(batch["A"], batch["crop"], 32))
    pinned = [{k: v.pin_memory() for k, v in b.items()} for b in raw]
    torch.backends.cudnn.deterministic = True
    try:
        with_prefetch, without = _weights_from("cuda", pinned, True), _weights_from("cuda", pinned, False)
        assert torch.allclose(with_prefetch, without, rtol=0, atol=1e-5)
    finally:
        torch.backends.cudnn.deterministic = False


def test_reports_are_paced_but_the_final_one_always_goes() -> None:
    """One process (no group): the first candidate reports, later ones only once the interval has passed
    and nothing is still being written; the final one in any case."""
    pacer = ReportPacer(min_interval_s=0.2, world=1, device=torch.device("cpu"))
    assert pacer.due(final=False)  # the first
    assert not pacer.due(final=False)  # too soon
    assert pacer.due(final=True)  # the last, however soon
    time.sleep(0.25)
    assert not pacer.due(final=False, busy=True)  # the previous upload still runs
    assert pacer.due(final=False)
    every = ReportPacer(min_interval_s=0.0, world=1, device=torch.device("cpu"))
    assert all(every.due(final=False) for _ in range(3))
    counted_from_start = ReportPacer(3600, world=1, device=torch.device("cpu"), since=time.monotonic())
    assert not counted_from_start.due(final=False)  # the first interval starts at `since`
    assert counted_from_start.due(final=True)


def test_a_runs_initial_weights_follow_its_seed_not_the_process() -> None:
    """G and D were built before the job seeded torch: each run started from the process's random seed."""
    cfg = TrainJobConfig(model=Pix2PixConfig(netG="unet_128", ngf=8, ndf=8))

    def weights(process_seed: int) -> list[torch.Tensor]:
        torch.manual_seed(process_seed)  # what a fresh worker process would have
        step = new_training_step(cfg, torch.device("cpu"))
        return [p.detach().clone() for p in [*step.G.parameters(), *step.D.parameters()]]

    first, again = weights(123), weights(456)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    cfg.seed = 1
    assert not all(torch.equal(a, b) for a, b in zip(first, weights(123), strict=True))
