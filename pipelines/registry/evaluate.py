"""`p2p evaluate MODEL_URI --manifest M --split test`: a model's quality on a dataset split, logged to MLflow
as an evaluation run linked to the model version.

Measured (`pipelines.registry.scoring`): L1 / PSNR / SSIM always; FID and KID when the FID Inception
weights are given (`--fid-weights` or $P2P_FID_WEIGHTS); the FCN-score with its real-photo ceiling for
labels→photo models when the dataset's segmenter is registered (`p2p segmenter train`); a labelled
input | output | target sheet of `sheet_samples` fixed samples, logged as an artifact of the run and
returned as `sheet`. What cannot be measured is skipped with one line saying how to enable it.

`resolution: native` scores at the dataset's stored size instead of the model's training geometry: each
stored input goes through the generator at its own size (padded, tiled above `tile_size`, cropped back)
and is compared with its stored target at that size (`pipelines.registry.scoring`). `norm_stats: per_image`
scores with the paper's test-time batch norm (`pipelines.registry.models`); each variant is its own run.

The job reads top to bottom: resolve the tracking store, load the model (`pipelines.registry.models`), decide
what to measure, score it on every sample of the split with its recorded preprocessing and log the
evaluation run, print the result.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Literal

from pipelines.config import option
from pipelines.registry import tracking
from pipelines.registry.models import (
    DEFAULT_TILE_OVERLAP,
    NORM_STATS_HELP,
    TILE_OVERLAP_HELP,
    TILE_SIZE_HELP,
    check_inference_options,
    load_model,
)
from pipelines.registry.scoring import (
    EVALUATION_EXPERIMENT,
    FID_HELP,
    SEGMENTER_HELP,
    SHEET_HELP,
    evaluate_model,
    resolve_quality,
)


@dataclass
class EvaluateConfig:
    model_uri: str = option(
        "", "models:/NAME/VERSION, models:/NAME@ALIAS, runs:/ID/generator, or a training checkpoint"
    )
    manifest: str = option("", "dataset folder / s3:// prefix or its manifest.json")
    split: str = option("test", "split to score")
    seed: int = option(0, "seed of the evaluation (scores are comparable at equal manifest, split, seed)")
    experiment: str = option(EVALUATION_EXPERIMENT, "MLflow experiment of the evaluation run")
    tracking_uri: str = option("", tracking.URI_HELP)
    fid_weights: str = option("", FID_HELP)
    segmenter: str = option("auto", SEGMENTER_HELP)
    sheet_samples: int = option(8, SHEET_HELP)
    resolution: Literal["model", "native"] = option(
        "model",
        "model: score at the model's training geometry; native: each stored input at its stored size "
        "(nothing resized), compared with its stored target at that size (tagged p2p.resolution)",
    )
    tile_size: int = option(0, TILE_SIZE_HELP)
    tile_overlap: int = option(DEFAULT_TILE_OVERLAP, TILE_OVERLAP_HELP)
    norm_stats: Literal["running", "per_image"] = option("running", NORM_STATS_HELP)

    def validate(self) -> None:
        if not self.model_uri:
            raise ValueError("give the model to evaluate: MODEL_URI")
        if not self.manifest:
            raise ValueError("give the evaluation data: --manifest DATASET")
        if self.sheet_samples < 0:
            raise ValueError(f"sheet_samples must be >= 0, got {self.sheet_samples}")
        check_inference_options(self.resolution, self.tile_size, self.tile_overlap, self.norm_stats)


def run_evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    cfg.validate()
    uri = tracking.tracking_uri(cfg.tracking_uri)
    model = load_model(cfg.model_uri, uri).with_norm_stats(cfg.norm_stats)
    note = model.check_tiling(cfg.tile_size, cfg.tile_overlap)
    if note:
        print(f"[evaluate] {note}", file=sys.stderr, flush=True)
    quality = resolve_quality(cfg.manifest, uri, cfg.fid_weights, cfg.segmenter, cfg.sheet_samples)
    return evaluate_model(
        model,
        cfg.manifest,
        cfg.split,
        cfg.seed,
        uri,
        cfg.experiment,
        quality,
        cfg.resolution,
        cfg.tile_size,
        cfg.tile_overlap,
    )
