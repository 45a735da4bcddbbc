"""Label maps as class ids, and the FCN-score of segmentations against them.

A labels→photo dataset stores its inputs as colour-coded label maps (the manifest's `palette`: class id →
RGB, plus the `ignore_id` of unlabelled pixels). The segmenter and the FCN-score need class ids: `ClassMap`
maps colours back, exactly (label maps are resized with nearest neighbour end to end, so every pixel holds a
palette colour). Evaluated classes are the palette's ids without `ignore_id`, numbered 0..K-1 in id order;
the ignore colour and any colour outside the palette become `IGNORE` and are left out of every score.

Scores are the three of the pix2pix paper's FCN-score (Cityscapes: L1+cGAN 0.66 / 0.23 / 0.17 against the
real photos' 0.80 / 0.26 / 0.21), from a confusion matrix summed over all pixels of the split: per-pixel
accuracy (correct / labelled pixels), per-class accuracy (mean over classes present in the ground truth of
correct / that class's pixels) and class IoU (mean over classes with a non-empty union, i.e. present in the
ground truth or the prediction, of intersection / union).

The authors' scripts/eval_cityscapes/util.py (`get_scores`) averages both over all classes instead: with
+1e-12 in every denominator an absent class scores 0 rather than NaN, so `nanmean` keeps it. The two agree
when every class occurs in the split's ground truth (as on Cityscapes' full val set, and CamVid's val
split); on a split where some classes never occur, the class accuracy and IoU here come out higher.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch

IGNORE = 255  # label value of unlabelled pixels (cross-entropy's ignore_index, left out of every score)


@dataclass(frozen=True)
class ClassMap:
    ids: tuple[int, ...]  # palette ids of the evaluated classes, in order: index k is label k
    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]

    @classmethod
    def from_palette(cls, palette: dict[str, Any] | None) -> ClassMap:
        """From a manifest's `palette` (`{"classes": [{"id", "name", "color"}], "ignore_id": ...}`)."""
        if not palette or not palette.get("classes"):
            raise ValueError("the dataset has no label palette: the FCN-score needs a labels→photo dataset")
        ignore = palette.get("ignore_id")
        classes = sorted((c for c in palette["classes"] if c["id"] != ignore), key=lambda c: c["id"])
        if len(classes) < 2:
            raise ValueError("the palette has fewer than 2 classes besides the ignore id")
        return cls(
            tuple(int(c["id"]) for c in classes),
            tuple(str(c.get("name", c["id"])) for c in classes),
            tuple((int(c["color"][0]), int(c["color"][1]), int(c["color"][2])) for c in classes),
        )

    @property
    def classes(self) -> int:
        return len(self.ids)

    def fingerprint(self) -> str:
        """Identifies the classes and their colours: a segmenter only scores datasets with the same one."""
        text = json.dumps([self.ids, self.colors])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def labels(self, label_map: torch.Tensor) -> torch.Tensor:
        """N×3×H×W colour-coded label maps in [-1, 1] (as the loader gives them) → N×H×W int64 labels
        0..K-1, IGNORE for the ignore colour and colours outside the palette."""
        if label_map.dim() != 4 or label_map.shape[1] != 3:
            raise ValueError(f"label maps must be N×3×H×W colours, got {tuple(label_map.shape)}")
        rgb = ((label_map.float() + 1) * 127.5).round().long()  # exact inverse of x / 127.5 - 1
        code = (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]
        out = torch.full(code.shape, IGNORE, dtype=torch.long, device=code.device)
        for k, (r, g, b) in enumerate(self.colors):
            out[code == ((r << 16) | (g << 8) | b)] = k
        return out


def confusion(predicted: torch.Tensor, truth: torch.Tensor, classes: int) -> torch.Tensor:
    """K×K int64 counts, rows = true class, columns = predicted class, IGNORE pixels left out."""
    keep = truth != IGNORE
    index = truth[keep] * classes + predicted[keep]
    return torch.bincount(index.flatten().cpu(), minlength=classes * classes).reshape(classes, classes)


def fcn_scores(matrix: torch.Tensor) -> dict[str, float]:
    """Per-pixel accuracy, per-class accuracy and class IoU of a confusion matrix (module docstring)."""
    m = matrix.double()
    correct = m.diag()
    truth, predicted = m.sum(1), m.sum(0)
    union = truth + predicted - correct
    present = truth > 0
    return {
        "pixel_acc": float(correct.sum() / m.sum().clamp(min=1)),
        "class_acc": float((correct[present] / truth[present]).mean()) if present.any() else 0.0,
        "iou": float((correct[union > 0] / union[union > 0]).mean()) if (union > 0).any() else 0.0,
    }
