"""`p2p promote NAME --candidate VERSION`: move the registry's `champion` alias to the candidate only if it
beats the current champion on the same evaluation.

Both versions are scored by `pipelines.registry.scoring` on the same manifest, split and seed; the decision,
both scores and the evaluation data's manifest hash are recorded as model-version tags, so every move of the
alias (and every refusal) can be traced. The first version of a model, with no champion yet, becomes the
champion. A candidate trained on a different task (channels or direction) is refused.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pipelines.config import ConfigError, option
from pipelines.manifest import manifest_sha256
from pipelines.preprocessing import Preprocessing
from pipelines.registry import tracking
from pipelines.registry.models import LoadedModel, load_model
from pipelines.registry.scoring import METRICS, evaluate_model

ALIAS = "champion"
LOCK_PREFIX = "p2p-promotion-lock."  # + model name: the registered model that serialises promotions


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
    lock_wait_s: float = option(1800.0, "seconds to wait while another promotion of this model runs")

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


def current_champion(client: Any, name: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, ALIAS).version)
    except MlflowException:
        return None


@contextlib.contextmanager
def promotion_lock(client: Any, name: str, wait_s: float, poll_s: float = 2.0) -> Iterator[None]:
    """One promotion of `name` at a time, on any MLflow backend: the lock is a registered model named
    `LOCK_PREFIX + name`, whose creation the tracking store refuses while it exists (a unique name), so two
    processes cannot both hold it. Its description names the holder. Waits up to `wait_s` seconds."""
    from mlflow.exceptions import MlflowException

    lock = f"{LOCK_PREFIX}{name}"
    holder = f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()} since {time.strftime('%H:%M:%S')}"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(lock, description=f"promotion of {name} by {holder}")
            break
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code) and "already exists" not in str(exc):
                raise
            if time.monotonic() >= deadline:
                held_by = client.get_registered_model(lock).description
                raise TimeoutError(
                    f"another promotion of {name} holds the registry lock ({held_by}); if that process is "
                    f"gone, delete the registered model {lock!r} and retry"
                ) from exc
            time.sleep(poll_s)
    try:
        yield
    finally:
        client.delete_registered_model(lock)


def promote(cfg: PromoteConfig) -> dict[str, Any]:
    """Score the candidate, then, holding the registry's promotion lock, score the champion of that moment
    and move the alias if the candidate wins. Concurrent promotions of one model run their comparisons one
    after another, so the final champion is the best of all candidates (each compared with the champion
    the previous promotion left), never the last writer's."""
    cfg.validate()
    uri = tracking.tracking_uri(cfg.tracking_uri)
    client = tracking.client(uri)
    candidate = load_model(f"models:/{cfg.name}/{cfg.candidate}", uri)
    manifest = cfg.manifest or candidate.preprocessing.manifest
    evaluated = evaluate_model(candidate, manifest, cfg.split, cfg.seed, uri)
    if cfg.dry_run:
        return decide(cfg, client, uri, candidate, evaluated, manifest)
    with promotion_lock(client, cfg.name, cfg.lock_wait_s):
        decision = decide(cfg, client, uri, candidate, evaluated, manifest)
        if decision.get("skipped"):
            return decision
        record(cfg, client, decision)
    return decision


def decide(
    cfg: PromoteConfig,
    client: Any,
    uri: str,
    candidate: LoadedModel,
    evaluated: dict[str, Any],
    manifest: str,
) -> dict[str, Any]:
    """The decision against the champion as it is now (read here, under the lock when not a dry run)."""
    champion_version = current_champion(client, cfg.name)
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
        "candidate_score": evaluated["metrics"][cfg.metric],
    }
    if champion_version == candidate.version:
        decision.update(
            promoted=False, skipped=True, reason=f"version {candidate.version} is already the {ALIAS}"
        )
        return decision
    if champion_version is None:
        decision.update(promoted=True, reason=f"no {ALIAS} yet: the first version becomes {ALIAS}")
        return decision
    champion = load_model(f"models:/{cfg.name}/{champion_version}", uri)
    differences = same_task(candidate.preprocessing, champion.preprocessing)
    if differences:
        raise ValueError(
            f"candidate version {candidate.version} was trained on a different task than {ALIAS} version "
            f"{champion_version} ({'; '.join(differences)}): register it under another name"
        )
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
    return decision


def record(cfg: PromoteConfig, client: Any, decision: dict[str, Any]) -> None:
    """The decision as tags on the candidate version, and the alias move when it won."""
    candidate_version, champion_version = str(decision["candidate_version"]), decision["champion_version"]
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
        client.set_model_version_tag(cfg.name, candidate_version, key, value)
    if decision["promoted"]:
        client.set_registered_model_alias(cfg.name, ALIAS, candidate_version)
        if champion_version:
            client.set_model_version_tag(
                cfg.name, champion_version, "promotion.replaced_by", candidate_version
            )
