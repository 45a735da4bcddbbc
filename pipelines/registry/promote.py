"""`p2p promote NAME --candidate VERSION`: move the registry's `champion` alias to the candidate only if it
beats the current champion on the same evaluation.

Both versions are scored by `pipelines.registry.evaluate` on the same manifest, split and seed; the decision, both
scores and the evaluation data's manifest hash are recorded as model-version tags, so every move of the
alias (and every refusal) can be traced. The first version of a model, with no champion yet, becomes the
champion. A candidate trained on a different task (channels or direction) is refused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from pipelines.registry.evaluate import METRICS, evaluate, load_model, manifest_sha256

ALIAS = "champion"


@dataclass
class PromotionConfig:
    name: str
    candidate: str = "latest"  # a version number or "latest"
    manifest: str = ""  # "" → the manifest the candidate was trained on
    split: str = "test"
    metric: str = "l1"  # l1 (lower is better), psnr or ssim (higher is better)
    margin: float = 0.0  # the candidate must beat the champion by more than this
    seed: int = 0
    dry_run: bool = False
    tracking_uri: str | None = None


def same_task(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [
        f"{k}: {a.get(k)!r} vs {b.get(k)!r}"
        for k in ("input_nc", "output_nc", "direction")
        if a.get(k) != b.get(k)
    ]


def wins(metric: str, candidate: float, champion: float, margin: float) -> bool:
    if METRICS[metric] == "lower":
        return candidate < champion - margin
    return candidate > champion + margin


def promote(cfg: PromotionConfig) -> dict[str, Any]:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if cfg.metric not in METRICS:
        raise ValueError(f"unknown metric {cfg.metric!r}: choose {', '.join(METRICS)}")
    client = MlflowClient(cfg.tracking_uri)
    candidate = load_model(f"models:/{cfg.name}/{cfg.candidate}", cfg.tracking_uri)
    try:
        champion_version = str(client.get_model_version_by_alias(cfg.name, ALIAS).version)
    except MlflowException:
        champion_version = None
    manifest = cfg.manifest or candidate.preprocessing["manifest"]
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

    champion = (
        load_model(f"models:/{cfg.name}/{champion_version}", cfg.tracking_uri) if champion_version else None
    )
    if champion is not None:
        differences = same_task(candidate.preprocessing, champion.preprocessing)
        if differences:
            raise ValueError(
                f"candidate version {candidate.version} was trained on a different task than {ALIAS} version "
                f"{champion_version} ({'; '.join(differences)}): register it under another name"
            )
    evaluated = evaluate(
        f"models:/{cfg.name}/{candidate.version}",
        manifest,
        cfg.split,
        cfg.seed,
        cfg.tracking_uri,
        model=candidate,
    )
    decision["candidate_score"] = evaluated["metrics"][cfg.metric]
    if champion is None:
        decision.update(promoted=True, reason=f"no {ALIAS} yet: the first version becomes {ALIAS}")
    else:
        against = evaluate(
            f"models:/{cfg.name}/{champion_version}",
            manifest,
            cfg.split,
            cfg.seed,
            cfg.tracking_uri,
            model=champion,
        )
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
