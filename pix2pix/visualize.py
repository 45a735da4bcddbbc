"""Sample grids for eyeballing a model: one row per example, input | output | target."""

from __future__ import annotations

import numpy as np
import torch

from pix2pix.metrics import to_unit


def sample_grid(
    inputs: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor, max_rows: int = 8
) -> np.ndarray:
    """H×W×3 uint8 RGB image from N×C×H×W tensors in [-1, 1]; 1-channel images are shown as gray."""

    def rgb(x: torch.Tensor) -> torch.Tensor:
        x = to_unit(x[:max_rows].detach().cpu())
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]

    rows = torch.cat([rgb(inputs), rgb(outputs), rgb(targets)], dim=3)  # side by side
    grid = torch.cat(list(rows), dim=1)  # stacked vertically
    return (grid.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
