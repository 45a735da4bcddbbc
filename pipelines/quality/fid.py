"""FID and KID of generated images against the real targets of a split.

Features come from the standard FID Inception (`pix2pix.inception`, the pytorch-fid / torch-fidelity weights
`pt_inception-2015-12-05-6726825d.pth`), read from a local file: the `fid_weights` option, else
$P2P_FID_WEIGHTS. Nothing is downloaded; without the file FID and KID are skipped with one line saying how
to provide it. The distances are torchmetrics' (`FrechetInceptionDistance`, `KernelInceptionDistance`, given
the features through a pass-through `feature` module, so each image goes through the Inception once for
both metrics); torchmetrics computes FID in float64 here and KID with its polynomial-kernel unbiased MMD
estimator over random subsets (seeded, so a score is reproducible).

FID of splits under 2048 images: torchmetrics takes the eigenvalues of the 2048×2048 product of the two
covariances, tens of seconds per score on a small CPU machine, and the covariances then have rank < N. The
same number comes exactly and in milliseconds from the centred features (`frechet_distance`): with
Σ₁ = AᵀA and Σ₂ = BᵀB, tr √(Σ₁Σ₂) is the sum of the singular values of ABᵀ (N₁×N₂). Larger splits use
torchmetrics' computation; `tests/test_realism.py` checks that both agree.

Small splits: FID's covariance has rank < 2048 under 2049 images and is biased upwards at small N (KID is
unbiased, which is why it is reported beside it); compare scores at equal split and sample count only. KID
of a set against itself is slightly negative (the unbiased estimator), about −1/N of the kernel's spread.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Any

import torch

FID_WEIGHTS_ENV = "P2P_FID_WEIGHTS"
KID_SUBSET_SIZE = 1000  # torchmetrics' default; smaller splits use all their samples per subset
KID_SUBSETS = 100


def fid_weights_path(option: str = "") -> tuple[str | None, str]:
    """(path to the FID Inception weights or None, the one-line reason when None). Weights given as the
    option and missing are an error: whoever passed them expects FID; through the environment variable,
    set once for a machine, they are a note."""
    from pix2pix.inception import WEIGHTS_FILE

    if option and not Path(option).is_file():
        raise FileNotFoundError(f"FID Inception weights {option} not found (fid_weights): give its path")
    path = option or os.environ.get(FID_WEIGHTS_ENV, "")
    if not path:
        return None, (
            f"FID/KID skipped: no FID Inception weights; download {WEIGHTS_FILE} (pytorch-fid's release) "
            f"and pass --fid-weights PATH or set {FID_WEIGHTS_ENV}"
        )
    if not Path(path).is_file():
        return (
            None,
            f"FID/KID skipped: FID Inception weights {path} not found (fid_weights / {FID_WEIGHTS_ENV})",
        )
    return path, ""


@functools.lru_cache(maxsize=2)
def inception(path: str) -> Any:
    """The FID Inception, loaded once per process (promotion scores two models with it)."""
    from pix2pix.inception import load_fid_inception

    return load_fid_inception(path)


class _Features(torch.nn.Module):
    """torchmetrics' `feature` module for features computed beforehand: passes them through."""

    def __init__(self, num_features: int = 2048) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


class RealismStats:
    """Inception features of generated and real images, accumulated batch by batch; `result()` gives FID,
    KID and KID's standard deviation over subsets."""

    def __init__(self, weights: str, seed: int = 0) -> None:
        self.network = inception(weights)
        self.seed = seed
        self.fake: list[torch.Tensor] = []
        self.real: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, fake: torch.Tensor, real: torch.Tensor) -> None:
        """N×3×H×W images in [0, 1] (1-channel images are repeated to RGB)."""
        self.fake.append(self.network(_rgb(fake)).double())
        self.real.append(self.network(_rgb(real)).double())

    def result(self) -> dict[str, float]:
        from torchmetrics.image.kid import KernelInceptionDistance

        fake, real = torch.cat(self.fake), torch.cat(self.real)
        values = {"fid": frechet_distance(fake, real)}
        subset = min(KID_SUBSET_SIZE, len(real), len(fake))
        if subset >= 2:
            with warnings.catch_warnings():  # "KID keeps all features in memory": a split's worth is small
                warnings.simplefilter("ignore")
                kid = KernelInceptionDistance(
                    feature=_Features(real.shape[1]),
                    subsets=KID_SUBSETS,
                    subset_size=subset,
                    reset_real_features=True,
                )
                kid.update(real, real=True)
                kid.update(fake, real=False)
            with torch.random.fork_rng(devices=[]):  # KID draws its subsets from the global RNG
                torch.manual_seed(self.seed)
                mean, std = kid.compute()
            values["kid"] = float(mean)
            if subset < min(len(real), len(fake)):  # else every subset is the whole split: a spread of 0
                values["kid_std"] = float(std)
        return values


def frechet_distance(fake: torch.Tensor, real: torch.Tensor) -> float:
    """FID between two N×D feature sets (module docstring): exact low-rank form when either set has at most
    D samples, torchmetrics' FrechetInceptionDistance otherwise."""
    fake, real = fake.double(), real.double()
    if min(len(fake), len(real)) > fake.shape[1]:
        from torchmetrics.image.fid import FrechetInceptionDistance

        fid = FrechetInceptionDistance(feature=_Features(fake.shape[1])).set_dtype(torch.float64)
        fid.update(real, real=True)
        fid.update(fake, real=False)
        return float(fid.compute())
    a = (fake - fake.mean(0)) / max(len(fake) - 1, 1) ** 0.5
    b = (real - real.mean(0)) / max(len(real) - 1, 1) ** 0.5
    trace_root = torch.linalg.svdvals(a @ b.T).sum()
    distance = (fake.mean(0) - real.mean(0)).square().sum() + a.square().sum() + b.square().sum()
    return float(distance - 2 * trace_root)


def _rgb(images: torch.Tensor) -> torch.Tensor:
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
