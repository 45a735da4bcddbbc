"""Image-quality metrics on tensors: L1, PSNR and SSIM, per image and as batch means.

Inputs are N×C×H×W in [0, data_range]. Generator outputs live in [-1, 1]: convert with `to_unit` first.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → [0, 1], clamped."""
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(
            f"metrics need two N×C×H×W tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute error per image, shape (N,)."""
    _check(a, b)
    return (a.float() - b.float()).abs().flatten(1).mean(dim=1)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, shape (N,); +inf for identical images."""
    _check(a, b)
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_1d(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per image, shape (N,): an 11×11 Gaussian window (σ 1.5),
    K1 = 0.01, K2 = 0.03, valid positions only, averaged over positions and channels."""
    _check(a, b)
    if min(a.shape[-2:]) < window:
        raise ValueError(f"SSIM with a {window}px window needs images of at least {window}px per side")
    a, b = a.double(), b.double()  # E[x²] − μ² cancels badly in float32 on flat regions
    channels = a.shape[1]
    g = _gaussian_1d(window, sigma, a.device)
    # The 2-D Gaussian is the outer product of two 1-D ones: a column pass then a row pass (22 instead of
    # 121 multiply-adds per pixel), over the five maps at once.
    maps = torch.cat([a, b, a * a, b * b, a * b], dim=1)
    groups = maps.shape[1]
    maps = F.conv2d(maps, g.view(1, 1, window, 1).expand(groups, 1, window, 1), groups=groups)
    maps = F.conv2d(maps, g.view(1, 1, 1, window).expand(groups, 1, 1, window), groups=groups)
    mu_a, mu_b, aa, bb, ab = maps.split(channels, dim=1)
    var_a = aa - mu_a**2
    var_b = bb - mu_b**2
    cov = ab - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(dim=1).float()


PSNR_CAP_DB = 100.0  # identical images have infinite PSNR; capped, they still average to a finite number


def metric_sums(fake: torch.Tensor, real: torch.Tensor, data_range: float = 1.0) -> dict[str, float]:
    """Sums over the batch of L1, PSNR (capped at PSNR_CAP_DB) and SSIM, and the image count: add these up
    over batches (and ranks) and divide by the count for dataset means."""
    return {
        "l1": float(l1(fake, real).sum()),
        "psnr": float(psnr(fake, real, data_range).clamp(max=PSNR_CAP_DB).sum()),
        "ssim": float(ssim(fake, real, data_range).sum()),
        "count": float(fake.shape[0]),
    }


def image_metrics(fake: torch.Tensor, real: torch.Tensor, data_range: float = 1.0) -> dict[str, float]:
    """Batch means of L1, PSNR and SSIM, e.g. for validation logging."""
    sums = metric_sums(fake, real, data_range)
    count = sums.pop("count")
    return {k: v / count for k, v in sums.items()}
