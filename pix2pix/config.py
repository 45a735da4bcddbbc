"""Every option of the pix2pix library, documented in one place.

The config is plain data: the training job fills it from YAML/CLI, checkpoints store it as a dict, and
`ARCHITECTURE_FIELDS` says which fields must match for weights to be loadable into a model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

GeneratorName = Literal["unet_256", "unet_128", "unet", "resnet_9blocks", "resnet_6blocks"]
DiscriminatorName = Literal["basic", "n_layers", "pixel", "image"]
NormName = Literal["batch", "instance", "syncbatch", "none"]
InitName = Literal["normal", "xavier", "kaiming", "orthogonal"]
GanMode = Literal["vanilla", "lsgan", "wgangp", "hinge"]
LrPolicy = Literal["linear", "step", "plateau", "cosine"]
Precision = Literal["fp32", "bf16", "fp16"]


@dataclass
class Pix2PixConfig:
    # --- networks -------------------------------------------------------------------------------------
    input_nc: int = 3  # channels of the input image x (1 for edges/gray, 3 for label colour maps)
    output_nc: int = 3  # channels of the target image y
    netG: GeneratorName = "unet_256"  # unet_256: 8 downsamplings; unet_128: 7; unet: `unet_downs`
    unet_downs: int = 8  # only for netG="unet": number of downsamplings (input side must divide 2**n)
    ngf: int = 64  # generator width in the first layer
    use_dropout: bool = True  # dropout 0.5 in the inner U-Net decoder blocks: the paper's only noise
    netD: DiscriminatorName = "basic"  # basic: 70x70 PatchGAN; n_layers: `n_layers_D`; pixel: 1x1; image: 286
    n_layers_D: int = 3  # only for netD="n_layers"
    ndf: int = 64  # discriminator width in the first layer
    num_D: int = 1  # pix2pixHD multi-scale D: number of scales (each one halves the input)
    conditional_D: bool = True  # D judges (x, y) stacked on channels; False: y alone (the paper's "GAN")
    norm: NormName = "batch"  # batch (paper), instance, syncbatch (multi-GPU), none
    init_type: InitName = "normal"  # weight init; the paper uses N(0, 0.02)
    init_gain: float = 0.02  # std for normal, gain for xavier/orthogonal

    # --- objective ------------------------------------------------------------------------------------
    gan_mode: GanMode = "vanilla"  # vanilla: non-saturating BCE (paper); lsgan; wgangp; hinge
    lambda_gan: float = 1.0  # weight of the adversarial term; 0: reconstruction loss alone, D never trained
    lambda_rec: float = 100.0  # weight λ of the reconstruction term (paper: 100)
    rec_loss: Literal["l1", "l2"] = "l1"  # the paper compares L1 and L2; L1 blurs less
    lambda_gp: float = 10.0  # WGAN-GP gradient-penalty weight
    n_critic: int = 1  # D updates per G update (WGAN-GP commonly uses 5); the paper uses 1
    lambda_feat: float = 0.0  # pix2pixHD feature matching weight (10 in pix2pixHD); 0 disables it

    # --- optimisation ---------------------------------------------------------------------------------
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    lr_policy: LrPolicy = "linear"  # linear: hold `n_epochs`, then decay to 0 over `n_epochs_decay`
    n_epochs: int = 100  # epochs at the initial lr (linear); cosine anneals over n_epochs + n_epochs_decay
    n_epochs_decay: int = 100  # epochs of linear decay to zero (linear)
    lr_decay_epochs: int = 50  # step policy: multiply by 0.1 every this many epochs
    plateau_patience: int = 5  # plateau policy: epochs without improvement before lr × 0.2

    # --- execution ------------------------------------------------------------------------------------
    precision: Precision = "fp32"  # bf16: autocast; fp16: autocast + gradient scaler
    channels_last: bool = False  # NHWC memory format; faster convolutions on recent GPUs
    compile: bool = False  # torch.compile G and D (first steps are slow while it compiles)
    # torch.compile mode when `compile`: "default", "reduce-overhead" (CUDA graphs: fewer kernel launches,
    # helps small batches), "max-autotune-no-cudagraphs" (long compile: autotunes kernels)
    compile_mode: str = "default"
    fused_adam: bool = True  # on CUDA: Adam's fused kernels (a few launches per step); CPU keeps the default

    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes carried into checkpoints

    def __post_init__(self) -> None:
        if self.n_critic < 1:
            raise ValueError(f"n_critic must be >= 1, got {self.n_critic}")
        if self.num_D < 1:
            raise ValueError(f"num_D must be >= 1, got {self.num_D}")
        if self.input_nc < 1 or self.output_nc < 1:
            raise ValueError("input_nc and output_nc must be >= 1")
        if self.ngf < 1 or self.ndf < 1:
            raise ValueError(f"ngf and ndf must be >= 1, got {self.ngf}, {self.ndf}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a number > 0, got {self.lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.n_epochs < 0 or self.n_epochs_decay < 0:
            raise ValueError(
                f"n_epochs and n_epochs_decay must be >= 0, got {self.n_epochs}, {self.n_epochs_decay}"
            )
        if self.lambda_gan < 0 or self.lambda_rec < 0:
            raise ValueError(
                f"lambda_gan and lambda_rec must be >= 0, got {self.lambda_gan}, {self.lambda_rec}"
            )
        if self.lambda_gan == 0 and self.lambda_rec == 0:
            raise ValueError("lambda_gan and lambda_rec are both 0: the generator would learn nothing")
        # Else each fails only where the model is built or its first epoch ends (in every training worker).
        if self.netG == "unet" and self.unet_downs < 5:
            raise ValueError(f"unet_downs must be >= 5 (the U-Net's levels), got {self.unet_downs}")
        if self.lr_policy == "step" and self.lr_decay_epochs < 1:
            raise ValueError(f"lr_policy step needs lr_decay_epochs >= 1, got {self.lr_decay_epochs}")
        if self.gan_mode == "wgangp" and self.norm in ("batch", "syncbatch"):
            # The penalty is per sample (Gulrajani et al. 2017 §4: no batch norm in the critic); batch
            # statistics make each sample's critic value depend on the rest of the batch.
            raise ValueError(
                f"gan_mode wgangp needs a critic without batch norm, got norm {self.norm!r} (norm sets G and "
                "D): set norm to instance or none"
            )
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode {self.compile_mode!r} is not one of {', '.join(COMPILE_MODES)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Pix2PixConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown pix2pix option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**values)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# Fields that define the shapes of the weights: a checkpoint can only be loaded into a model whose config
# agrees on all of these.
ARCHITECTURE_FIELDS = (
    "input_nc",
    "output_nc",
    "netG",
    "unet_downs",
    "ngf",
    "netD",
    "n_layers_D",
    "ndf",
    "num_D",
    "conditional_D",
    "norm",
)
