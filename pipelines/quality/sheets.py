"""Contact sheets: input | output | target rows of fixed samples, labelled, to compare versions by eye.

`p2p evaluate` takes the first `sheet_samples` samples of the split in manifest order (the evaluation
loader is deterministic), so two versions evaluated on the same manifest and split show the same rows. Tiles
smaller than `MIN_TILE` pixels are enlarged with nearest neighbour so that the labels stay legible and no
pixel is smoothed away.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

MIN_TILE = 128
HEADER = 22  # pixels of the title and column-label rows
FONT = cv2.FONT_HERSHEY_SIMPLEX


def contact_sheet(
    inputs: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor, keys: list[str], title: str
) -> np.ndarray:
    """H×W×3 uint8 RGB: a title line, column labels, then one row per sample with its key."""
    from pix2pix.visualize import sample_grid

    # OpenCV draws only into C-contiguous arrays; the grid comes from a permuted tensor (strided).
    grid = np.ascontiguousarray(sample_grid(inputs, outputs, targets, max_rows=len(inputs)))
    tile = inputs.shape[-1]
    scale = max(1, -(-MIN_TILE // tile))  # ceil
    if scale > 1:
        grid = cv2.resize(grid, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    tile *= scale
    header = np.full((2 * HEADER, grid.shape[1], 3), 255, np.uint8)
    _text(header, title, (4, HEADER - 6), 0.45)
    for column, label in enumerate(("input", "output", "target")):
        _text(header, label, (column * tile + 4, 2 * HEADER - 6), 0.5)
    rows = grid.shape[0] // max(1, len(keys))
    for row, key in enumerate(keys):
        _text(grid, key[-40:], (4, row * rows + rows - 6), 0.4, outline=True)
    return np.concatenate([header, grid], axis=0)


def _text(image: np.ndarray, text: str, at: tuple[int, int], scale: float, outline: bool = False) -> None:
    if outline:  # white on a black outline: readable on any photo
        cv2.putText(image, text, at, FONT, scale, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(image, text, at, FONT, scale, (255, 255, 255), 1, cv2.LINE_AA)
    else:
        cv2.putText(image, text, at, FONT, scale, (0, 0, 0), 1, cv2.LINE_AA)
