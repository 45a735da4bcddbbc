"""`p2p evaluate MODEL_URI --manifest M --split test`: L1 / PSNR / SSIM of a model on a dataset split,
logged to MLflow as an evaluation run linked to the model version.

The job reads top to bottom: resolve the tracking store, load the model (`pipelines.registry.models`),
score it on every sample of the split with its recorded preprocessing and log the evaluation run
(`pipelines.registry.scoring`), print the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipelines.config import option
from pipelines.registry import tracking
from pipelines.registry.models import load_model
from pipelines.registry.scoring import EVALUATION_EXPERIMENT, evaluate_model


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

    def validate(self) -> None:
        if not self.model_uri:
            raise ValueError("give the model to evaluate: MODEL_URI")
        if not self.manifest:
            raise ValueError("give the evaluation data: --manifest DATASET")


def run_evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    cfg.validate()
    uri = tracking.tracking_uri(cfg.tracking_uri)
    model = load_model(cfg.model_uri, uri)
    return evaluate_model(model, cfg.manifest, cfg.split, cfg.seed, uri, cfg.experiment)
