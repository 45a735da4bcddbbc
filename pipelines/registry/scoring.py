"""Scoring a model on a dataset split, and recording the score as an MLflow evaluation run.

Shared by `p2p evaluate` and `p2p promote` (which scores candidate and champion the same way). The
model's recorded preprocessing is applied without random jitter and every sample of the split is read
once, so two models scored on the same manifest, split and seed are comparable.

One pass over the split computes:
- L1, PSNR, SSIM in [0, 1] units (always; they reward blur, which is why the metrics below exist);
- FID and KID against the split's real targets (`pipelines.quality.fid`), when the FID Inception weights
  are given (`fid_weights` or $P2P_FID_WEIGHTS);
- the FCN-score (`pipelines.quality.labels`) for labels→photo models, when the dataset has a palette and a
  segmenter is registered for it: per-pixel accuracy, per-class accuracy and class IoU of the segmenter on
  the generated photos (`fcn_*`) and, as their ceiling, on the real photos (`fcn_real_*`). Both photo sets
  are resized to the segmenter's training size (bilinear for photos, nearest for labels) when they differ;
- a labelled input | output | target sheet of the first `sheet_samples` samples, logged as an artifact of
  the evaluation run.
A metric that cannot be computed is skipped with one line saying why and how to enable it.

Resolution: `model` (the default) scores at the model's training geometry, as training validation does;
`native` feeds each stored input at its stored size (preprocess `none`: the dataset's own resolution, e.g.
480×360 for a CamVid build with `resize.mode: native`), runs the generator padded, tiled above
`tile_size` and cropped back (`LoadedModel.translate`), and compares with the stored target at that same
size. Native samples go one per generator call (stored sizes may differ); sheet rows of another size than
the first are resized to it for the picture only. The two resolutions give different numbers: an
evaluation run records its resolution (`p2p.resolution`), and scores compare only at equal resolution.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from pipelines.manifest import Manifest, manifest_sha256
from pipelines.preprocessing import Preprocessing
from pipelines.progress import Progress
from pipelines.quality.fid import RealismStats, fid_weights_path
from pipelines.quality.labels import confusion, fcn_scores
from pipelines.quality.segmenter import LoadedSegmenter, find_segmenter
from pipelines.registry import tracking
from pipelines.registry.models import DEFAULT_TILE_OVERLAP, LoadedModel, check_task
from pipelines.training.loader import LoaderConfig, make_eval_loader

# Which way is better, per metric a promotion can be decided on.
METRICS = {
    "l1": "lower",
    "psnr": "higher",
    "ssim": "higher",
    "fid": "lower",
    "kid": "lower",
    "fcn_iou": "higher",
    "fcn_pixel_acc": "higher",
    "fcn_class_acc": "higher",
}
EVALUATION_EXPERIMENT = "p2p-evaluations"
FID_HELP = "FID Inception weights file (pt_inception-2015-12-05-6726825d.pth; default: $P2P_FID_WEIGHTS)"
SEGMENTER_HELP = (
    "FCN-score segmenter: auto (the dataset's registered <dataset>-segmenter), none, or a model URI"
)
SHEET_HELP = "samples in the labelled input | output | target sheet logged with the evaluation (0: none)"


@dataclass
class Quality:
    """What an evaluation measures beyond L1/PSNR/SSIM, resolved once and shared by the models it scores."""

    fid_weights: str | None = None
    segmenter: LoadedSegmenter | None = None
    sheet_samples: int = 8
    skipped: list[str] = field(default_factory=list)  # one line per metric left out, saying why


def resolve_quality(
    manifest_location: str, tracking_uri: str, fid_weights: str = "", segmenter: str = "auto", sheet: int = 8
) -> Quality:
    if sheet < 0:
        raise ValueError(f"sheet_samples must be >= 0, got {sheet}")
    weights, fid_why = fid_weights_path(fid_weights)
    manifest = Manifest.read(manifest_location)
    loaded, fcn_why = find_segmenter(segmenter, manifest_location, manifest.palette, tracking_uri)
    return Quality(weights, loaded, sheet, [why for why in (fid_why, fcn_why) if why])


def eval_loader_config(
    prep: Preprocessing, manifest: str, seed: int = 0, batch_size: int = 8, resolution: str = "model"
) -> LoaderConfig:
    """The loader settings that prepare a split exactly as the model's recorded preprocessing says, or at
    the stored size (`resolution="native"`: no resize or crop, one sample per batch as sizes may differ)."""
    native = resolution == "native"
    return LoaderConfig(
        manifest=manifest,
        batch_size=1 if native else batch_size,
        load_size=prep.load_size,
        crop_size=prep.crop_size,
        preprocess="none" if native else prep.preprocess,
        direction=prep.direction,
        num_workers=1,
        seed=seed,
    )


def fcn_applies(prep: Preprocessing) -> bool:
    """The FCN-score measures photos generated from label maps."""
    return prep.input_is_label_map and prep.direction == "AtoB" and prep.output_nc == 3


@torch.no_grad()
def segment(segmenter: LoadedSegmenter, photos: torch.Tensor) -> torch.Tensor:
    """N×3×H×W photos in [-1, 1] → N×S×S predicted labels at the segmenter's size S."""
    size = segmenter.crop_size
    if photos.shape[-2:] != (size, size):
        photos = F.interpolate(
            photos, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    return segmenter.network(photos).argmax(1)


def resize_labels(labels: torch.Tensor, size: int) -> torch.Tensor:
    if labels.shape[-2:] == (size, size):
        return labels
    return F.interpolate(labels[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()


def fit_for_sheet(images: torch.Tensor, size: tuple[int, int] | None, nearest: bool) -> torch.Tensor:
    """Sheet rows must share one size: native samples of another size are resized to the first row's (for
    the picture only; label maps with nearest neighbour)."""
    if size is None or tuple(images.shape[-2:]) == size:
        return images
    if nearest:
        return F.interpolate(images, size=size, mode="nearest")
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


@dataclass
class Scores:
    metrics: dict[str, float]
    sheet: np.ndarray | None = None  # H×W×3 uint8
    skipped: list[str] = field(default_factory=list)


@torch.no_grad()
def score_split(
    model: LoadedModel,
    manifest_location: str,
    split: str,
    seed: int = 0,
    batch_size: int = 8,
    quality: Quality | None = None,
    resolution: str = "model",
    tile_size: int = 0,
    tile_overlap: int = DEFAULT_TILE_OVERLAP,
) -> Scores:
    """Every metric of the module docstring over every sample of `split`, deterministic, at `resolution`
    (model or native; tiling options as `LoadedModel.translate` takes them)."""
    from pipelines.quality.sheets import contact_sheet
    from pix2pix.metrics import metric_sums, to_unit

    quality = quality if quality is not None else Quality()
    manifest = Manifest.read(manifest_location)
    if split not in manifest.splits:
        raise ValueError(
            f"split {split!r} is not in {manifest_location} (it has {', '.join(manifest.splits)})"
        )
    check_task(model, manifest)
    prep = model.preprocessing
    skipped = list(quality.skipped)
    realism = RealismStats(quality.fid_weights, seed) if quality.fid_weights else None
    segmenter = quality.segmenter
    if segmenter is not None and not fcn_applies(prep):
        segmenter = None
        skipped.append("FCN-score skipped: the model does not translate label maps into photos")
    classes = segmenter.class_map.classes if segmenter else 0
    fcn_fake = torch.zeros(classes, classes, dtype=torch.long)
    fcn_real = torch.zeros(classes, classes, dtype=torch.long)
    rows: dict[str, list[Any]] = {"A": [], "fake": [], "B": [], "key": []}

    torch.manual_seed(seed)
    loader = make_eval_loader(
        eval_loader_config(prep, manifest_location, seed, batch_size, resolution), split, manifest=manifest
    )
    sheet_size: tuple[int, int] | None = None
    sums = {"l1": 0.0, "psnr": 0.0, "ssim": 0.0, "count": 0.0}
    progress = Progress("evaluate", manifest.split(split).samples, "samples")
    for batch in loader:
        progress.update(len(batch["key"]))
        fake = model.translate(batch["A"], tile_size, tile_overlap, batch_size)
        real = batch["B"]
        for key, value in metric_sums(to_unit(fake), to_unit(real)).items():
            sums[key] += value
        if realism is not None:
            realism.update(to_unit(fake), to_unit(real))
        if segmenter is not None:
            labels = resize_labels(segmenter.class_map.labels(batch["A"]), segmenter.crop_size)
            fcn_fake += confusion(segment(segmenter, fake), labels, classes)
            fcn_real += confusion(segment(segmenter, real), labels, classes)
        room = quality.sheet_samples - len(rows["key"])
        if room > 0:
            sheet_size = sheet_size or (int(real.shape[-2]), int(real.shape[-1]))
            for name, values in (("A", batch["A"]), ("fake", fake), ("B", real)):
                nearest = name == "A" and prep.input_is_label_map
                rows[name].append(fit_for_sheet(values[:room].cpu(), sheet_size, nearest))
            rows["key"].extend(batch["key"][:room])
    count = sums.pop("count")
    if count == 0:
        raise ValueError(f"split {split!r} of {manifest_location} has no samples")
    metrics = {**{k: v / count for k, v in sums.items()}, "samples": float(count)}
    if realism is not None:
        metrics.update(realism.result())
    if segmenter is not None:
        metrics.update({f"fcn_{k}": v for k, v in fcn_scores(fcn_fake).items()})
        metrics.update({f"fcn_real_{k}": v for k, v in fcn_scores(fcn_real).items()})
    sheet = None
    if rows["key"]:
        title = f"{model.name}/{model.version}" if model.name else model.uri
        sheet = contact_sheet(
            torch.cat(rows["A"]),
            torch.cat(rows["fake"]),
            torch.cat(rows["B"]),
            rows["key"],
            f"{title} {split}",
        )
    return Scores(metrics, sheet, skipped)


def score(
    model: LoadedModel, manifest_location: str, split: str, seed: int = 0, batch_size: int = 8
) -> dict[str, float]:
    """Mean L1, PSNR and SSIM over every sample of `split` (in [0, 1] units), deterministic."""
    return score_split(model, manifest_location, split, seed, batch_size, Quality(sheet_samples=0)).metrics


def evaluate_model(
    model: LoadedModel,
    manifest_location: str,
    split: str,
    seed: int,
    tracking_uri: str,
    experiment: str = EVALUATION_EXPERIMENT,
    quality: Quality | None = None,
    resolution: str = "model",
    tile_size: int = 0,
    tile_overlap: int = DEFAULT_TILE_OVERLAP,
    tag_version: bool = True,
) -> dict[str, Any]:
    """Score `model` and log an evaluation run (metrics, the sample sheet); the model version (if any) gets
    a tag pointing to it (`eval.<split>.run_id`; `eval.<split>.native.run_id` at native resolution,
    `.per_image_norm` added with per-image batch-norm statistics: each measurement keeps its own tag),
    unless `tag_version` is False (a promotion's dry run changes nothing in the registry).
    `quality`: what to measure besides L1/PSNR/SSIM (default: resolved here from $P2P_FID_WEIGHTS and the
    dataset's registered segmenter)."""
    started = time.perf_counter()
    if quality is None:
        quality = resolve_quality(manifest_location, tracking_uri)
    scores = score_split(
        model, manifest_location, split, seed, 8, quality, resolution, tile_size, tile_overlap
    )
    for line in scores.skipped:
        print(f"[evaluate] {line}", file=sys.stderr, flush=True)
    metrics = scores.metrics
    digest = manifest_sha256(manifest_location)
    client = tracking.client(tracking_uri)
    exp_id = tracking.experiment_id(client, experiment, tracking_uri)
    tags = {
        "p2p.kind": "evaluation",
        "p2p.model_uri": f"models:/{model.name}/{model.version}" if model.name else model.uri,
        "p2p.manifest": manifest_location,
        "p2p.manifest_sha256": digest,
        "p2p.split": split,
        "p2p.seed": str(seed),
        "p2p.resolution": resolution,
        "p2p.norm_stats": model.norm_stats,
    }
    if tile_size:
        tags.update({"p2p.tile_size": str(tile_size), "p2p.tile_overlap": str(tile_overlap)})
    if model.name:
        tags.update({"p2p.model_name": model.name, "p2p.model_version": str(model.version)})
    if quality.segmenter is not None and "fcn_iou" in metrics:
        tags["p2p.segmenter"] = quality.segmenter.uri + (
            f" (version {quality.segmenter.version})" if quality.segmenter.version else ""
        )
    if quality.fid_weights and "fid" in metrics:
        tags["p2p.fid_weights"] = quality.fid_weights.rsplit("/", 1)[-1]
    if scores.skipped:
        tags["p2p.skipped"] = " | ".join(scores.skipped)[:5000]
    variant = [split] + ([resolution] if resolution != "model" else [])
    variant += ["per_image_norm"] if model.norm_stats == "per_image" else []
    name = "eval-" + "-".join(variant)
    run = client.create_run(exp_id, run_name=name, tags=tags)
    values = {f"eval_{key}": value for key, value in metrics.items()}
    values["eval_seconds"] = time.perf_counter() - started
    sheet_uri = None
    with tracking.ended_if_raised(client, run.info.run_id):
        client.log_batch(run.info.run_id, metrics=tracking.metric_list(values, 0))
        if scores.sheet is not None:
            artifact = f"sheets/{name}.png"
            client.log_image(run.info.run_id, scores.sheet, artifact_file=artifact)
            sheet_uri = f"{run.info.artifact_uri}/{artifact}"
    client.set_terminated(run.info.run_id, "FINISHED")
    if model.name and tag_version:
        tag = "eval." + ".".join(variant) + ".run_id"
        client.set_model_version_tag(model.name, str(model.version), tag, run.info.run_id)
    return {
        "metrics": metrics,
        "run_id": run.info.run_id,
        "manifest_sha256": digest,
        "split": split,
        "resolution": resolution,
        "norm_stats": model.norm_stats,
        "model_name": model.name,
        "model_version": model.version,
        "sheet": sheet_uri,
        "skipped": scores.skipped,
    }
