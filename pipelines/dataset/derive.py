"""Input derivations ("builders") computed from photos or label masks. Pure numpy/OpenCV.

* :func:`canny_edges`: OpenCV Canny with automatic thresholds around the image median, in the pix2pix
  authors' convention (black edges on white);
* :func:`finish_edges`: the last, CPU-only steps of HED's post-processing (`pipelines.dataset.hed`), here
  so that a shard task can run them without importing torch;
* :func:`grayscale`: ITU-R BT.601 luma;
* :class:`Palette` and :func:`colorize_labels`: class-id masks -> colour label maps (Cityscapes, CamVid
  ``classes.json``, or a CSV of ``id,name,r,g,b``).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipelines.images import BadInput

__all__ = [
    "CITYSCAPES_CLASSES",
    "Palette",
    "canny_edges",
    "canny_thresholds",
    "colorize_labels",
    "finish_edges",
    "grayscale",
    "remap_labels",
    "remove_small_components",
]

RGB = tuple[int, int, int]
MAX_ID = 65535  # class ids are stored in uint8 or uint16 masks

# Cityscapes train ids 0..18 (cityscapesScripts labels.py); 255 is "ignore" and colours black.
CITYSCAPES_CLASSES: tuple[tuple[int, str, RGB], ...] = (
    (0, "road", (128, 64, 128)),
    (1, "sidewalk", (244, 35, 232)),
    (2, "building", (70, 70, 70)),
    (3, "wall", (102, 102, 156)),
    (4, "fence", (190, 153, 153)),
    (5, "pole", (153, 153, 153)),
    (6, "traffic light", (250, 170, 30)),
    (7, "traffic sign", (220, 220, 0)),
    (8, "vegetation", (107, 142, 35)),
    (9, "terrain", (152, 251, 152)),
    (10, "sky", (70, 130, 180)),
    (11, "person", (220, 20, 60)),
    (12, "rider", (255, 0, 0)),
    (13, "car", (0, 0, 142)),
    (14, "truck", (0, 0, 70)),
    (15, "bus", (0, 60, 100)),
    (16, "train", (0, 80, 100)),
    (17, "motorcycle", (0, 0, 230)),
    (18, "bicycle", (119, 11, 32)),
)
CITYSCAPES_IGNORE_ID = 255


# ----------------------------------------------------------------------------------------------------
# Greyscale and edges
# ----------------------------------------------------------------------------------------------------


def grayscale(rgb: np.ndarray) -> np.ndarray:
    """HxWx3 RGB (or HxWx4 RGBA) -> HxW luma 0.299 R + 0.587 G + 0.114 B (cv2.COLOR_RGB2GRAY); HxW as is."""
    if rgb.ndim == 2:
        return rgb
    if rgb.ndim == 3 and rgb.shape[2] == 1:
        return np.ascontiguousarray(rgb[..., 0])
    if rgb.ndim == 3 and rgb.shape[2] in (3, 4):
        code = cv2.COLOR_RGB2GRAY if rgb.shape[2] == 3 else cv2.COLOR_RGBA2GRAY
        return cv2.cvtColor(np.ascontiguousarray(rgb), code)
    raise ValueError(f"expected an HxW or HxWx3 image, got shape {rgb.shape}")


def _median_u8(gray: np.ndarray) -> float:
    """np.median of an HxW uint8 image from its histogram (O(n), no sort). OpenCV's histogram is three
    times as fast as np.bincount's, but its float32 counts are exact only below 2**24 pixels."""
    if gray.size < 2**24:
        counts = cv2.calcHist([np.ascontiguousarray(gray)], [0], None, [256], [0, 256]).ravel()
    else:
        counts = np.bincount(gray.ravel(), minlength=256)
    cumulative = np.cumsum(counts.astype(np.int64))
    n = int(cumulative[-1])
    lower = int(np.searchsorted(cumulative, (n - 1) // 2 + 1))
    upper = int(np.searchsorted(cumulative, n // 2 + 1))
    return (lower + upper) / 2.0


def canny_thresholds(gray: np.ndarray, sigma: float = 0.33) -> tuple[float, float]:
    """The usual automatic Canny thresholds: ``(max(0, (1 - sigma) m), min(255, (1 + sigma) m))`` for the
    median ``m`` of the (unblurred) greyscale image. RGB input is converted with :func:`grayscale`."""
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    gray = grayscale(gray)
    if gray.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {gray.dtype}")
    if gray.size == 0:
        raise ValueError("empty image")
    median = _median_u8(gray)
    return max(0.0, (1.0 - sigma) * median), min(255.0, (1.0 + sigma) * median)


def canny_edges(
    rgb: np.ndarray,
    low: float | None = None,
    high: float | None = None,
    sigma: float = 0.33,
    blur: int = 3,
    invert: bool = False,
) -> np.ndarray:
    """Canny edges of an HxWx3 RGB (or HxW greyscale) uint8 image -> HxW uint8.

    The pix2pix authors' convention: white (255) background, black (0) edges; ``invert=True`` gives white
    edges on black. ``low``/``high`` None (both): :func:`canny_thresholds` of the unblurred greyscale image
    with ``sigma`` (call it yourself to record the values used). ``blur``: odd Gaussian kernel size applied
    before Canny, 0 for none.
    """
    if (low is None) != (high is None):
        raise ValueError("give both Canny thresholds (low and high) or neither")
    gray = grayscale(rgb)
    if gray.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {gray.dtype}")
    if low is None or high is None:
        low, high = canny_thresholds(gray, sigma)
    if low < 0 or high < low:
        raise ValueError(f"Canny thresholds must satisfy 0 <= low <= high, got {low}, {high}")
    if blur < 0 or (blur and blur % 2 == 0):
        raise ValueError(f"blur must be 0 or an odd kernel size, got {blur}")
    if blur > 1:
        gray = cv2.GaussianBlur(gray, (blur, blur), 0)
    edges = cv2.Canny(np.ascontiguousarray(gray), float(low), float(high))
    return edges if invert else cv2.bitwise_not(edges)


def remove_small_components(mask: np.ndarray, min_size: int = 5) -> np.ndarray:
    """Drop 8-connected components with fewer than ``min_size`` pixels (MATLAB ``bwareaopen``)."""
    mask = np.asarray(mask, dtype=bool)
    if min_size <= 1 or not mask.any():
        return mask.copy()
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_size
    keep[0] = False  # background
    return keep[labels]


def finish_edges(thinned: np.ndarray, min_size: int = 5, invert: bool = True) -> np.ndarray:
    """PostprocessHED.m's last steps on thinned edges: drop pieces under ``min_size`` px, then uint8 edges
    (black on white when ``invert``)."""
    edges = remove_small_components(thinned, min_size)
    return np.where(edges, 0, 255).astype(np.uint8) if invert else edges.astype(np.uint8) * 255


# ----------------------------------------------------------------------------------------------------
# Palettes
# ----------------------------------------------------------------------------------------------------


def _class_id(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID:
        raise ValueError(f"{where}: class id must be an integer 0..{MAX_ID}, got {value!r}")
    return value


def _color(value: Any, where: str) -> RGB:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 3
        or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in value)
    ):
        raise ValueError(f"{where}: colour must be three integers 0..255, got {value!r}")
    return (int(value[0]), int(value[1]), int(value[2]))


@dataclass(frozen=True)
class Palette:
    """Class id -> RGB colour (and name). ``ignore_id``: the "unlabelled" id, coloured by its palette entry
    if it has one, else black."""

    colors: dict[int, RGB]
    names: dict[int, str] = field(default_factory=dict)
    ignore_id: int | None = None

    def __post_init__(self) -> None:
        colors = {_class_id(k, "palette"): _color(v, f"palette id {k}") for k, v in self.colors.items()}
        if not colors:
            raise ValueError("palette has no classes")
        names = {k: str(self.names.get(k, f"class_{k}")) for k in sorted(colors)}
        object.__setattr__(self, "colors", dict(sorted(colors.items())))
        object.__setattr__(self, "names", names)
        if self.ignore_id is not None:
            object.__setattr__(self, "ignore_id", _class_id(self.ignore_id, "palette ignore_id"))

    @property
    def ignore_color(self) -> RGB:
        if self.ignore_id is None:
            return (0, 0, 0)
        return self.colors.get(self.ignore_id, (0, 0, 0))

    @classmethod
    def from_classes_json(cls, path_or_dict: str | os.PathLike[str] | Mapping[str, Any]) -> Palette:
        """``{"classes": [{"id", "name", "color": [r, g, b]}, ...], "ignore_id": 11}`` (CamVid's
        ``classes.json``; also what :meth:`to_dict` writes). A path or the parsed mapping."""
        where = "classes"
        if isinstance(path_or_dict, Mapping):
            spec: Any = path_or_dict
        else:
            where = str(path_or_dict)
            with open(path_or_dict, encoding="utf-8") as f:
                spec = json.load(f)
        if not isinstance(spec, Mapping) or not isinstance(spec.get("classes"), list):
            raise ValueError(f"{where}: expected a mapping with a 'classes' list")
        colors: dict[int, RGB] = {}
        names: dict[int, str] = {}
        for i, entry in enumerate(spec["classes"]):
            if not isinstance(entry, Mapping) or not {"id", "color"} <= set(entry):
                raise ValueError(f"{where}: classes[{i}] needs 'id' and 'color', got {entry!r}")
            cid = _class_id(entry["id"], f"{where}: classes[{i}]")
            if cid in colors:
                raise ValueError(f"{where}: class id {cid} appears twice")
            colors[cid] = _color(entry["color"], f"{where}: classes[{i}]")
            names[cid] = str(entry.get("name", f"class_{cid}"))
        return cls(colors, names, spec.get("ignore_id"))

    @classmethod
    def cityscapes(cls) -> Palette:
        """The 19 Cityscapes train ids with their official colours; ignore id 255 (black)."""
        return cls(
            {cid: color for cid, _, color in CITYSCAPES_CLASSES},
            {cid: name for cid, name, _ in CITYSCAPES_CLASSES},
            CITYSCAPES_IGNORE_ID,
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], ignore_id: int | None = None) -> Palette:
        """A ``.json`` file as in :meth:`from_classes_json`, or a ``.csv`` with a header row and columns
        ``id,name,r,g,b``. ``ignore_id``, when given, replaces the file's (CSV files have none)."""
        suffix = Path(path).suffix.lower()
        if suffix == ".json":
            palette = cls.from_classes_json(path)
        elif suffix == ".csv":
            palette = cls._from_csv(path)
        else:
            raise ValueError(f"{path}: palette files must end in .json or .csv")
        if ignore_id is not None:
            palette = cls(palette.colors, palette.names, ignore_id)
        return palette

    @classmethod
    def _from_csv(cls, path: str | os.PathLike[str]) -> Palette:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            raise ValueError(f"{path}: empty palette CSV")
        header = [h.strip().lower() for h in rows[0]]
        missing = [c for c in ("id", "name", "r", "g", "b") if c not in header]
        if missing:
            raise ValueError(f"{path}: palette CSV header needs id,name,r,g,b; missing {', '.join(missing)}")
        col = {c: header.index(c) for c in ("id", "name", "r", "g", "b")}
        colors: dict[int, RGB] = {}
        names: dict[int, str] = {}
        for line, row in enumerate(rows[1:], start=2):
            if not any(cell.strip() for cell in row):
                continue
            try:
                cid = int(row[col["id"]])
                color = [int(row[col[c]]) for c in ("r", "g", "b")]
                name = row[col["name"]].strip()
            except (ValueError, IndexError):
                raise ValueError(f"{path}:{line}: expected id,name,r,g,b, got {row!r}") from None
            cid = _class_id(cid, f"{path}:{line}")
            if cid in colors:
                raise ValueError(f"{path}:{line}: class id {cid} appears twice")
            colors[cid] = _color(color, f"{path}:{line}")
            names[cid] = name or f"class_{cid}"
        return cls(colors, names)

    @classmethod
    def load(cls, spec: str) -> Palette:
        """``"cityscapes"`` or a path to a ``.json``/``.csv`` palette file."""
        if spec.strip().lower() == "cityscapes":
            return cls.cityscapes()
        if spec.lower().endswith((".json", ".csv")):
            return cls.from_file(spec)
        raise ValueError(f"palette {spec!r}: expected 'cityscapes' or a path to a .json or .csv file")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, in the ``classes.json`` layout (:meth:`from_classes_json` reads it back)."""
        return {
            "classes": [
                {"id": cid, "name": self.names[cid], "color": list(color)}
                for cid, color in self.colors.items()
            ],
            "ignore_id": self.ignore_id,
            "ignore_color": list(self.ignore_color),
        }


# ----------------------------------------------------------------------------------------------------
# Label maps
# ----------------------------------------------------------------------------------------------------


def _id_ranges(ids: Iterable[int]) -> str:
    """[0, 1, 2, 3, 7, 255] -> '0..3, 7, 255'."""
    values = sorted(set(ids))
    parts: list[str] = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}..{values[j]}")
        i = j + 1
    return ", ".join(parts)


def _check_ids(ids: np.ndarray) -> None:
    if ids.ndim != 2:
        raise ValueError(f"expected an HxW class-id map, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"class ids must be integers, got {ids.dtype}")


def remap_labels(ids: np.ndarray, remap: Mapping[int, int]) -> np.ndarray:
    """Replace ids by ``remap`` (ids not in it are kept); returns uint8 or uint16 ids (a lookup table)."""
    _check_ids(ids)
    if ids.size and int(ids.min()) < 0:
        raise BadInput(f"label mask has negative ids (min {int(ids.min())})")
    targets = {_class_id(k, "remap key"): _class_id(v, f"remap[{k}]") for k, v in remap.items()}
    top = max([int(ids.max()) if ids.size else 0, *targets])
    if top > MAX_ID:
        raise BadInput(f"label mask ids up to {top} exceed {MAX_ID}")
    lut = np.arange(top + 1, dtype=np.uint16)
    for k, v in targets.items():
        lut[k] = v
    out = lut[ids]
    return out.astype(np.uint8) if int(lut.max()) <= 255 else out


def colorize_labels(
    ids: np.ndarray,
    palette: Palette,
    remap: dict[int, int] | None = None,
    ignore_id: int | None = None,
) -> np.ndarray:
    """HxW class ids -> HxWx3 uint8 RGB colours of ``palette``.

    ``remap`` (old id -> new id) is applied first. Pixels equal to ``ignore_id`` (default: the palette's)
    get the ignore colour: the palette's colour for that id if it has one, else black. Any other id the
    palette lacks raises :class:`BadInput` naming up to 10 of them.
    """
    _check_ids(ids)
    if remap:
        ids = remap_labels(ids, remap)
    ignore = palette.ignore_id if ignore_id is None else _class_id(ignore_id, "ignore_id")
    out_shape = (*ids.shape, 3)
    if ids.size == 0:
        return np.zeros(out_shape, np.uint8)
    lo, hi = int(ids.min()), int(ids.max())
    known = set(palette.colors) | ({ignore} if ignore is not None else set())
    if lo < 0 or hi > MAX_ID:
        present = np.unique(ids)
        bad = [int(v) for v in present if int(v) not in known]
    else:
        size = max(hi, *known) + 1
        valid = np.zeros(size, dtype=bool)
        valid[list(known)] = True
        counts = np.bincount(ids.ravel(), minlength=size)
        bad = np.flatnonzero((counts > 0) & ~valid).tolist()
    if bad:
        listed = ", ".join(map(str, bad[:10])) + (f", ... ({len(bad)} in all)" if len(bad) > 10 else "")
        after = " after remap" if remap else ""
        raise BadInput(
            f"label mask has ids outside the palette{after}: [{listed}] (palette ids {_id_ranges(known)})"
        )
    lut = np.zeros((max(hi, *known) + 1, 3), dtype=np.uint8)
    for cid, color in palette.colors.items():
        lut[cid] = color
    if ignore is not None:
        lut[ignore] = palette.colors.get(ignore, (0, 0, 0))
    return lut[ids]
