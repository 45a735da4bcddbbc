"""Metrics against values computed by hand on known images."""

from __future__ import annotations

import math

import pytest
import torch

from pix2pix.metrics import PSNR_CAP_DB, image_metrics, l1, metric_sums, psnr, ssim, to_unit

C1, C2 = 0.01**2, 0.03**2


def const(value: float, n: int = 1, c: int = 3, size: int = 16) -> torch.Tensor:
    return torch.full((n, c, size, size), value)


def test_l1_and_psnr_of_constant_images() -> None:
    a, b = const(0.0), const(0.5)
    assert float(l1(a, b)[0]) == pytest.approx(0.5)
    assert float(psnr(a, b)[0]) == pytest.approx(10 * math.log10(1 / 0.25))  # MSE 0.25 → 6.02 dB


def test_psnr_of_a_uniform_offset_is_20db_for_0_1() -> None:
    torch.manual_seed(0)
    a = torch.rand(2, 3, 32, 32) * 0.5 + 0.2
    assert psnr(a, a + 0.1).tolist() == pytest.approx([20.0, 20.0], abs=1e-4)
    assert l1(a, a + 0.1).tolist() == pytest.approx([0.1, 0.1], abs=1e-6)


def test_ssim_of_constant_images_by_hand() -> None:
    # No variance anywhere: SSIM reduces to the luminance term (2 μa μb + C1) / (μa² + μb² + C1).
    assert float(ssim(const(0.0), const(0.5))[0]) == pytest.approx(C1 / (0.25 + C1), rel=1e-4)
    assert float(ssim(const(0.5), const(0.6))[0]) == pytest.approx((0.6 + C1) / (0.61 + C1), rel=1e-5)


def test_ssim_of_contrast_inverted_stripes_by_hand() -> None:
    # Stripes 0.6/0.4 against their inverse: local means 0.5 (the Gaussian's alternating sum is ~1e-5),
    # variances σ² = 0.01 and covariance -σ², so SSIM = (2·0.25 + C1)/(0.5 + C1) · (-0.02 + C2)/(0.02 + C2).
    x = torch.zeros(1, 1, 32, 32)
    x[..., ::2] = 0.6
    x[..., 1::2] = 0.4
    expected = (0.5 + C1) / (0.5 + C1) * (-0.02 + C2) / (0.02 + C2)
    assert float(ssim(x, 1.0 - x)[0]) == pytest.approx(expected, abs=1e-4)


def test_identical_images() -> None:
    torch.manual_seed(1)
    a = torch.rand(3, 3, 24, 24)
    assert l1(a, a).tolist() == [0.0, 0.0, 0.0]
    assert all(math.isinf(v) for v in psnr(a, a).tolist())
    assert ssim(a, a).tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)


def test_batch_means_and_range_conversion() -> None:
    a = torch.cat([const(0.0), const(0.5)])
    b = torch.cat([const(0.5), const(0.5)])
    m = image_metrics(a, b)
    assert m["l1"] == pytest.approx(0.25)
    assert to_unit(torch.tensor([-1.0, 0.0, 1.0, 3.0])).tolist() == [0.0, 0.5, 1.0, 1.0]


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="one shape"):
        l1(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))


def test_metric_sums_add_up_over_batches_and_cap_psnr() -> None:
    torch.manual_seed(2)
    a, b = torch.rand(5, 3, 16, 16), torch.rand(5, 3, 16, 16)
    first, second = metric_sums(a[:2], b[:2]), metric_sums(a[2:], b[2:])
    whole = metric_sums(a, b)
    for key in ("l1", "psnr", "ssim", "count"):
        assert first[key] + second[key] == pytest.approx(whole[key], rel=1e-5)
    assert whole["count"] == 5.0
    assert metric_sums(a, a)["psnr"] == pytest.approx(5 * PSNR_CAP_DB)  # not +inf
