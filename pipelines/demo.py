"""`p2p demo`: the set-up smoke test. Trains a small pix2pix model (gray → colour) for a few steps on random
crops of real photos that ship with installed dependencies, so it needs no data and no network."""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import cv2
import numpy as np
import torch

from pix2pix import Pix2PixConfig, TrainingStep, save_checkpoint
from pix2pix.metrics import image_metrics, to_unit
from pix2pix.visualize import sample_grid

# Photos shipped inside dependencies' wheels (scikit-learn and matplotlib come with mlflow).
BUNDLED_PHOTOS = [
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
]


@dataclass
class DemoConfig:
    steps: int = 60
    size: int = 128
    batch_size: int = 4
    seed: int = 0
    output_dir: str = "runs/demo"


def bundled_photos() -> list[np.ndarray]:
    """RGB uint8 photos found in installed packages."""
    photos = []
    for package, relative in BUNDLED_PHOTOS:
        spec = find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        path = Path(next(iter(spec.submodule_search_locations))) / relative
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is not None:
            photos.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    if not photos:
        raise RuntimeError(
            "no bundled photos found: is the project installed with its dependencies (make setup)?"
        )
    return photos


def random_pairs(
    photos: list[np.ndarray], n: int, size: int, rng: np.random.Generator
) -> tuple[torch.Tensor, ...]:
    """n random crops → (gray input N×1×H×W, colour target N×3×H×W), both in [-1, 1]."""
    crops = []
    for _ in range(n):
        photo = photos[rng.integers(len(photos))]
        y = rng.integers(photo.shape[0] - size + 1)
        x = rng.integers(photo.shape[1] - size + 1)
        crops.append(photo[y : y + size, x : x + size])
    color = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    gray = (0.299 * color[:, 0:1] + 0.587 * color[:, 1:2] + 0.114 * color[:, 2:3]).contiguous()
    return gray, color


def run_demo(cfg: DemoConfig) -> None:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    photos = bundled_photos()
    model_cfg = Pix2PixConfig(input_nc=1, output_nc=3, netG="unet_128", ngf=32, ndf=32)
    step = TrainingStep(model_cfg)
    val_a, val_b = random_pairs(photos, 4, cfg.size, np.random.default_rng(cfg.seed + 1))
    print(
        f"[demo] {len(photos)} bundled photos, unet_128 ngf=32 at {cfg.size}px, batch {cfg.batch_size}, "
        f"{cfg.steps} steps on {torch.get_num_threads()} CPU threads"
    )
    start = time.perf_counter()
    for i in range(1, cfg.steps + 1):
        losses = step(*random_pairs(photos, cfg.batch_size, cfg.size, rng))
        if i % 10 == 0 or i == cfg.steps:
            rate = i * cfg.batch_size / (time.perf_counter() - start)
            print(
                f"[demo] step {i:4d}  "
                + "  ".join(f"{k}={float(v):.3f}" for k, v in losses.items())
                + f"  ({rate:.1f} samples/s)"
            )
    step.G.eval()
    with torch.no_grad():
        fake = step.G(val_a)
    metrics = image_metrics(to_unit(fake), to_unit(val_b))
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "checkpoint.pt", step)
    grid = sample_grid(val_a, fake, val_b)
    cv2.imwrite(str(out / "samples.png"), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    print("[demo] held-out crops: " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    print(f"[demo] checkpoint: {out / 'checkpoint.pt'}")
    print(f"[demo] samples (input | output | target): {out / 'samples.png'}")
