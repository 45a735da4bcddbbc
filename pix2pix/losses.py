"""GAN objectives, the WGAN-GP gradient penalty and pix2pixHD feature matching.

All functions take discriminator outputs in the form `MultiScaleDiscriminator` returns them: one list of
stage features per scale, patch logits last. Scale losses are summed (as pix2pixHD does); with one scale
this is the paper's loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

DOutputs = list[list[torch.Tensor]]


def _logits(outputs: DOutputs) -> list[torch.Tensor]:
    return [features[-1].float() for features in outputs]  # losses in fp32 even under autocast


def discriminator_loss(mode: str, real: DOutputs, fake: DOutputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss on real pairs, loss on fake pairs). The caller halves their sum for the D update (the
    paper's "divide the objective by 2 while optimising D"); WGAN-GP keeps its own form, see `d_total`."""
    real_loss = torch.zeros((), device=real[0][-1].device)
    fake_loss = torch.zeros((), device=real[0][-1].device)
    for r, f in zip(_logits(real), _logits(fake), strict=True):
        if mode == "vanilla":
            real_loss = real_loss + F.binary_cross_entropy_with_logits(r, torch.ones_like(r))
            fake_loss = fake_loss + F.binary_cross_entropy_with_logits(f, torch.zeros_like(f))
        elif mode == "lsgan":
            real_loss = real_loss + F.mse_loss(r, torch.ones_like(r))
            fake_loss = fake_loss + F.mse_loss(f, torch.zeros_like(f))
        elif mode == "wgangp":
            real_loss = real_loss - r.mean()
            fake_loss = fake_loss + f.mean()
        elif mode == "hinge":
            real_loss = real_loss + F.relu(1.0 - r).mean()
            fake_loss = fake_loss + F.relu(1.0 + f).mean()
        else:
            raise ValueError(f"unknown gan_mode {mode!r}: choose vanilla, lsgan, wgangp or hinge")
    return real_loss, fake_loss


def d_total(mode: str, real_loss: torch.Tensor, fake_loss: torch.Tensor) -> torch.Tensor:
    # WGAN-GP's critic loss is E[D(fake)] - E[D(real)] + λ·GP; halving it would silently double λ_GP.
    return real_loss + fake_loss if mode == "wgangp" else 0.5 * (real_loss + fake_loss)


def generator_loss(mode: str, fake: DOutputs) -> torch.Tensor:
    """Generator's adversarial term. Vanilla is the non-saturating form: maximise log D(x, G(x))."""
    loss = torch.zeros((), device=fake[0][-1].device)
    for f in _logits(fake):
        if mode == "vanilla":
            loss = loss + F.binary_cross_entropy_with_logits(f, torch.ones_like(f))
        elif mode == "lsgan":
            loss = loss + F.mse_loss(f, torch.ones_like(f))
        elif mode in ("wgangp", "hinge"):
            loss = loss - f.mean()
        else:
            raise ValueError(f"unknown gan_mode {mode!r}: choose vanilla, lsgan, wgangp or hinge")
    return loss


def gradient_penalty(
    discriminator: Callable[[torch.Tensor], DOutputs],
    real_pair: torch.Tensor,
    fake_pair: torch.Tensor,
    grad_scale: float = 1.0,
) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al. 2017): E[(‖∇ D(x̂)‖₂ − 1)²] at x̂ drawn uniformly on lines between real and
    fake pairs. Built with create_graph=True so the penalty trains D. `grad_scale` is the fp16 loss scale:
    the gradient is taken of the scaled output and unscaled before the norm, so it cannot underflow.

    D here is the critic that the loss trains (`discriminator_loss`): for one sample, the mean of its
    patch logits, summed over the num_D scales as the scale losses are summed. The penalty constrains
    that function; with the sum over patches instead, its weight against the loss would grow with the
    number of patches (196, 900, 3844 at 128, 256, 512 px). The per-sample critics are summed over the
    batch, so each sample's input gradient is its own critic's: samples must not interact in D, hence
    no batch norm with WGAN-GP (`Pix2PixConfig` refuses it)."""
    alpha = torch.rand(real_pair.shape[0], 1, 1, 1, device=real_pair.device, dtype=real_pair.dtype)
    interpolated = (alpha * real_pair.detach() + (1 - alpha) * fake_pair.detach()).requires_grad_(True)
    critic = sum(logits.flatten(1).mean(1).sum() for logits in _logits(discriminator(interpolated)))
    assert isinstance(critic, torch.Tensor)
    (grads,) = torch.autograd.grad(critic * grad_scale, interpolated, create_graph=True)
    grads = grads.float() / grad_scale
    return ((grads.flatten(1).norm(2, dim=1) - 1.0) ** 2).mean()


def feature_matching_loss(real: DOutputs, fake: DOutputs) -> torch.Tensor:
    """pix2pixHD: L1 between D's intermediate features on real and fake pairs, each layer weighted by
    4/(n_layers+1) and each scale by 1/num_D. Real features are targets (detached)."""
    num_d = len(fake)
    loss = torch.zeros((), device=fake[0][-1].device)
    for real_feats, fake_feats in zip(real, fake, strict=True):
        layer_weight = 4.0 / (len(fake_feats) - 1)  # n_layers + 1 feature stages before the logits
        for r, f in zip(real_feats[:-1], fake_feats[:-1], strict=True):
            loss = loss + layer_weight / num_d * F.l1_loss(f.float(), r.detach().float())
    return loss


def reconstruction_loss(kind: str, fake: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if kind == "l1":
        return F.l1_loss(fake.float(), target.float())
    if kind == "l2":
        return F.mse_loss(fake.float(), target.float())
    raise ValueError(f"unknown rec_loss {kind!r}: choose l1 or l2")
