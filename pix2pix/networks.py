"""pix2pix networks: U-Net and ResNet generators, PatchGAN / PixelGAN / ImageGAN discriminators, and the
pix2pixHD multi-scale discriminator.

Layer-for-layer these follow the authors' reference (Isola et al. 2017, and Wang et al. 2018 for the
multi-scale D), so parameter counts match theirs at default widths. Two deliberate differences:
- The U-Net is written flat (an encoder list and a decoder list) instead of as nested blocks; the skip
  tensors are the LeakyReLU-activated encoder features, which is what the reference's in-place LeakyReLU
  feeds its skip connections in practice.
- A spatial size the network cannot take raises a clear error naming the nearest valid sizes.

Every discriminator returns features, not just logits: `D(pair)` gives one list per scale, each list the
outputs of its stages with the patch logits last. Losses use `[-1]`; feature matching uses the rest.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from pix2pix.config import Pix2PixConfig

NormFactory = Callable[[int], nn.Module]


# ----------------------------------------------------------------------------------------------------------
# Normalisation and initialisation
# ----------------------------------------------------------------------------------------------------------


def norm_factory(norm: str) -> NormFactory:
    """A callable that makes the normalisation layer for `channels` channels."""
    if norm == "batch":
        return functools.partial(nn.BatchNorm2d, affine=True, track_running_stats=True)
    if norm == "instance":
        return functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    if norm == "syncbatch":
        # Synchronises batch statistics across DDP ranks; behaves as BatchNorm2d outside a process group.
        return functools.partial(nn.SyncBatchNorm, affine=True, track_running_stats=True)
    if norm == "none":
        return lambda channels: nn.Identity()
    raise ValueError(f"unknown norm {norm!r}: choose batch, instance, syncbatch or none")


def conv_bias(norm: str) -> bool:
    # A conv followed by an affine norm has its bias absorbed by the norm's shift; otherwise it needs one.
    return norm in ("instance", "none")


def init_weights(net: nn.Module, init_type: str = "normal", gain: float = 0.02) -> nn.Module:
    """Initialise conv/linear weights (and batch-norm scales around 1), as in the reference."""

    def init_one(m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            if init_type == "normal":
                nn.init.normal_(m.weight, 0.0, gain)
            elif init_type == "xavier":
                nn.init.xavier_normal_(m.weight, gain=gain)
            elif init_type == "kaiming":
                nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
            elif init_type == "orthogonal":
                nn.init.orthogonal_(m.weight, gain=gain)
            else:
                raise ValueError(
                    f"unknown init_type {init_type!r}: choose normal, xavier, kaiming or orthogonal"
                )
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.SyncBatchNorm) and m.affine:
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)

    net.apply(init_one)
    return net


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# ----------------------------------------------------------------------------------------------------------
# Generators
# ----------------------------------------------------------------------------------------------------------


def nearest_multiples(value: int, factor: int) -> list[int]:
    lower = (value // factor) * factor
    return sorted({v for v in (lower, lower + factor) if v > 0})


def check_divisible(height: int, width: int, factor: int, what: str) -> None:
    bad = [(name, v) for name, v in (("height", height), ("width", width)) if v % factor]
    if bad:
        hints = "; ".join(
            f"{name} {v} → nearest valid {' or '.join(map(str, nearest_multiples(v, factor)))}"
            for name, v in bad
        )
        raise ValueError(
            f"{what} needs height and width divisible by {factor}, got {height}x{width} ({hints}). "
            "Resize or crop the images (e.g. the dataset's load/crop size) to a valid size."
        )


class UnetGenerator(nn.Module):
    """U-Net: `num_downs` stride-2 convs down to a bottleneck, transposed convs back up, with the encoder
    feature at each level concatenated onto the decoder input. Input sides must divide 2**num_downs."""

    def __init__(
        self,
        input_nc: int,
        output_nc: int,
        num_downs: int,
        ngf: int = 64,
        norm: str = "batch",
        use_dropout: bool = True,
    ) -> None:
        super().__init__()
        if num_downs < 5:
            raise ValueError(f"U-Net needs at least 5 downsamplings (got {num_downs})")
        self.num_downs = num_downs
        make_norm = norm_factory(norm)
        bias = conv_bias(norm)
        width = [ngf * min(2**level, 8) for level in range(num_downs)]  # channels after each down conv

        self.down = nn.ModuleList()
        for level in range(num_downs):
            c_in = input_nc if level == 0 else width[level - 1]
            conv = nn.Conv2d(c_in, width[level], 4, stride=2, padding=1, bias=bias)
            has_norm = 0 < level < num_downs - 1  # outermost and innermost downs are not normalised
            self.down.append(
                nn.Sequential(conv, make_norm(width[level])) if has_norm else nn.Sequential(conv)
            )

        # Dropout sits at levels 4 <= level < num_downs - 1: the ngf*8 decoder blocks between the
        # bottleneck and the ngf*4 level, as in the authors' PyTorch port (3 blocks in unet_256), whose
        # released models and parameter counts this module matches. The paper's appendix instead puts it
        # on the first three decoder layers. It is the generator's only source of noise (the paper drops
        # the z input as ineffective); a U-Net of 5 downsamplings has no such level, hence the warning.
        dropout_levels = range(4, num_downs - 1)
        if use_dropout and not dropout_levels:
            warnings.warn(
                f"use_dropout has no effect on a U-Net with {num_downs} downsamplings: dropout goes in the "
                "ngf*8 decoder blocks between the bottleneck and the ngf*4 level (levels 4 … num_downs - 2), "
                "and there are none; use 6 or more downsamplings, or use_dropout=False",
                UserWarning,
                stacklevel=2,
            )
        self.up = nn.ModuleList()
        for level in range(num_downs):
            innermost, outermost = level == num_downs - 1, level == 0
            c_in = width[level] if innermost else 2 * width[level]
            if outermost:
                layers: list[nn.Module] = [
                    nn.ReLU(),
                    nn.ConvTranspose2d(c_in, output_nc, 4, stride=2, padding=1),
                    nn.Tanh(),
                ]
            else:
                c_out = width[level - 1]
                layers = [
                    nn.ReLU(),
                    nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=bias),
                    make_norm(c_out),
                ]
                if use_dropout and level in dropout_levels:
                    layers.append(nn.Dropout(0.5))
            self.up.append(nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_divisible(
            x.shape[-2], x.shape[-1], 2**self.num_downs, f"U-Net with {self.num_downs} downsamplings"
        )
        skips = []
        h = x
        for level, down in enumerate(self.down):
            h = down(h)
            if level < self.num_downs - 1:
                h = F.leaky_relu(h, 0.2)  # feeds both the next conv and the skip connection
                skips.append(h)
        y = self.up[-1](h)
        for level in range(self.num_downs - 2, -1, -1):
            y = self.up[level](torch.cat([skips[level], y], dim=1))
        return y


class ResnetBlock(nn.Module):
    def __init__(self, dim: int, norm: str, use_dropout: bool) -> None:
        super().__init__()
        make_norm, bias = norm_factory(norm), conv_bias(norm)
        self.conv1 = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias), make_norm(dim), nn.ReLU()
        )
        self.dropout = nn.Dropout(0.5) if use_dropout else nn.Identity()
        self.conv2 = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias), make_norm(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.dropout(self.conv1(x)))


class ResnetGenerator(nn.Module):
    """Johnson et al. style: 7x7 stem, two stride-2 downsamplings, `n_blocks` residual blocks at 4*ngf,
    two transposed-conv upsamplings, 7x7 head. Reflection padding throughout. Sides must divide 4."""

    def __init__(
        self,
        input_nc: int,
        output_nc: int,
        n_blocks: int,
        ngf: int = 64,
        norm: str = "instance",
        use_dropout: bool = False,
    ) -> None:
        super().__init__()
        make_norm, bias = norm_factory(norm), conv_bias(norm)
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(input_nc, ngf, 7, bias=bias),
            make_norm(ngf),
            nn.ReLU(),
        ]
        for mult in (1, 2):
            layers += [
                nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=bias),
                make_norm(ngf * mult * 2),
                nn.ReLU(),
            ]
        layers += [ResnetBlock(ngf * 4, norm, use_dropout) for _ in range(n_blocks)]
        for mult in (4, 2):
            layers += [
                nn.ConvTranspose2d(
                    ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1, bias=bias
                ),
                make_norm(ngf * mult // 2),
                nn.ReLU(),
            ]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_divisible(x.shape[-2], x.shape[-1], 4, "ResNet generator (2 downsamplings)")
        return self.model(x)


# ----------------------------------------------------------------------------------------------------------
# Discriminators
# ----------------------------------------------------------------------------------------------------------


def receptive_field(net: nn.Module) -> int:
    """Receptive field (in input pixels) of one output unit of a plain chain of convolutions, computed from
    the conv layers' kernels and strides in the order they were registered."""
    field = 1
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    for conv in reversed(convs):
        k, s = conv.kernel_size[0], conv.stride[0]
        field = (field - 1) * s + k
    return field


class PatchDiscriminator(nn.Module):
    """PatchGAN: `n_layers` stride-2 4x4 convs, one stride-1 conv, and a 1-channel stride-1 conv, so each
    output logit judges one N×N patch (n_layers=3 → 70×70, 5 → 286×286 "ImageGAN" at 256 px)."""

    def __init__(self, input_nc: int, ndf: int = 64, n_layers: int = 3, norm: str = "batch") -> None:
        super().__init__()
        make_norm, bias = norm_factory(norm), conv_bias(norm)
        stages: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2))
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last feature conv keeps the resolution
            stages.append(
                nn.Sequential(
                    nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=bias),
                    make_norm(ndf * mult),
                    nn.LeakyReLU(0.2),
                )
            )
        stages.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))  # patch logits
        self.stages = nn.ModuleList(stages)
        self.n_layers = n_layers
        self.receptive_field = receptive_field(self)
        # Each stride-2 conv maps s → floor(s/2) and each stride-1 4x4 conv s → s-1; we need ≥1 logit.
        self.min_input_size = 3 * 2**n_layers

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(
                f"PatchGAN with n_layers={self.n_layers} needs inputs of at least {self.min_input_size} px "
                f"per side, got {x.shape[-2]}x{x.shape[-1]}"
            )
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class PixelDiscriminator(nn.Module):
    """1×1 PixelGAN: judges each pixel on its own (colour, not structure)."""

    def __init__(self, input_nc: int, ndf: int = 64, norm: str = "batch") -> None:
        super().__init__()
        make_norm, bias = norm_factory(norm), conv_bias(norm)
        self.stages = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(input_nc, ndf, 1), nn.LeakyReLU(0.2)),
                nn.Sequential(nn.Conv2d(ndf, ndf * 2, 1, bias=bias), make_norm(ndf * 2), nn.LeakyReLU(0.2)),
                nn.Conv2d(ndf * 2, 1, 1, bias=bias),
            ]
        )
        self.n_layers = 2
        self.receptive_field = receptive_field(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class MultiScaleDiscriminator(nn.Module):
    """pix2pixHD: `num_D` identical discriminators, the k-th seeing the pair average-pooled k times.
    With num_D=1 this is exactly the single discriminator. Returns one feature list per scale."""

    def __init__(self, make_discriminator: Callable[[], nn.Module], num_D: int = 1) -> None:
        super().__init__()
        self.scales = nn.ModuleList([make_discriminator() for _ in range(num_D)])
        self.downsample = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
        # Receptive field per scale in full-resolution pixels (each pooling roughly doubles it).
        self.receptive_fields = [receptive_field(d) * 2**k for k, d in enumerate(self.scales)]

    def forward(self, pair: torch.Tensor) -> list[list[torch.Tensor]]:
        outputs = []
        for k, d in enumerate(self.scales):
            if k > 0:
                pair = self.downsample(pair)
            outputs.append(d(pair))
        return outputs


# ----------------------------------------------------------------------------------------------------------
# Builders from the config
# ----------------------------------------------------------------------------------------------------------

UNET_DOWNS = {"unet_256": 8, "unet_128": 7}
RESNET_BLOCKS = {"resnet_9blocks": 9, "resnet_6blocks": 6}
PATCH_LAYERS = {"basic": 3, "image": 5}


def size_factor(cfg: Pix2PixConfig) -> int:
    """What the generator's input height and width must be divisible by."""
    if cfg.netG in UNET_DOWNS or cfg.netG == "unet":
        return int(2 ** UNET_DOWNS.get(cfg.netG, cfg.unet_downs))
    return 4  # ResNet generators: two stride-2 convolutions down, two transposed up


def check_input_size(cfg: Pix2PixConfig, height: int, width: int) -> None:
    """Raises a ValueError naming the nearest valid sizes when `netG` cannot take height × width."""
    check_divisible(height, width, size_factor(cfg), f"netG={cfg.netG}")


def check_discriminator_size(cfg: Pix2PixConfig, height: int, width: int) -> None:
    """Raises a ValueError when a PatchGAN scale of `netD` would see fewer pixels than it needs: each of
    the `num_D` scales halves the pair (rounding up), and n layers need 3 * 2**n px per side."""
    if cfg.netD == "pixel":
        return
    n_layers = PATCH_LAYERS.get(cfg.netD, cfg.n_layers_D)
    needed, side = 3 * 2**n_layers, min(height, width)
    for _ in range(cfg.num_D - 1):
        side = -(-side // 2)
    if side < needed:
        raise ValueError(
            f"netD={cfg.netD} (n_layers {n_layers}) with num_D={cfg.num_D} sees {side} px per side at its "
            f"coarsest scale from {height}x{width} crops, and needs {needed}: lower num_D or n_layers_D, "
            "or use larger crops"
        )


def build_generator(cfg: Pix2PixConfig) -> nn.Module:
    if cfg.netG in UNET_DOWNS or cfg.netG == "unet":
        downs = UNET_DOWNS.get(cfg.netG, cfg.unet_downs)
        net: nn.Module = UnetGenerator(cfg.input_nc, cfg.output_nc, downs, cfg.ngf, cfg.norm, cfg.use_dropout)
    elif cfg.netG in RESNET_BLOCKS:
        net = ResnetGenerator(
            cfg.input_nc, cfg.output_nc, RESNET_BLOCKS[cfg.netG], cfg.ngf, cfg.norm, cfg.use_dropout
        )
    else:
        raise ValueError(
            f"unknown netG {cfg.netG!r}: choose unet_256, unet_128, unet, resnet_9blocks, resnet_6blocks"
        )
    return init_weights(net, cfg.init_type, cfg.init_gain)


def build_discriminator(cfg: Pix2PixConfig) -> MultiScaleDiscriminator:
    # Conditional (the paper's cGAN): D sees x and y stacked on channels; unconditional: y alone.
    pair_channels = cfg.input_nc + cfg.output_nc if cfg.conditional_D else cfg.output_nc
    if cfg.netD == "pixel":

        def make() -> nn.Module:
            return PixelDiscriminator(pair_channels, cfg.ndf, cfg.norm)
    elif cfg.netD in PATCH_LAYERS or cfg.netD == "n_layers":
        n_layers = PATCH_LAYERS.get(cfg.netD, cfg.n_layers_D)

        def make() -> nn.Module:
            return PatchDiscriminator(pair_channels, cfg.ndf, n_layers, cfg.norm)
    else:
        raise ValueError(f"unknown netD {cfg.netD!r}: choose basic, n_layers, pixel or image")
    return init_weights(MultiScaleDiscriminator(make, cfg.num_D), cfg.init_type, cfg.init_gain)  # type: ignore[return-value]
