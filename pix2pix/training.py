"""One pix2pix training step: a D update, then a G update (every `n_critic` D updates).

`TrainingStep` owns everything that changes during training (G, D, both Adam optimizers, their LR
schedules, the fp16 grad scaler, step and epoch counters) so that one `state_dict()` captures a run
exactly. Distribution is the caller's business: pass `wrap=` (e.g. a DDP constructor) and the step uses the
wrapped modules where gradients must be synchronised, while keeping the plain modules for checkpoints.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pix2pix.config import ARCHITECTURE_FIELDS, Pix2PixConfig
from pix2pix.losses import (
    d_total,
    discriminator_loss,
    feature_matching_loss,
    generator_loss,
    gradient_penalty,
    reconstruction_loss,
)
from pix2pix.networks import build_discriminator, build_generator

Scheduler = torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class ArchitectureMismatch(ValueError):
    """Raised when weights are loaded into a model built with a different architecture."""


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Pix2PixConfig) -> Scheduler:
    """Per-epoch LR schedule. linear: constant for `n_epochs`, then linearly to zero over `n_epochs_decay`
    (the paper's policy); step: ×0.1 every `lr_decay_epochs`; plateau: ×0.2 after `plateau_patience` epochs
    without improvement of the metric given to `end_epoch`; cosine: to zero over the whole run,
    `n_epochs + n_epochs_decay` (the authors' code anneals over `n_epochs` only, so that the LR climbs back
    up during the decay epochs)."""
    if cfg.lr_policy == "linear":
        hold, decay = cfg.n_epochs, cfg.n_epochs_decay

        def linear(epoch: int) -> float:
            # Clamped: past n_epochs + n_epochs_decay a negative factor would make Adam climb the loss.
            return max(0.0, 1.0 - max(0, epoch + 1 - hold) / float(decay + 1))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=linear)
    if cfg.lr_policy == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_decay_epochs, gamma=0.1)
    if cfg.lr_policy == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=0.2, threshold=0.01, patience=cfg.plateau_patience
        )
    if cfg.lr_policy == "cosine":
        total = max(1, cfg.n_epochs + cfg.n_epochs_decay)
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=0)
    raise ValueError(f"unknown lr_policy {cfg.lr_policy!r}: choose linear, step, plateau or cosine")


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any], fused: bool | None) -> None:
    """Load an Adam state saved by any run into `optimizer`, whose implementation (`fused`) and parameter
    layout are this run's, not the checkpoint's.

    The saved groups' `fused` flag is replaced before loading because `Optimizer.load_state_dict` reads it
    to place each `step` tensor: a checkpoint from a CPU or non-fused run would leave `step` on the CPU in a
    fused CUDA group, which the fused kernel refuses. Afterwards each state tensor shaped like its parameter
    (exp_avg, exp_avg_sq) takes the parameter's strides: loading keeps the checkpoint's layout, and the fused
    kernel needs one layout for a parameter and its moments (channels_last may change on restore)."""
    optimizer.load_state_dict(
        {**saved, "param_groups": [{**g, "fused": fused} for g in saved["param_groups"]]}
    )
    for param, state in optimizer.state.items():
        for key, value in list(state.items()):
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param).copy_(value)  # empty_like keeps the param's strides


def architecture_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in ARCHITECTURE_FIELDS if a.get(k) != b.get(k)]


class TrainingStep:
    def __init__(
        self,
        config: Pix2PixConfig,
        device: str | torch.device = "cpu",
        wrap: Callable[[nn.Module], nn.Module] | None = None,
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        if config.precision == "fp16" and self.device.type == "cpu":
            raise ValueError("fp16 needs a GPU; use precision='bf16' or 'fp32' on CPU")
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format

        self.G = build_generator(config).to(self.device)
        self.D = build_discriminator(config).to(self.device)
        for net in (self.G, self.D):
            net.to(memory_format=self.memory_format)  # type: ignore[call-overload]  # missing from the stubs
        g_train, d_train = (wrap(self.G), wrap(self.D)) if wrap else (self.G, self.D)
        # The G update back-propagates through D without updating it, so it uses the plain D: no gradient
        # synchronisation is owed for D there (and DDP would wait for D gradients that never come).
        d_for_g: nn.Module = self.D
        # The gradient penalty back-propagates through D's input gradient (a double backward), which
        # torch.compile's aot_autograd does not support: it uses the wrapped D, never compiled.
        self.D_penalty = d_train
        if config.compile:
            mode = None if config.compile_mode == "default" else config.compile_mode
            g_train, d_train, d_for_g = (torch.compile(m, mode=mode) for m in (g_train, d_train, d_for_g))  # type: ignore[assignment]
        self.G_train, self.D_train, self.D_for_G = g_train, d_train, d_for_g
        # CUDA graphs (modes "reduce-overhead" and "max-autotune") reuse their output memory on the next
        # replay: each step must say that a new iteration begins, or a replay that would overwrite the
        # previous step's outputs is refused as an error.
        self.cudagraphs = config.compile and config.compile_mode in ("reduce-overhead", "max-autotune")

        betas = (config.beta1, config.beta2)
        # Fused Adam updates all parameters in a few kernels instead of several per tensor; CPU keeps the
        # default implementation (same numbers up to rounding, same state_dict layout).
        self.fused_adam = True if config.fused_adam and self.device.type == "cuda" else None
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=config.lr, betas=betas, fused=self.fused_adam)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=config.lr, betas=betas, fused=self.fused_adam)
        self.sched_g = build_scheduler(self.opt_g, config)
        self.sched_d = build_scheduler(self.opt_d, config)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.step = 0  # D updates done
        self.epoch = 0  # epochs ended (LR schedule position)

    # --- the step -------------------------------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        dtype = AUTOCAST_DTYPES.get(self.config.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def __call__(self, real_a: torch.Tensor, real_b: torch.Tensor) -> dict[str, torch.Tensor]:
        """One training iteration on a batch of aligned pairs (input A, target B), both in [-1, 1].

        Returns detached scalar losses as device tensors; `g_*` entries only on iterations that update G.
        Nothing here waits for the device (no `.item()`), so a GPU step is queued while the host prepares
        the next batch: convert losses (`float(v)`) only when logging them."""
        cfg = self.config
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        # Copy first, then change the layout on the device: a layout change on the host would go through
        # pageable memory, which makes a non_blocking copy from pinned memory synchronous.
        real_a = real_a.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        real_b = real_b.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        update_g = cfg.lambda_gan == 0 or (self.step + 1) % cfg.n_critic == 0
        self.G.train()
        self.D.train()

        # Generate. Without a G update this iteration, no graph through G is needed.
        with self.autocast(), torch.set_grad_enabled(update_g):
            fake_b = self.G_train(real_a)
        if cfg.lambda_gan == 0:  # reconstruction alone: no D in the objective, nothing to train it for
            return self._reconstruction_only(fake_b, real_b)
        real_pair = torch.cat([real_a, real_b], dim=1) if cfg.conditional_D else real_b
        fake_pair = torch.cat([real_a, fake_b], dim=1) if cfg.conditional_D else fake_b
        # A 1-channel tensor counts as contiguous in both layouts, so `contiguous` above may leave it NCHW,
        # and cat takes its first input's layout: fix the pair's, so that D sees one layout whatever made
        # the batch (another layout is another graph for torch.compile).
        real_pair = real_pair.contiguous(memory_format=self.memory_format)
        fake_pair = fake_pair.contiguous(memory_format=self.memory_format)

        # D update: real pairs → 1, fake pairs → 0.
        with self.autocast():
            d_fake = self.D_train(fake_pair.detach())
            d_real = self.D_train(real_pair)
            loss_real, loss_fake = discriminator_loss(cfg.gan_mode, d_real, d_fake)
            loss_d = d_total(cfg.gan_mode, loss_real, loss_fake)
        losses = {"d_real": loss_real, "d_fake": loss_fake}
        if cfg.gan_mode == "wgangp":
            with self.autocast():
                penalty = gradient_penalty(
                    self.D_penalty,
                    real_pair,
                    fake_pair,
                    grad_scale=self.scaler.get_scale() if self.scaler.is_enabled() else 1.0,
                )
            loss_d = loss_d + cfg.lambda_gp * penalty
            losses["d_gp"] = penalty
        self.opt_d.zero_grad(set_to_none=True)
        self.scaler.scale(loss_d).backward()
        self.scaler.step(self.opt_d)
        losses["d_total"] = loss_d

        if update_g:
            self.D.requires_grad_(False)  # D gets no gradients from the G update
            with self.autocast():
                d_fake_for_g = self.D_for_G(fake_pair)
                loss_gan = generator_loss(cfg.gan_mode, d_fake_for_g)
                loss_rec = reconstruction_loss(cfg.rec_loss, fake_b, real_b)
                loss_g = cfg.lambda_gan * loss_gan + cfg.lambda_rec * loss_rec
                if cfg.lambda_feat > 0:
                    with torch.no_grad():
                        d_real_for_g = self.D_for_G(real_pair)
                    loss_feat = feature_matching_loss(d_real_for_g, d_fake_for_g)
                    loss_g = loss_g + cfg.lambda_feat * loss_feat
                    losses["g_feat"] = loss_feat
            self.opt_g.zero_grad(set_to_none=True)
            self.scaler.scale(loss_g).backward()
            self.scaler.step(self.opt_g)
            self.D.requires_grad_(True)
            losses.update(g_gan=loss_gan, g_rec=loss_rec, g_total=loss_g)

        self.scaler.update()
        self.step += 1
        return {k: v.detach() for k, v in losses.items()}

    def _reconstruction_only(self, fake_b: torch.Tensor, real_b: torch.Tensor) -> dict[str, torch.Tensor]:
        with self.autocast():
            loss_rec = reconstruction_loss(self.config.rec_loss, fake_b, real_b)
            loss_g = self.config.lambda_rec * loss_rec
        self.opt_g.zero_grad(set_to_none=True)
        self.scaler.scale(loss_g).backward()
        self.scaler.step(self.opt_g)
        self.scaler.update()
        self.step += 1
        return {"g_rec": loss_rec.detach(), "g_total": loss_g.detach()}

    # --- schedule -------------------------------------------------------------------------------------

    def end_epoch(self, metric: float | None = None) -> None:
        """Advance the LR schedules by one epoch. The plateau policy needs the validation `metric`."""
        for sched in (self.sched_g, self.sched_d):
            if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                if metric is None:
                    raise ValueError("lr_policy='plateau' needs a validation metric: end_epoch(metric=...)")
                sched.step(metric)
                continue
            with warnings.catch_warnings():
                # An epoch may end without an optimizer step (resumed at an epoch boundary, an fp16 scaler
                # skipping every step, a schedule advanced on its own): the schedule is epoch-indexed and
                # closed-form, so nothing is skipped, whatever the warning says.
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
                sched.step()
        self.epoch += 1

    @property
    def lr(self) -> float:
        return float(self.opt_g.param_groups[0]["lr"])

    # --- state ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "sched_g": self.sched_g.state_dict(),
            "sched_d": self.sched_d.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        differences = architecture_differences(state["config"], self.config.to_dict())
        if differences:
            raise ArchitectureMismatch(
                "checkpoint was saved from a different architecture (checkpoint vs this model): "
                + "; ".join(differences)
                + ". Build the model from the checkpoint's config (restore_training_step) or fix the config."
            )
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        # The checkpoint's device chose its Adam implementation and layout; this one's device does.
        load_optimizer_state(self.opt_g, state["opt_g"], self.fused_adam)
        load_optimizer_state(self.opt_d, state["opt_d"], self.fused_adam)
        self.sched_g.load_state_dict(state["sched_g"])
        self.sched_d.load_state_dict(state["sched_d"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
