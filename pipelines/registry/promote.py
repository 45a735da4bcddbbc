"""`p2p promote NAME --candidate VERSION`: move the registry's `champion` alias to the candidate only if it
beats the current champion on the same evaluation.

Both versions are scored by `pipelines.registry.scoring` on the same manifest, split and seed; the decision,
both scores and the evaluation data's manifest hash are recorded as model-version tags, so every move of the
alias (and every refusal) can be traced. The first version of a model, with no champion yet, becomes the
champion. A candidate trained on a different task (channels or direction) is refused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

from pipelines.config import ConfigError, option
from pipelines.manifest import manifest_sha256
from pipelines.preprocessing import Preprocessing
from pipelines.registry import tracking
from pipelines.registry.models import load_model
from pipelines.registry.scoring import METRICS, evaluate_model

ALIAS = "champion"


@dataclass
class PromoteConfig:
    name: str = option("", "registered model name")
    candidate: str = option("latest", "candidate version: a number or 'latest'")
    manifest: str = option("", "evaluation data (default: the dataset the candidate was trained on)")
    split: str = option("test", "split both models are scored on")
    metric: Literal["l1", "psnr", "ssim"] = option(
        "l1", "l1 (lower is better), psnr or ssim (higher is better)"
    )
    margin: float = option(0.0, "the candidate must beat the champion by more than this")
    seed: int = option(0, "seed of the evaluation")
    dry_run: bool = option(False, "show the decision, change nothing")
    tracking_uri: str = option("", tracking.URI_HELP)

    def validate(self) -> None:
        if not self.name:
            raise ConfigError("give the registered model's NAME")
        if self.margin < 0:
            raise ConfigError(f"margin must be >= 0, got {self.margin}")


def same_task(a: Preprocessing, b: Preprocessing) -> list[str]:
    return [
        f"{k}: {getattr(a, k)!r} vs {getattr(b, k)!r}"
        for k in ("input_nc", "output_nc", "direction")
        if getattr(a, k) != getattr(b, k)
    ]


def wins(metric: str, candidate: float, champion: float, margin: float) -> bool:
    if METRICS[metric] == "lower":
        return candidate < champion - margin
    return candidate > champion + margin


def promote(cfg: PromoteConfig) -> dict[str, Any]:
    from mlflow.exceptions import MlflowException

    cfg.validate()
    uri = tracking.tracking_uri(cfg.tracking_uri)
    client = tracking.client(uri)
    candidate = load_model(f"models:/{cfg.name}/{cfg.candidate}", uri)
    try:
        champion_version = str(client.get_model_version_by_alias(cfg.name, ALIAS).version)
    except MlflowException:
        champion_version = None
    manifest = cfg.manifest or candidate.preprocessing.manifest
    decision: dict[str, Any] = {
        "name": cfg.name,
        "candidate_version": candidate.version,
        "champion_version": champion_version,
        "metric": cfg.metric,
        "margin": cfg.margin,
        "split": cfg.split,
        "seed": cfg.seed,
        "manifest": manifest,
        "manifest_sha256": manifest_sha256(manifest),
        "dry_run": cfg.dry_run,
    }
    if champion_version == candidate.version:
        decision.update(promoted=False, reason=f"version {candidate.version} is already the {ALIAS}")
        return decision

    champion = load_model(f"models:/{cfg.name}/{champion_version}", uri) if champion_version else None
    if champion is not None:
        differences = same_task(candidate.preprocessing, champion.preprocessing)
        if differences:
            raise ValueError(
                f"candidate version {candidate.version} was trained on a different task than {ALIAS} version "
                f"{champion_version} ({'; '.join(differences)}): register it under another name"
            )
    evaluated = evaluate_model(candidate, manifest, cfg.split, cfg.seed, uri)
    decision["candidate_score"] = evaluated["metrics"][cfg.metric]
    if champion is None:
        decision.update(promoted=True, reason=f"no {ALIAS} yet: the first version becomes {ALIAS}")
    else:
        against = evaluate_model(champion, manifest, cfg.split, cfg.seed, uri)
        decision["champion_score"] = against["metrics"][cfg.metric]
        better = wins(cfg.metric, decision["candidate_score"], decision["champion_score"], cfg.margin)
        comparison = f"{cfg.metric} {decision['candidate_score']:.4f} vs {decision['champion_score']:.4f}"
        decision.update(
            promoted=better,
            reason=(
                f"candidate wins: {comparison}"
                if better
                else f"candidate does not win by more than {cfg.margin}: {comparison}"
            ),
        )
    if cfg.dry_run:
        return decision

    tags = {
        "promotion.decision": "promoted" if decision["promoted"] else "rejected",
        "promotion.reason": decision["reason"],
        "promotion.metric": cfg.metric,
        "promotion.margin": str(cfg.margin),
        "promotion.split": cfg.split,
        "promotion.seed": str(cfg.seed),
        "promotion.manifest_sha256": decision["manifest_sha256"],
        "promotion.candidate_score": str(decision["candidate_score"]),
        "promotion.champion_version": str(champion_version),
        "promotion.champion_score": str(decision.get("champion_score", "")),
        "promotion.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for key, value in tags.items():
        client.set_model_version_tag(cfg.name, str(candidate.version), key, value)
    if decision["promoted"]:
        client.set_registered_model_alias(cfg.name, ALIAS, str(candidate.version))
        if champion_version:
            client.set_model_version_tag(
                cfg.name, champion_version, "promotion.replaced_by", str(candidate.version)
            )
    return decision
