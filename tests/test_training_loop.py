"""The Ray-free training loop: skip / max_steps / early stop, and the CUDA prefetch changing no numbers."""

from __future__ import annotations

import pytest
import torch

from pipelines.training.loop import run_steps
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
