"""A small U-Net segmenter: photo → per-pixel class logits, for the FCN-score of labels→photo models.

The pix2pix paper scores generated street scenes by how well an off-the-shelf semantic segmentation network
(FCN-8s) recovers the input label map from them, next to how well it does on the real photos (the ceiling).
The protocol only needs a fixed segmenter trained on the real photos of the same dataset; a small U-Net
trained here keeps it free of torchvision and of downloaded weights. Its absolute scores are lower than
FCN-8s's; comparisons between generators (and against the real-photo ceiling) are what it is for.

Input: N×3×H×W photos in [-1, 1] (the generator's output range), H and W divisible by 2**depth.
Output: N×classes×H×W logits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class SegmenterConfig:
    classes: int
    width: int = 32  # channels of the first level; doubled at each level down
    depth: int = 4  # downsamplings

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class Segmenter(nn.Module):
    def __init__(self, cfg: SegmenterConfig) -> None:
        super().__init__()
        if cfg.classes < 2 or cfg.depth < 1 or cfg.width < 1:
            raise ValueError(f"a segmenter needs >= 2 classes, depth >= 1 and width >= 1, got {cfg}")
        self.cfg = cfg
        widths = [cfg.width * 2**i for i in range(cfg.depth + 1)]
        self.down = nn.ModuleList([_block(3, widths[0])])
        self.down.extend(_block(widths[i], widths[i + 1]) for i in range(cfg.depth))
        self.upsample = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(cfg.depth))
        )
        self.up = nn.ModuleList(_block(2 * widths[i], widths[i]) for i in reversed(range(cfg.depth)))
        self.head = nn.Conv2d(widths[0], cfg.classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        step = 2**self.cfg.depth
        if x.shape[-1] % step or x.shape[-2] % step:
            raise ValueError(f"segmenter input {tuple(x.shape[-2:])} must be divisible by {step}")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else nn.functional.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for upsample, block in zip(self.upsample, self.up, strict=True):
            x = block(torch.cat([skips.pop(), upsample(x)], dim=1))
        return self.head(x)
