"""Networks: parity with the reference's parameter counts, shapes, receptive fields, clear size errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from pix2pix import Pix2PixConfig, build_discriminator, build_generator, count_parameters
from pix2pix.networks import PatchDiscriminator, UnetGenerator, init_weights, receptive_field


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"netG": "unet_256", "norm": "batch"}, 54_413_955),
        ({"netG": "resnet_9blocks", "norm": "instance"}, 11_378_179),
    ],
)
def test_generator_parameter_counts_match_reference(overrides: dict, expected: int) -> None:
    assert count_parameters(build_generator(Pix2PixConfig(**overrides))) == expected


@pytest.mark.parametrize(("net_d", "expected"), [("basic", 2_768_705), ("pixel", 9_024)])
def test_discriminator_parameter_counts_match_reference(net_d: str, expected: int) -> None:
    # 6 input channels: a 3-channel x and a 3-channel y stacked.
    assert count_parameters(build_discriminator(Pix2PixConfig(netD=net_d))) == expected


def test_receptive_fields_are_computed_from_the_layers() -> None:
    assert build_discriminator(Pix2PixConfig(netD="basic")).receptive_fields == [70]
    assert build_discriminator(Pix2PixConfig(netD="pixel")).receptive_fields == [1]
    assert build_discriminator(Pix2PixConfig(netD="image")).receptive_fields == [286]
    assert build_discriminator(Pix2PixConfig(netD="n_layers", n_layers_D=1)).receptive_fields == [16]
    # A hand-built chain: two 3x3 stride-1 convs see 5x5.
    assert receptive_field(nn.Sequential(nn.Conv2d(1, 1, 3), nn.Conv2d(1, 1, 3))) == 5


@pytest.mark.parametrize(
    ("net_g", "size"),
    [("unet_256", (256, 256)), ("unet_128", (128, 128)), ("unet_256", (256, 512)), ("unet_128", (384, 128))],
)
def test_unet_output_shapes(net_g: str, size: tuple[int, int]) -> None:
    g = build_generator(Pix2PixConfig(netG=net_g, ngf=8, input_nc=1, output_nc=3))
    with torch.no_grad():
        y = g(torch.randn(2, 1, *size))
    assert y.shape == (2, 3, *size)
    assert y.abs().max() <= 1.0  # tanh output


def test_resnet_generator_shape_on_rectangular_input() -> None:
    g = build_generator(Pix2PixConfig(netG="resnet_6blocks", ngf=8, norm="instance"))
    with torch.no_grad():
        assert g(torch.randn(1, 3, 64, 96)).shape == (1, 3, 64, 96)


def test_patchgan_output_grid_at_256() -> None:
    d = build_discriminator(Pix2PixConfig(ndf=8))
    with torch.no_grad():
        (features,) = d(torch.randn(1, 6, 256, 256))
    assert features[-1].shape == (1, 1, 30, 30)  # 30x30 overlapping 70x70 patches, as in the paper
    assert len(features) == 5


def test_invalid_unet_size_names_nearest_valid_sizes() -> None:
    g = build_generator(Pix2PixConfig(netG="unet_256", ngf=8))
    with pytest.raises(ValueError, match=r"divisible by 256.*height 300 → nearest valid 256 or 512"):
        g(torch.randn(1, 3, 300, 256))
    with pytest.raises(ValueError, match=r"width 100 → nearest valid 128\)"):
        UnetGenerator(3, 3, 7, ngf=8)(torch.randn(1, 3, 128, 100))


def test_too_small_input_for_patchgan_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="at least 24 px"):
        PatchDiscriminator(6, 8, 3)(torch.randn(1, 6, 16, 16))


def test_multiscale_discriminator_returns_one_feature_list_per_scale() -> None:
    d = build_discriminator(Pix2PixConfig(ndf=8, num_D=3))
    with torch.no_grad():
        outs = d(torch.randn(1, 6, 128, 128))
    assert [o[-1].shape[-1] for o in outs] == [14, 6, 2]  # each scale sees the pair pooled once more
    assert d.receptive_fields == [70, 140, 280]


def test_dropout_is_the_unets_only_noise() -> None:
    g = build_generator(Pix2PixConfig(netG="unet_256", ngf=8))
    assert sum(isinstance(m, nn.Dropout) for m in g.modules()) == 3  # the three inner ngf*8 decoder blocks
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        g.train()
        assert not torch.equal(g(x), g(x))
        g.eval()
        assert torch.equal(g(x), g(x))
    no_dropout = build_generator(Pix2PixConfig(netG="unet_256", ngf=8, use_dropout=False))
    assert not any(isinstance(m, nn.Dropout) for m in no_dropout.modules())


def test_a_unet_too_shallow_for_dropout_says_so() -> None:
    with pytest.warns(UserWarning, match="use_dropout has no effect on a U-Net with 5 downsamplings"):
        g = UnetGenerator(3, 3, 5, ngf=8, use_dropout=True)
    assert not any(isinstance(m, nn.Dropout) for m in g.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sum(isinstance(m, nn.Dropout) for m in UnetGenerator(3, 3, 6, ngf=8).modules()) == 1
        UnetGenerator(3, 3, 5, ngf=8, use_dropout=False)


@pytest.mark.parametrize("norm", ["batch", "instance", "syncbatch", "none"])
def test_every_norm_builds_and_runs(norm: str) -> None:
    cfg = Pix2PixConfig(netG="unet_128", ngf=8, ndf=8, norm=norm)
    g, d = build_generator(cfg), build_discriminator(cfg)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        y = g(x)
        assert d(torch.cat([x, y], 1))[0][-1].shape == (2, 1, 14, 14)
    convs_with_bias = [m.bias is not None for m in g.modules() if isinstance(m, nn.Conv2d)]
    assert any(convs_with_bias) == (norm in ("instance", "none"))  # affine norms absorb the conv bias


@pytest.mark.parametrize(
    ("init_type", "gain"), [("normal", 0.02), ("xavier", 0.02), ("kaiming", 0.0), ("orthogonal", 1.0)]
)
def test_init_types(init_type: str, gain: float) -> None:
    torch.manual_seed(0)
    conv = init_weights(nn.Sequential(nn.Conv2d(64, 64, 4)), init_type, gain)[0]
    std = float(conv.weight.detach().std())
    fan_in = 64 * 16
    expected = {
        "normal": 0.02,
        "xavier": 0.02 * (2.0 / (fan_in + fan_in)) ** 0.5,
        "kaiming": (2.0 / fan_in) ** 0.5,
        "orthogonal": (1.0 / fan_in) ** 0.5,  # rows of an orthogonal 64x1024 matrix have unit norm
    }[init_type]
    assert std == pytest.approx(expected, rel=0.1)
    assert float(conv.bias.detach().abs().max()) == 0.0
