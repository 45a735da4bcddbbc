"""Checkpoints: exact round trips, schedule continuation, architecture checks, inference helper."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from pix2pix import (
    ArchitectureMismatch,
    Pix2PixConfig,
    TrainingStep,
    load_checkpoint,
    load_generator,
    restore_training_step,
    save_checkpoint,
    translate,
)
from pix2pix.training import load_optimizer_state

CFG = {
    "netG": "unet",
    "unet_downs": 6,
    "ngf": 8,
    "ndf": 8,
    "lr_policy": "linear",
    "n_epochs": 1,
    "n_epochs_decay": 4,
}


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(42)
    return [
        (torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, torch.rand(2, 3, 64, 64, generator=g) * 2 - 1)
        for _ in range(n)
    ]


def run_epochs(step: TrainingStep, data: list, epochs: int) -> list[float]:
    lrs = []
    for _ in range(epochs):
        for a, b in data:
            step(a, b)
        step.end_epoch()
        lrs.append(step.lr)
    return lrs


def test_round_trip_gives_identical_outputs_and_continues_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = batches(2)
    original = TrainingStep(Pix2PixConfig(**CFG))
    run_epochs(original, data, 2)
    save_checkpoint(tmp_path / "ckpt.pt", original)

    # The original goes on; the RNG state it consumes is the one saved in the checkpoint.
    lrs_original = run_epochs(original, data, 2)
    restored = restore_training_step(load_checkpoint(tmp_path / "ckpt.pt"))
    assert restored.step == 4 and restored.epoch == 2
    lrs_restored = run_epochs(restored, data, 2)

    assert (
        lrs_restored == lrs_original == pytest.approx([0.4 * 2e-4, 0.2 * 2e-4])
    )  # 1 - epoch/5 after epochs 3, 4
    assert restored.step == original.step == 8
    for p, q in zip(original.G.parameters(), restored.G.parameters(), strict=True):
        assert torch.equal(p, q)  # same data, same RNG (dropout), same optimizer state → bit-identical
    for p, q in zip(original.D.parameters(), restored.D.parameters(), strict=True):
        assert torch.equal(p, q)
    x = data[0][0]
    assert torch.equal(translate(original.G, x), translate(restored.G, x))


def test_checkpoint_loads_from_bytes_and_streams() -> None:
    step = TrainingStep(Pix2PixConfig(**CFG))
    buffer = io.BytesIO()
    save_checkpoint(buffer, step, extra={"run": "abc"})
    state = load_checkpoint(buffer.getvalue())
    assert state["extra"] == {"run": "abc"}
    generator, config = load_generator(buffer.getvalue())
    assert config.ngf == 8 and not generator.training
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(translate(generator, x), translate(step.G, x))


def test_mismatched_architecture_is_refused_with_the_differences() -> None:
    state = TrainingStep(Pix2PixConfig(**CFG)).state_dict()
    other = TrainingStep(Pix2PixConfig(**{**CFG, "ngf": 16, "input_nc": 1}))
    with pytest.raises(ArchitectureMismatch, match=r"input_nc: 3 vs 1.*ngf: 8 vs 16"):
        other.load_state_dict(state)


def test_execution_options_may_change_on_restore(tmp_path: Path) -> None:
    step = TrainingStep(Pix2PixConfig(**CFG))
    save_checkpoint(tmp_path / "c.pt", step)
    restored = restore_training_step(
        load_checkpoint(tmp_path / "c.pt"), config=Pix2PixConfig(**CFG, precision="bf16", channels_last=True)
    )
    assert restored.config.precision == "bf16"


def test_a_file_that_is_not_a_checkpoint_is_rejected(tmp_path: Path) -> None:
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a pix2pix checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_test_time_dropout_is_optional() -> None:
    torch.manual_seed(0)
    generator = TrainingStep(Pix2PixConfig(**CFG)).G
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(translate(generator, x), translate(generator, x))
    assert not torch.equal(
        translate(generator, x, keep_dropout=True), translate(generator, x, keep_dropout=True)
    )
    assert generator.training  # the helper restores the module's mode


def test_optimizer_implementation_follows_the_device_not_the_checkpoint() -> None:
    saved = TrainingStep(Pix2PixConfig(**CFG))
    for opt in (saved.opt_g, saved.opt_d):
        for group in opt.param_groups:
            group["fused"] = True  # as a CUDA run with fused Adam saves it
    step = TrainingStep(Pix2PixConfig(**CFG))
    step.load_state_dict(saved.state_dict())
    assert all(g["fused"] is None for opt in (step.opt_g, step.opt_d) for g in opt.param_groups)
    step(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64))


def test_restore_with_another_layout_gives_adam_moments_the_parameters_strides(tmp_path: Path) -> None:
    """Fused Adam needs a parameter and its moments in one layout; the checkpoint's were NCHW."""
    step = TrainingStep(Pix2PixConfig(**CFG))
    step(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64))
    save_checkpoint(tmp_path / "c.pt", step)
    restored = restore_training_step(
        load_checkpoint(tmp_path / "c.pt"), config=Pix2PixConfig(**CFG, channels_last=True)
    )
    checked = 0
    for opt in (restored.opt_g, restored.opt_d):
        for param, state in opt.state.items():
            for key in ("exp_avg", "exp_avg_sq"):
                assert state[key].stride() == param.stride(), key
                checked += param.dim() == 4 and not param.is_contiguous()
    assert checked > 0  # channels_last conv weights were among them
    saved = load_checkpoint(tmp_path / "c.pt")["opt_g"]["state"][0]
    assert torch.equal(restored.opt_g.state[next(restored.G.parameters())]["exp_avg"], saved["exp_avg"])


def test_the_runs_fused_flag_is_in_force_while_the_saved_state_loads() -> None:
    """torch places each `step` by the loaded group's `fused` flag: a fused group gets it on its
    parameter's device (CUDA, for fused Adam), a non-fused one leaves it where the checkpoint put it.
    Parameters on the meta device make that placement visible on a CPU-only machine."""
    cpu_param = torch.nn.Parameter(torch.zeros(4, 3, 2, 2))
    cpu_opt = torch.optim.Adam([cpu_param])  # a CPU run: fused=None in its saved group
    cpu_param.grad = torch.ones_like(cpu_param)
    cpu_opt.step()
    saved = cpu_opt.state_dict()

    param = torch.nn.Parameter(torch.zeros(4, 3, 2, 2, device="meta"))
    opt = torch.optim.Adam([param], fused=True)
    load_optimizer_state(opt, saved, fused=True)
    assert opt.state[param]["step"].device.type == "meta"  # with the parameter, as the fused kernel needs
    assert opt.state[param]["step"].dtype == torch.float32
    assert opt.param_groups[0]["fused"] is True
    assert saved["param_groups"][0]["fused"] is None  # the caller's state is not modified


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cpu_checkpoint_resumes_on_cuda_with_fused_adam_and_another_layout(tmp_path: Path) -> None:
    """map_location="cuda" moves the RNG states too; the CPU-run Adam state must suit fused CUDA Adam."""
    torch.manual_seed(0)
    step = TrainingStep(Pix2PixConfig(**CFG))
    step(torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64))
    save_checkpoint(tmp_path / "c.pt", step)
    expected = torch.rand(3)  # drawn from the saved CPU RNG state
    restored = restore_training_step(
        load_checkpoint(tmp_path / "c.pt", map_location="cuda"),
        device="cuda",
        config=Pix2PixConfig(**CFG, channels_last=True),
    )
    assert torch.equal(torch.rand(3), expected)
    assert all(g["fused"] for opt in (restored.opt_g, restored.opt_d) for g in opt.param_groups)
    for _ in range(2):
        losses = restored(torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64))
    assert all(torch.isfinite(v) for v in losses.values())
    assert restored.step == 3
