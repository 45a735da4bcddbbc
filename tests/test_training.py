"""The training step: real learning on a CamVid crop, every objective, schedules, precision options."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from pix2pix import Pix2PixConfig, TrainingStep
from pix2pix.losses import discriminator_loss, gradient_penalty
from pix2pix.networks import build_discriminator

SMALL = {"netG": "unet", "unet_downs": 6, "ngf": 16, "ndf": 16}  # 64 px inputs


def camvid_pair(camvid: Path, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """One real labels → photo pair: a colour-coded label crop and the matching photo crop, in [-1, 1]."""
    key = sorted(p.stem for p in (camvid / "train" / "images").glob("*.jpg"))[0]
    photo = cv2.cvtColor(cv2.imread(str(camvid / "train" / "images" / f"{key}.jpg")), cv2.COLOR_BGR2RGB)
    ids = cv2.imread(str(camvid / "train" / "labels" / f"{key}.png"), cv2.IMREAD_UNCHANGED)
    palette = np.zeros((256, 3), np.uint8)
    for c in json.loads((camvid / "classes.json").read_text())["classes"]:
        palette[c["id"]] = c["color"]
    photo = cv2.resize(photo, (120, 90), interpolation=cv2.INTER_AREA)[13 : 13 + size, 28 : 28 + size]
    labels = palette[cv2.resize(ids, (120, 90), interpolation=cv2.INTER_NEAREST)][
        13 : 13 + size, 28 : 28 + size
    ]

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).permute(2, 0, 1)[None].float() / 127.5 - 1.0

    return tensor(labels), tensor(photo)


def eval_l1(step: TrainingStep, a: torch.Tensor, b: torch.Tensor) -> float:
    step.G.eval()
    with torch.no_grad():
        return float((step.G(a) - b).abs().mean())


@pytest.mark.slow
def test_steps_on_a_real_camvid_crop_lower_the_l1_term(camvid_dir: Path) -> None:
    torch.manual_seed(0)
    labels, photo = camvid_pair(camvid_dir)
    assert labels.unique(dim=1).shape[1] > 1  # the crop holds several classes
    step = TrainingStep(Pix2PixConfig(**SMALL))
    before = eval_l1(step, labels, photo)
    rec = [float(step(labels, photo)["g_rec"]) for _ in range(40)]
    after = eval_l1(step, labels, photo)
    assert all(np.isfinite(rec))
    assert np.mean(rec[-5:]) < 0.8 * np.mean(rec[:5])
    assert after < 0.8 * before, (before, after)
    assert step.step == 40


@pytest.mark.parametrize(
    ("gan_mode", "extra"),
    [
        ("vanilla", {}),
        ("lsgan", {}),
        ("hinge", {"num_D": 2, "lambda_feat": 10.0}),
        ("wgangp", {"norm": "instance", "n_critic": 2}),
    ],
)
def test_every_objective_updates_both_networks(gan_mode: str, extra: dict) -> None:
    torch.manual_seed(0)
    step = TrainingStep(Pix2PixConfig(**SMALL, gan_mode=gan_mode, **extra))
    g0 = [p.detach().clone() for p in step.G.parameters()]
    d0 = [p.detach().clone() for p in step.D.parameters()]
    a, b = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    first = step(a, b)
    if gan_mode == "wgangp":  # n_critic=2: the first iteration only trains the critic
        assert "g_total" not in first and "d_gp" in first
        assert all(torch.equal(p, q) for p, q in zip(g0, step.G.parameters(), strict=True))
        first = step(a, b)
    assert "g_total" in first
    assert all(torch.isfinite(v) for v in first.values())
    assert any(not torch.equal(p, q) for p, q in zip(g0, step.G.parameters(), strict=True))
    assert any(not torch.equal(p, q) for p, q in zip(d0, step.D.parameters(), strict=True))
    if extra.get("lambda_feat"):
        assert float(first["g_feat"]) > 0


def test_the_papers_ablations_change_what_is_trained() -> None:
    """The objective rows of the paper's Table 1: L1 alone trains no D; an unconditional D sees only y."""
    torch.manual_seed(0)
    a, b = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 1, 64, 64) * 2 - 1
    l1_only = TrainingStep(Pix2PixConfig(**SMALL, output_nc=1, lambda_gan=0.0))
    d0 = [p.detach().clone() for p in l1_only.D.parameters()]
    losses = l1_only(a, b)
    assert set(losses) == {"g_rec", "g_total"}
    assert float(losses["g_total"]) == pytest.approx(100 * float(losses["g_rec"]), rel=1e-5)
    assert all(torch.equal(p, q) for p, q in zip(d0, l1_only.D.parameters(), strict=True))

    unconditional = TrainingStep(Pix2PixConfig(**SMALL, output_nc=1, conditional_D=False))
    first = next(m for m in unconditional.D.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 1  # y alone; the conditional D takes 3 + 1
    assert "g_gan" in unconditional(a, b)
    with pytest.raises(ValueError, match="learn nothing"):
        Pix2PixConfig(lambda_gan=0.0, lambda_rec=0.0)


def test_d_loss_is_halved_for_the_papers_objective() -> None:
    step = TrainingStep(Pix2PixConfig(**SMALL))
    losses = step(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64))
    assert float(losses["d_total"]) == pytest.approx(
        0.5 * float(losses["d_real"] + losses["d_fake"]), rel=1e-5
    )


def test_wgan_gradient_penalty_is_real() -> None:
    torch.manual_seed(0)
    d = build_discriminator(Pix2PixConfig(ndf=8, norm="none", init_type="normal", init_gain=0.5))
    real, fake = torch.randn(4, 6, 64, 64), torch.randn(4, 6, 64, 64)
    penalty = gradient_penalty(d, real, fake)
    assert float(penalty.detach()) > 0
    penalty.backward()  # create_graph=True: the penalty has gradients w.r.t. D's weights
    grads = [p.grad for p in d.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


def test_gradient_penalty_constrains_the_critic_of_the_loss() -> None:
    """The penalised critic is the one `discriminator_loss` trains: per sample, the mean of the patch logits,
    summed over scales. Its gradient norm must not grow with the number of patches."""
    x = torch.randn(3, 4, 8, 8)

    def two_scales(pair: torch.Tensor) -> list[list[torch.Tensor]]:
        # Patch logits: channel sums at full and half resolution (64 and 16 patches). The patch mean of
        # either is sum(x)/64, so each of the 256 elements has gradient 2/64 = 1/32: norm 16/32 = 0.5,
        # penalty (0.5 - 1)^2 at every sample (the sum over patches would give norm 20).
        return [[pair.sum(1, keepdim=True)], [F.avg_pool2d(pair, 2).sum(1, keepdim=True)]]

    assert float(gradient_penalty(two_scales, x, x).detach()) == pytest.approx(0.25, rel=1e-5)

    # A real two-scale PatchGAN: the penalty is the mean over samples of (‖∇ critic‖ - 1)^2, the critic
    # being minus the WGAN loss on real pairs of that sample alone (real == fake: x̂ is x whatever alpha).
    torch.manual_seed(0)
    d = build_discriminator(Pix2PixConfig(ndf=8, num_D=2, norm="none", init_gain=0.5))
    pairs = torch.randn(3, 6, 64, 64)
    expected = []
    for pair in pairs.split(1):
        sample = pair.clone().requires_grad_(True)
        outputs = d(sample)
        critic = -discriminator_loss("wgangp", outputs, outputs)[0]
        (grad,) = torch.autograd.grad(critic, sample)
        expected.append((grad.norm() - 1) ** 2)
    penalty = gradient_penalty(d, pairs, pairs).detach()
    assert float(penalty) == pytest.approx(float(torch.stack(expected).mean()))


def test_wgangp_with_a_batch_norm_critic_is_refused() -> None:
    for norm in ("batch", "syncbatch"):
        with pytest.raises(ValueError, match=r"without batch norm.*set norm to instance or none"):
            Pix2PixConfig(gan_mode="wgangp", norm=norm)
    for norm in ("instance", "none"):
        Pix2PixConfig(gan_mode="wgangp", norm=norm)
    Pix2PixConfig(gan_mode="vanilla", norm="batch")


def test_wgangp_trains_a_compiled_critic() -> None:
    """The penalty's double backward cannot go through torch.compile: it must still train D (on CPU the
    default backend compiles C++, hence the tiny networks and one critic-only iteration)."""
    torch.manual_seed(0)
    cfg = {"netG": "unet", "unet_downs": 5, "ngf": 4, "ndf": 4, "use_dropout": False}
    step = TrainingStep(Pix2PixConfig(**cfg, gan_mode="wgangp", norm="instance", n_critic=2, compile=True))
    d0 = [p.detach().clone() for p in step.D.parameters()]
    losses = step(torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1)
    assert float(losses["d_gp"]) > 0 and all(torch.isfinite(v) for v in losses.values())
    assert any(not torch.equal(p, q) for p, q in zip(d0, step.D.parameters(), strict=True))


def test_d_sees_one_layout_whatever_the_inputs_strides() -> None:
    """A 1-channel input is channels_last-contiguous in NCHW strides too: D's pairs must still be NHWC."""
    torch.manual_seed(0)
    step = TrainingStep(Pix2PixConfig(**SMALL, input_nc=1, channels_last=True))
    seen: list[tuple[int, ...]] = []
    step.D.register_forward_pre_hook(lambda _module, args: seen.append(args[0].stride()))
    b = torch.rand(2, 3, 64, 64)
    step(torch.rand(2, 1, 64, 64), b)  # NCHW, as a decoded batch comes
    step(torch.rand(2, 64, 64, 1).permute(0, 3, 1, 2), b)  # NHWC, as a permuted HWC batch comes
    nhwc = torch.empty(2, 4, 64, 64).contiguous(memory_format=torch.channels_last).stride()
    assert seen and set(seen) == {nhwc}


def test_lr_policies_follow_their_schedules() -> None:
    lrs = []
    step = TrainingStep(Pix2PixConfig(**SMALL, lr=1.0, n_epochs=2, n_epochs_decay=2))
    for _ in range(7):
        lrs.append(step.lr)
        step.end_epoch()
    # Hold 2 epochs, then linear to zero, and zero past the end (a negative LR would ascend the loss).
    assert lrs == pytest.approx([1.0, 1.0, 2 / 3, 1 / 3, 0.0, 0.0, 0.0])

    step = TrainingStep(Pix2PixConfig(**SMALL, lr=1.0, lr_policy="step", lr_decay_epochs=2))
    for _ in range(4):
        step.end_epoch()
    assert step.lr == pytest.approx(0.01)

    # Cosine over the whole run (n_epochs + n_epochs_decay): it reaches zero at the end and never climbs.
    step = TrainingStep(Pix2PixConfig(**SMALL, lr=1.0, lr_policy="cosine", n_epochs=2, n_epochs_decay=2))
    lrs = []
    for _ in range(5):
        lrs.append(step.lr)
        step.end_epoch()
    assert lrs == pytest.approx([1.0, 0.8536, 0.5, 0.1464, 0.0], abs=1e-4)

    step = TrainingStep(Pix2PixConfig(**SMALL, lr=1.0, lr_policy="plateau", plateau_patience=1))
    with pytest.raises(ValueError, match="needs a validation metric"):
        step.end_epoch()
    for _ in range(3):
        step.end_epoch(metric=1.0)  # no improvement
    assert step.lr == pytest.approx(0.2)


def test_bf16_and_channels_last_on_cpu() -> None:
    torch.manual_seed(0)
    step = TrainingStep(Pix2PixConfig(**SMALL, precision="bf16", channels_last=True))
    losses = step(torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64))
    assert all(torch.isfinite(v) for v in losses.values())
    assert next(step.G.parameters()).dtype == torch.float32  # autocast: master weights stay fp32


def test_fp16_on_cpu_is_refused_with_a_hint() -> None:
    with pytest.raises(ValueError, match="bf16"):
        TrainingStep(Pix2PixConfig(**SMALL, precision="fp16"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_step(precision: str) -> None:
    step = TrainingStep(Pix2PixConfig(**SMALL, precision=precision, channels_last=True), device="cuda")
    losses = step(torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64))
    assert all(torch.isfinite(v) for v in losses.values())
