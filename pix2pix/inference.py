"""Generator inference: from a checkpoint (or a generator-only weights file) to translated images.

A generator file holds the config and the generator's tensors only; like a training checkpoint it loads
with `torch.load(weights_only=True)`, so reading it never runs code that came with it.
"""

from __future__ import annotations

import os
from typing import IO

import torch
from torch import nn

from pix2pix.checkpoint import FORMAT_VERSION, load_checkpoint
from pix2pix.config import Pix2PixConfig
from pix2pix.networks import build_generator


def load_generator(
    source: str | os.PathLike[str] | IO[bytes] | bytes, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Pix2PixConfig]:
    """The generator of a training checkpoint or generator file, in eval mode, with its config."""
    state = load_checkpoint(source, map_location=device)
    config = Pix2PixConfig.from_dict(state["config"])
    generator = build_generator(config).to(device)
    generator.load_state_dict(state["G"])
    return generator.eval(), config


def save_generator(
    target: str | os.PathLike[str] | IO[bytes], generator: nn.Module, config: Pix2PixConfig
) -> None:
    """The generator alone (config + tensors), readable by `load_generator`."""
    state = {"format_version": FORMAT_VERSION, "config": config.to_dict(), "G": generator.state_dict()}
    torch.save(state, target)


def set_dropout(module: nn.Module, active: bool) -> None:
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.train(active)


@torch.inference_mode()
def translate(generator: nn.Module, images: torch.Tensor, keep_dropout: bool = False) -> torch.Tensor:
    """G(x) for a batch in [-1, 1]. Eval mode (running batch-norm statistics); `keep_dropout=True` keeps
    dropout sampling, the paper's test-time noise, so repeated calls give different outputs."""
    was_training = generator.training
    generator.eval()
    set_dropout(generator, keep_dropout)
    try:
        device = next(generator.parameters()).device
        return generator(images.to(device))
    finally:
        generator.train(was_training)
