"""`p2p demo`: the whole pipeline on embedded defaults, on this machine, in a few minutes.

1. raw photos: deterministic crops of real photos that ship inside installed dependencies (scikit-learn's
   sample images, matplotlib's sample data), so the demo needs no data download and no ../shared;
2. `p2p dataset build`: photos → Canny edges → WebDataset shards + manifest (edges → photo);
3. `p2p train`: a small U-Net for a few minutes on 2 CPU workers (local Ray), tracked in sqlite MLflow,
   registered as a new model version;
4. `p2p promote`: the version becomes `champion` if it beats the current one;
5. `p2p translate`: the test split through `models:/NAME@champion`.

`--s3` runs the same pipeline with raw photos, dataset and checkpoints on a local SeaweedFS S3 server.
`--smoke` keeps the old set-up check: a few library-level training steps, no Ray.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import cv2
import numpy as np
import torch

from pipelines import storage
from pipelines.config import ConfigError, option
from pipelines.runtime import environment

# Photos shipped inside dependencies' wheels (scikit-learn and matplotlib come with mlflow).
BUNDLED_PHOTOS = [
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
]
MODEL_NAME = "demo-edges2photo"


@dataclass
class DemoConfig:
    output_dir: str = option("runs/demo", "where everything goes")
    crops: int = option(60, "raw photos cut from the bundled ones")
    size: int = option(128, "stored and trained size in px (unet_128)")
    epochs: int = option(80, "training epochs: half at the initial LR, half decaying")
    workers: int = option(2, "training workers")
    s3: bool = option(False, "raw photos, dataset and checkpoints on a local SeaweedFS S3 server")
    smoke: bool = option(False, "only a few library-level training steps, no Ray")
    steps: int = option(60, "--smoke: training steps")
    seed: int = option(0, "seed of the crops and of training")


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


def write_raw_photos(target: str, count: int, size: int, seed: int) -> None:
    """`count` crops (random position and scale, some mirrored) saved as JPEG files under `target`."""
    rng = np.random.default_rng(seed)
    photos = bundled_photos()
    for i in range(count):
        photo = photos[i % len(photos)]
        side = int(rng.integers(size, min(photo.shape[:2]) + 1))
        y, x = (int(rng.integers(photo.shape[d] - side + 1)) for d in (0, 1))
        crop = cv2.resize(
            photo[y : y + side, x : x + side], (size + size // 8,) * 2, interpolation=cv2.INTER_AREA
        )
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        ok, data = cv2.imencode(".jpg", cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_RGB2BGR))
        assert ok
        storage.write_bytes_atomic(storage.join(target, f"photo_{i:04d}.jpg"), data.tobytes())


@contextlib.contextmanager
def local_s3(root: Path) -> Iterator[str]:
    """A SeaweedFS S3 server for the demo, its data kept under `root`; yields the bucket URI."""
    try:
        from devtools.local_s3 import LocalS3Server
    except ImportError as exc:
        raise ConfigError(
            "--s3 runs a local SeaweedFS server from the project's dev tools: install them from the checkout "
            "with `pip install -e '.[dev]'` (make setup does)"
        ) from exc

    with LocalS3Server(data_dir=root / "s3-data", buckets=["p2p-demo"]) as server, environment(server.env()):
        print(f"[demo] local S3 (SeaweedFS) at {server.endpoint_url}, bucket p2p-demo", flush=True)
        yield "s3://p2p-demo"


def run_pipeline(cfg: DemoConfig, root: Path, base: str) -> dict[str, str]:
    from pipelines.config import from_dict
    from pipelines.dataset.build import DatasetBuildConfig, run_build
    from pipelines.inference.translate import TranslateConfig, run_translate
    from pipelines.registry import tracking
    from pipelines.registry.promote import PromoteConfig, current_champion, promote
    from pipelines.training.train import TrainJobConfig, run_training

    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    raw, dataset = storage.join(base, "raw"), storage.join(base, "dataset")
    timings = {}
    started = time.perf_counter()
    print(f"[demo] 1/5 raw photos: {cfg.crops} crops of bundled photos → {raw}", flush=True)
    write_raw_photos(raw, cfg.crops, cfg.size, cfg.seed)

    print("[demo] 2/5 dataset: photos → Canny edges → shards", flush=True)
    run_build(
        from_dict(
            DatasetBuildConfig,
            {
                "source": {"uri": raw, "layout": "photos"},
                "output": dataset,
                "derive": {"builder": "canny"},
                "resize": {"mode": "resize", "size": cfg.size + cfg.size // 8},
                "split": {"train": 0.8, "val": 0.1, "test": 0.1},
                "shards": {"samples_per_shard": 16},
                # The demo owns this folder: the lock of a demo killed mid-build is stale, and `p2p demo`
                # has no --break-lock to offer. A live build's lock still stops it.
                "lock": {"break_lock": True},
            },
        )
    )
    timings["dataset_s"] = time.perf_counter() - started

    print(f"[demo] 3/5 training unet_128 on {cfg.workers} CPU workers for {cfg.epochs} epochs", flush=True)
    half = max(1, cfg.epochs // 2)
    job = from_dict(
        TrainJobConfig,
        {
            "data": {
                "manifest": dataset,
                "load_size": cfg.size + cfg.size // 8,
                "crop_size": cfg.size,
            },
            "model": {
                "netG": "unet_128",
                "ngf": 32,
                "ndf": 32,
                "n_epochs": half,
                "n_epochs_decay": cfg.epochs - half,
            },
            "mlflow": {
                "tracking_uri": tracking_uri,
                "experiment": "demo",
                "register_as": MODEL_NAME,
                "log_every": 5,
            },
            "storage": storage.join(base, "checkpoints"),
            "workers": cfg.workers,
            "global_batch_size": 2 * cfg.workers,
            "cpus_per_worker": 2 / cfg.workers if (os.cpu_count() or 2) <= 2 else 1.0,
            "seed": cfg.seed,
        },
    )
    trained = run_training(job)
    timings["train_s"] = time.perf_counter() - started - timings["dataset_s"]

    print(f"[demo] 4/5 promotion of {MODEL_NAME} version {trained['registered_version']}", flush=True)
    decision = promote(
        PromoteConfig(
            MODEL_NAME, str(trained["registered_version"]), dataset, "test", tracking_uri=tracking_uri
        )
    )
    print(
        f"[demo]     {'promoted' if decision['promoted'] else 'not promoted'}: {decision['reason']}",
        flush=True,
    )

    translated = storage.join(base, "translated")
    # Said by number: after an earlier demo in this folder the champion may be another version than the
    # one just trained (a retrained model is promoted only if it beats it).
    champion = current_champion(tracking.client(tracking_uri), MODEL_NAME)
    print(
        f"[demo] 5/5 translating the test split with models:/{MODEL_NAME}@champion (version {champion}) → "
        f"{translated}",
        flush=True,
    )
    champion_uri = f"models:/{MODEL_NAME}/{champion}"
    run_translate(TranslateConfig(champion_uri, dataset, translated, split="test", tracking_uri=tracking_uri))
    sheet = storage.join(base, "test-sheet.png")
    write_sheet(champion_uri, dataset, "test", tracking_uri, sheet)
    timings["total_s"] = time.perf_counter() - started
    return {
        "sheet": sheet,
        "dataset": dataset,
        "translated": translated,
        "tracking_uri": tracking_uri,
        "run": trained["run_name"],
        "version": str(trained["registered_version"]),
        "champion": str(champion),
        "minutes": f"{timings['total_s'] / 60:.1f}",
    }


def write_sheet(model_uri: str, dataset: str, split: str, tracking_uri: str, target: str) -> None:
    """input | output | target of every sample of `split` as one PNG: what the translated folder holds,
    beside what it should look like (the same model on the same preprocessed inputs, in eval mode)."""
    from pipelines.images import encode_image
    from pipelines.manifest import Manifest
    from pipelines.registry.models import load_model
    from pipelines.registry.scoring import Quality, score_split

    samples = Manifest.read(dataset).split(split).samples
    model = load_model(model_uri, tracking_uri)
    scores = score_split(model, dataset, split, quality=Quality(sheet_samples=samples))
    if scores.sheet is not None:
        storage.write_bytes_atomic(target, encode_image(scores.sheet, "png"))


def command(name: str) -> str:
    """How to run an installed command from here: its bare name when the shell finds this environment's
    copy, else its path (e.g. `.venv/bin/p2p` when the virtual environment is not activated)."""
    installed = Path(sys.executable).parent / name
    if shutil.which(name) == str(installed):
        return name
    with contextlib.suppress(ValueError):
        return str(installed.relative_to(Path.cwd()))
    return str(installed)


def run_demo(cfg: DemoConfig) -> dict[str, str]:
    for name in ("crops", "size", "epochs", "workers", "steps"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.smoke:
        run_smoke(cfg)
        return {}
    root = Path(cfg.output_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(local_s3(root)) if cfg.s3 else str(root)
        if cfg.s3:
            base = storage.join(base, f"demo-{time.strftime('%Y%m%d-%H%M%S')}")
        result = run_pipeline(cfg, root, base)
    p2p, mlflow = command("p2p"), command("mlflow")
    print(
        f"""
[demo] done in {result["minutes"]} min.
  dataset:      {result["dataset"]}
                {p2p} dataset inspect {result["dataset"]} --verify
  translated:   {result["translated"]}
  side by side: {result["sheet"]}   (input | output | target, test split)
  MLflow:       run {result["run"]}; model {MODEL_NAME} v{result["version"]}; champion (translated, side by
                side): v{result["champion"]}, models:/{MODEL_NAME}@champion
                {mlflow} ui --backend-store-uri {result["tracking_uri"]}   (then open http://127.0.0.1:5000)
""",
        flush=True,
    )
    return result


# --------------------------------------------------------------------------------------------------------
# --smoke: the library alone, no Ray
# --------------------------------------------------------------------------------------------------------


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


def run_smoke(cfg: DemoConfig) -> None:
    from pix2pix import Pix2PixConfig, TrainingStep, save_checkpoint
    from pix2pix.metrics import image_metrics, to_unit
    from pix2pix.visualize import sample_grid

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    photos = bundled_photos()
    step = TrainingStep(Pix2PixConfig(input_nc=1, output_nc=3, netG="unet_128", ngf=32, ndf=32))
    val_a, val_b = random_pairs(photos, 4, cfg.size, np.random.default_rng(cfg.seed + 1))
    print(
        f"[smoke] {len(photos)} bundled photos, unet_128 ngf=32 at {cfg.size}px, {cfg.steps} steps",
        flush=True,
    )
    start = time.perf_counter()
    for i in range(1, cfg.steps + 1):
        losses = step(*random_pairs(photos, 4, cfg.size, rng))
        if i % 10 == 0 or i == cfg.steps:
            rate = i * 4 / (time.perf_counter() - start)
            text = "  ".join(f"{k}={float(v):.3f}" for k, v in losses.items())
            print(f"[smoke] step {i:4d}  {text}  ({rate:.1f} samples/s)", flush=True)
    step.G.eval()
    with torch.no_grad():
        fake = step.G(val_a)
    metrics = image_metrics(to_unit(fake), to_unit(val_b))
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "checkpoint.pt", step)
    cv2.imwrite(str(out / "samples.png"), cv2.cvtColor(sample_grid(val_a, fake, val_b), cv2.COLOR_RGB2BGR))
    print("[smoke] held-out crops: " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    print(f"[smoke] checkpoint: {out / 'checkpoint.pt'}")
    print(f"[smoke] samples (input | output | target): {out / 'samples.png'}")
