"""pix2pix (Isola et al. 2017) in plain PyTorch: networks, losses, the training step, checkpoints, metrics.

This package never imports Ray, MLflow or storage code; the pipelines build on it.
"""

from pix2pix.checkpoint import load_checkpoint, restore_training_step, save_checkpoint
from pix2pix.config import Pix2PixConfig
from pix2pix.inference import load_generator, translate
from pix2pix.networks import build_discriminator, build_generator, count_parameters, receptive_field
from pix2pix.training import ArchitectureMismatch, TrainingStep

__version__ = "0.1.0"

__all__ = [
    "ArchitectureMismatch",
    "Pix2PixConfig",
    "TrainingStep",
    "__version__",
    "build_discriminator",
    "build_generator",
    "count_parameters",
    "load_checkpoint",
    "load_generator",
    "receptive_field",
    "restore_training_step",
    "save_checkpoint",
    "translate",
]
