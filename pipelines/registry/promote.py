"""`p2p promote NAME --candidate VERSION`: move the registry's `champion` alias to the candidate only if it
beats the current champion on the same evaluation.

Both versions are scored by `pipelines.registry.scoring` on the same manifest, split and seed, at the same
resolution (`model`, or `native`: the dataset's stored size, tiled above `tile_size`) and batch-norm
statistics (`norm_stats`); the decision,
all metrics of both models and the evaluation data's manifest hash are recorded as model-version tags, so
every move of the alias (and every refusal) can be traced. The first version of a model, with no champion
yet, becomes the champion. A candidate trained on a different task (channels or direction) is refused.

What decides (`--metric`): any metric of the evaluation (l1, psnr, ssim, fid, kid, fcn_iou, fcn_pixel_acc,
fcn_class_acc). The default, `auto`, is the one that measures what matters and can be computed: the FCN
class IoU for labels→photo models when the dataset's segmenter is registered, else FID when the FID Inception
weights are given, else L1, with a warning, because L1 favours blurry outputs over sharp plausible ones.

How much better (MLflow's `MetricThreshold` rule, kept in an `mlflow.models.MetricThreshold`): with
`min_absolute_change` the candidate must be >= champion + change (greater is better) or <= champion − change;
with `min_relative_change` the change over |champion| must be >= that fraction (with a zero champion score,
strictly better); both must hold when both are given. With neither, the candidate must be strictly better
(MLflow's own fallback: better by 1e-10). `--margin` is the former name of `--min-absolute-change`; the one
rule change from it is that a candidate exactly at champion ± margin (margin > 0) now passes (MLflow's >=).
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import json
import math
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal, NamedTuple

from pipelines.config import ConfigError, option
from pipelines.manifest import manifest_sha256
from pipelines.preprocessing import Preprocessing
from pipelines.registry import tracking
from pipelines.registry.models import (
    DEFAULT_TILE_OVERLAP,
    NORM_STATS_HELP,
    TILE_OVERLAP_HELP,
    TILE_SIZE_HELP,
    LoadedModel,
    check_inference_options,
    check_model_name,
    load_model,
)
from pipelines.registry.scoring import (
    FID_HELP,
    METRICS,
    SEGMENTER_HELP,
    SHEET_HELP,
    Quality,
    evaluate_model,
    fcn_applies,
    resolve_quality,
)
from pipelines.runtime import pid_alive, pid_checkable, process_space
from pipelines.takeover import take_over_once

ALIAS = "champion"
LOCK_PREFIX = "p2p-promotion-lock."  # + model name: the registered model that serialises promotions
L1_WARNING = (
    "promoting on L1, which favours blurry outputs: register a segmenter (`p2p segmenter train`) for "
    "labels→photo data or give FID weights (--fid-weights / $P2P_FID_WEIGHTS) to promote on realism"
)


@dataclass
class PromoteConfig:
    name: str = option("", "registered model name")
    candidate: str = option("latest", "candidate version: a number or 'latest'")
    manifest: str = option("", "evaluation data (default: the dataset the candidate was trained on)")
    split: str = option("test", "split both models are scored on")
    metric: Literal[
        "auto", "l1", "psnr", "ssim", "fid", "kid", "fcn_iou", "fcn_pixel_acc", "fcn_class_acc"
    ] = option(
        "auto",
        "what decides: auto (FCN IoU with a registered segmenter, else FID with weights, else L1), "
        "l1, fid, kid (lower is better), psnr, ssim, fcn_iou, fcn_pixel_acc, fcn_class_acc (higher)",
    )
    min_absolute_change: float | None = option(
        None,
        "the candidate must beat the champion by at least this much (MLflow MetricThreshold); unset (the "
        "default) or 0, and no --min-relative-change: strictly better is enough. --margin is this option's "
        "former name, kept as an alias",
    )
    min_relative_change: float | None = option(
        None, "... and by at least this fraction of |champion| (0..1; MLflow MetricThreshold)"
    )
    seed: int = option(0, "seed of the evaluation")
    dry_run: bool = option(
        False,
        "show the decision and change nothing in the registry: no alias moves, no version is tagged (the "
        "evaluations are still logged as runs)",
    )
    tracking_uri: str = option("", tracking.URI_HELP)
    lock_wait_s: float = option(1800.0, "seconds to wait while another promotion of this model runs")
    fid_weights: str = option("", FID_HELP)
    segmenter: str = option("auto", SEGMENTER_HELP)
    sheet_samples: int = option(8, SHEET_HELP)
    resolution: Literal["model", "native"] = option(
        "model",
        "both models scored at the candidate's training geometry (model) or at the dataset's stored size "
        "(native: each input translated at its own size, as `p2p evaluate --resolution native`)",
    )
    tile_size: int = option(0, TILE_SIZE_HELP)
    tile_overlap: int = option(DEFAULT_TILE_OVERLAP, TILE_OVERLAP_HELP)
    norm_stats: Literal["running", "per_image"] = option("running", NORM_STATS_HELP)

    def validate(self) -> None:
        if not self.name:
            raise ConfigError("give the registered model's NAME")
        check_model_name(self.name, "NAME")
        if not (self.candidate == "latest" or self.candidate.isdigit()):
            raise ConfigError(f"--candidate {self.candidate!r}: give a version number or 'latest'")
        check_inference_options(self.resolution, self.tile_size, self.tile_overlap, self.norm_stats)
        if self.min_absolute_change is not None and not self.min_absolute_change >= 0:  # NaN too
            raise ConfigError(f"min_absolute_change / --margin must be >= 0, got {self.min_absolute_change}")
        if self.min_relative_change is not None and not 0 <= self.min_relative_change <= 1:
            raise ConfigError(f"min_relative_change must be between 0 and 1, got {self.min_relative_change}")
        if self.sheet_samples < 0:
            raise ConfigError(f"sheet_samples must be >= 0, got {self.sheet_samples}")

    def threshold(self, metric: str) -> Any:
        """The rule as MLflow's container; None when neither change is set (then: strictly better)."""
        from mlflow.models import MetricThreshold

        absolute = self.min_absolute_change or None  # 0 (the old default margin) means "strictly better"
        relative = self.min_relative_change or None
        if absolute is None and relative is None:
            return None
        return MetricThreshold(
            min_absolute_change=absolute,
            min_relative_change=None if relative is None else float(relative),
            greater_is_better=METRICS[metric] == "higher",
        )


def same_task(a: Preprocessing, b: Preprocessing) -> list[str]:
    return [
        f"{k}: {getattr(a, k)!r} vs {getattr(b, k)!r}"
        for k in ("input_nc", "output_nc", "direction")
        if getattr(a, k) != getattr(b, k)
    ]


def passes(candidate: float, champion: float, threshold: Any, greater_is_better: bool) -> bool:
    """MLflow's model-validation rule for one metric (`mlflow.models.evaluation.validation._validate`):
    every change given in `threshold` (a MetricThreshold) must hold; None: strictly better."""
    better = (lambda a, b: a >= b) if greater_is_better else (lambda a, b: a <= b)
    sign = 1.0 if greater_is_better else -1.0
    strictly = better(Decimal(candidate), Decimal(champion + sign * 1e-10))
    if threshold is None:
        return bool(strictly)
    ok = True
    if threshold.min_absolute_change is not None:
        ok = ok and better(Decimal(candidate), Decimal(champion + sign * threshold.min_absolute_change))
    if threshold.min_relative_change is not None:
        if champion == 0:
            ok = ok and strictly
        else:
            ok = ok and sign * (candidate - champion) / abs(champion) >= threshold.min_relative_change
    return bool(ok)


def choose_metric(cfg: PromoteConfig, candidate: LoadedModel, quality: Quality) -> str:
    """The metric that decides (`auto` resolved; see the module docstring); an explicit metric that this
    evaluation cannot compute is an error saying what it needs."""
    fcn = quality.segmenter is not None and fcn_applies(candidate.preprocessing)
    if cfg.metric == "auto":
        if fcn:
            return "fcn_iou"
        if quality.fid_weights:
            return "fid"
        print(f"[promote] warning: {L1_WARNING}", file=sys.stderr, flush=True)
        return "l1"
    if cfg.metric.startswith("fcn_") and not fcn:
        reasons = [why for why in quality.skipped if why.startswith("FCN")]
        raise ConfigError(
            f"--metric {cfg.metric} needs the FCN-score: "
            + (reasons[0] if reasons else "the model does not translate label maps into photos")
        )
    if cfg.metric in ("fid", "kid") and not quality.fid_weights:
        reasons = [why for why in quality.skipped if why.startswith("FID")]
        raise ConfigError(f"--metric {cfg.metric} needs FID weights: {reasons[0] if reasons else ''}")
    return cfg.metric


def current_champion(client: Any, name: str) -> str | None:
    """The champion's version, None when the model has none. Any other error (a timeout, a 5xx past
    MLflow's retries) propagates: read as "no champion yet", it would crown the candidate unscored."""
    from mlflow.exceptions import MlflowException

    # The model's alias map, not a lookup of the alias: a missing alias is an error MLflow shares with bad
    # requests (INVALID_PARAMETER_VALUE), while here only a missing model is a distinct answer.
    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code):
            return None
        raise
    version = aliases.get(ALIAS)
    return None if version is None else str(version)


@contextlib.contextmanager
def promotion_lock(client: Any, name: str, wait_s: float, poll_s: float = 2.0) -> Iterator[None]:
    """One promotion of `name` at a time, on any MLflow backend: the lock is a registered model named
    `LOCK_PREFIX + name`, whose creation the tracking store refuses while it exists (a unique name), so two
    processes cannot both hold it. Its description names the holder, its tags say where it runs. Waits up
    to `wait_s` seconds, saying so; a lock whose holder ran on this host and is gone (killed mid-promotion)
    is taken over at once, saying so (`_take_over`)."""
    from mlflow.exceptions import MlflowException

    lock = f"{LOCK_PREFIX}{name}"
    holder = f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()} since {time.strftime('%H:%M:%S')}"
    # The token makes the lock ours beyond doubt: MLflow's HTTP client retries a create whose answer was
    # lost, and the retry then finds our own lock; the release deletes only a lock that still holds it.
    token = uuid.uuid4().hex
    tags = {
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
        "pid_space": process_space(),
        "token": token,
    }
    deadline = time.monotonic() + wait_s
    announced = False
    while True:
        try:
            client.create_registered_model(lock, tags=tags, description=f"promotion of {name} by {holder}")
            break
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code) and "already exists" not in str(exc):
                raise
            held = _lock_holder(client, lock)
            if held is not None and held.token == token:  # our own create, retried after its answer was lost
                break
            if held is None:  # released meanwhile, or unreadable: try again, but not in a tight loop
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"the registry lock of {name} exists but cannot be read; delete the registered "
                        f"model {lock!r} if no promotion runs, and retry"
                    ) from exc
                time.sleep(min(poll_s, 0.2))
                continue
            held_by, pid = held.description, held.pid
            dead = pid_checkable(held.host, held.space) and pid is not None and not pid_alive(pid)
            if dead and _take_over(client, lock, held, tags):
                print(
                    f"[promote] took over the registry lock of {name} from a promotion that no longer runs "
                    f"({held_by})",
                    flush=True,
                )
                continue
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"another promotion of {name} holds the registry lock ({held_by}); if that process is "
                    f"gone, delete the registered model {lock!r} and retry"
                ) from exc
            if not announced:
                print(
                    f"[promote] waiting up to {wait_s:.0f} s for another promotion of {name} ({held_by}); if "
                    f"that process is gone, delete the registered model {lock!r}",
                    flush=True,
                )
                announced = True
            time.sleep(poll_s)
    try:
        yield
    finally:
        held = _lock_holder(client, lock)
        if held is not None and held.token == token:  # not a lock someone took after deleting ours by hand
            client.delete_registered_model(lock)


def _take_over(client: Any, lock: str, held: LockHolder, tags: dict[str, str]) -> bool:
    """Delete the lock of a dead promotion, exactly once (`pipelines.takeover`), with markers that are
    registered models tagged like a lock. True when this waiter deleted it; False when another holds a
    marker, the lock was replaced meanwhile, or the registry could not say (the next look decides again)."""
    from mlflow.exceptions import MlflowException

    def create(marker: str) -> bool:
        try:
            client.create_registered_model(marker, tags=tags, description=f"taking over {lock}")
            return True
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code) and "already exists" not in str(exc):
                raise
            taker = _lock_holder(client, marker)
            return taker is not None and taker.token == tags["token"]  # our own create, retried

    def holder(marker: str) -> str | None:
        taker = _lock_holder(client, marker)
        if taker is None:  # gone (its winner is done), or unreadable: look again
            return None
        if taker.pid and pid_checkable(taker.host, taker.space) and not pid_alive(taker.pid):
            return ""  # its creator died here
        return taker.description or "?"

    def still_there() -> bool:
        try:
            current = _lock_holder(client, lock, missing_only=True)
        except MlflowException as exc:
            raise _RegistryUnsure from exc
        return current is not None and current.token == held.token

    def delete_lock() -> None:
        try:
            _delete_if_there(client, lock)
        except MlflowException as exc:
            raise _RegistryUnsure from exc

    try:
        took, _ = take_over_once(
            f"{lock}.takeover.{held.token or 'untokened'}",
            create=create,
            holder=holder,
            still_there=still_there,
            delete_lock=delete_lock,
            delete_marker=lambda marker: _delete_if_there(client, marker),
        )
    except _RegistryUnsure:  # the dead lock not known to be gone: the next look decides again
        return False
    return took


class _RegistryUnsure(Exception):
    """The registry did not say whether the dead lock is still there, or did not delete it."""


def _delete_if_there(client: Any, name: str) -> None:
    """Delete a registered model; one already gone (a retried delete whose first answer was lost) is fine."""
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model(name)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" not in str(exc.error_code):
            raise


class LockHolder(NamedTuple):
    description: str
    host: str
    pid: int | None
    token: str  # the holder's own random token: ours, or not
    space: str  # where its pid means it (`pipelines.runtime.process_space`); "" if not recorded


def _lock_holder(client: Any, lock: str, missing_only: bool = False) -> LockHolder | None:
    """Who holds the promotion lock, None if it is gone or cannot be read (``missing_only``: None only if
    it is gone; any other MLflow error is raised)."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(lock)
    except MlflowException as exc:
        if missing_only and "RESOURCE_DOES_NOT_EXIST" not in str(exc.error_code):
            raise
        return None
    tags = model.tags
    pid = str(tags.get("pid", ""))
    return LockHolder(
        str(model.description or "?"),
        str(tags.get("host", "")),
        int(pid) if pid.isdigit() else None,
        str(tags.get("token", "")),
        str(tags.get("pid_space", "")),
    )


def promote(cfg: PromoteConfig) -> dict[str, Any]:
    """Score the candidate, then, holding the registry's promotion lock, score the champion of that moment
    and move the alias if the candidate wins. Concurrent promotions of one model run their comparisons one
    after another, so the final champion is the best of all candidates (each compared with the champion
    the previous promotion left), never the last writer's."""
    cfg.validate()
    uri = tracking.tracking_uri(cfg.tracking_uri)
    client = tracking.client(uri)
    candidate = load_version(cfg, cfg.candidate, uri)
    manifest = cfg.manifest or candidate.preprocessing.manifest
    quality = resolve_quality(manifest, uri, cfg.fid_weights, cfg.segmenter, cfg.sheet_samples)
    metric = choose_metric(cfg, candidate, quality)
    evaluated = evaluate_version(cfg, candidate, manifest, uri, quality)
    if cfg.dry_run:
        return decide(cfg, client, uri, candidate, evaluated, manifest, metric, quality)
    with promotion_lock(client, cfg.name, cfg.lock_wait_s):
        decision = decide(cfg, client, uri, candidate, evaluated, manifest, metric, quality)
        if decision.get("skipped"):
            return decision
        record(cfg, client, decision)
    return decision


def load_version(cfg: PromoteConfig, version: str, uri: str) -> LoadedModel:
    """A version of the model, run as this promotion scores every model (`norm_stats`); a tiling it cannot
    take is refused before anything is scored."""
    model = load_model(f"models:/{cfg.name}/{version}", uri).with_norm_stats(cfg.norm_stats)
    note = model.check_tiling(cfg.tile_size, cfg.tile_overlap)
    if note:
        print(f"[promote] version {model.version}: {note}", file=sys.stderr, flush=True)
    return model


def evaluate_version(
    cfg: PromoteConfig, model: LoadedModel, manifest: str, uri: str, quality: Quality
) -> dict[str, Any]:
    """The one evaluation both models get: same data, split, seed, resolution, tiling and norm."""
    return evaluate_model(
        model,
        manifest,
        cfg.split,
        cfg.seed,
        uri,
        quality=quality,
        resolution=cfg.resolution,
        tile_size=cfg.tile_size,
        tile_overlap=cfg.tile_overlap,
        tag_version=not cfg.dry_run,
    )


def decide(
    cfg: PromoteConfig,
    client: Any,
    uri: str,
    candidate: LoadedModel,
    evaluated: dict[str, Any],
    manifest: str,
    metric: str,
    quality: Quality,
) -> dict[str, Any]:
    """The decision against the champion as it is now (read here, under the lock when not a dry run)."""
    champion_version = current_champion(client, cfg.name)
    decision: dict[str, Any] = {
        "name": cfg.name,
        "candidate_version": candidate.version,
        "champion_version": champion_version,
        "metric": metric,
        "greater_is_better": METRICS[metric] == "higher",
        "min_absolute_change": cfg.min_absolute_change,
        "min_relative_change": cfg.min_relative_change,
        "split": cfg.split,
        "seed": cfg.seed,
        "resolution": cfg.resolution,
        "norm_stats": cfg.norm_stats,
        "manifest": manifest,
        "manifest_sha256": evaluated.get("manifest_sha256") or manifest_sha256(manifest),  # what was scored
        "dry_run": cfg.dry_run,
        "candidate_score": measured(evaluated, metric, cfg.split),
        "candidate_metrics": evaluated["metrics"],
        "candidate_eval_run_id": evaluated["run_id"],
    }
    if not math.isfinite(decision["candidate_score"]):  # a diverged or broken model
        score = decision["candidate_score"]
        decision.update(promoted=False, reason=f"the candidate's {metric} is {score}: never promoted")
        return decision
    if champion_version == candidate.version:
        decision.update(
            promoted=False, skipped=True, reason=f"version {candidate.version} is already the {ALIAS}"
        )
        return decision
    if champion_version is None:
        decision.update(promoted=True, reason=f"no {ALIAS} yet: the first version becomes {ALIAS}")
        return decision
    champion = load_version(cfg, champion_version, uri)
    differences = same_task(candidate.preprocessing, champion.preprocessing)
    if differences:
        raise ValueError(
            f"candidate version {candidate.version} was trained on a different task than {ALIAS} version "
            f"{champion_version} ({'; '.join(differences)}): register it under another name"
        )
    champion = scored_like(champion, candidate)
    against = evaluate_version(cfg, champion, manifest, uri, quality)
    if against.get("manifest_sha256") != decision["manifest_sha256"]:
        # A rebuild while this promotion waited for the lock: two scores of two datasets compare nothing.
        scored = str(decision["manifest_sha256"])[:12], str(against.get("manifest_sha256"))[:12]
        raise ValueError(
            f"the dataset at {manifest} changed during this promotion (manifest sha256 {scored[0]}… for the "
            f"candidate, {scored[1]}… for the champion): nothing was promoted; run the promotion again"
        )
    decision.update(
        champion_score=measured(against, metric, cfg.split),
        champion_metrics=against["metrics"],
        champion_eval_run_id=against["run_id"],
    )
    comparison = f"{metric} {decision['candidate_score']:.6g} vs {decision['champion_score']:.6g}"
    if not math.isfinite(decision["champion_score"]):
        decision.update(promoted=True, reason=f"the {ALIAS} is broken, the candidate is not: {comparison}")
        return decision
    threshold = cfg.threshold(metric)
    better = passes(
        decision["candidate_score"], decision["champion_score"], threshold, METRICS[metric] == "higher"
    )
    rule = "strictly better" if threshold is None else str(threshold)
    decision.update(
        promoted=better,
        reason=f"candidate wins: {comparison}"
        if better
        else f"candidate does not pass ({rule}): {comparison}",
    )
    return decision


def measured(evaluated: dict[str, Any], metric: str, split: str) -> float:
    """The deciding metric of an evaluation; an error saying why when it could not be measured."""
    if metric not in evaluated["metrics"]:
        why = "; ".join(evaluated.get("skipped") or []) or "too few samples for it"
        raise ValueError(f"{metric} was not measured on split {split!r} ({why}): choose another --metric")
    return float(evaluated["metrics"][metric])


def scored_like(champion: LoadedModel, candidate: LoadedModel) -> LoadedModel:
    """The champion prepared as the candidate is (load size, crop size, preprocess mode): at `resolution:
    model` each model's recorded geometry decides its inputs and targets, so versions trained at different
    sizes would be measured on different pictures. Its generator takes any size (`LoadedModel.translate`
    pads to its size factor)."""
    mine, theirs = champion.preprocessing, candidate.preprocessing
    prepared = dataclasses.replace(
        mine, load_size=theirs.load_size, crop_size=theirs.crop_size, preprocess=theirs.preprocess
    )
    if prepared == mine:
        return champion
    print(
        f"[promote] {ALIAS} version {champion.version} was trained at {mine.preprocess} {mine.crop_size} px: "
        f"scored like the candidate, {theirs.preprocess} {theirs.crop_size} px",
        file=sys.stderr,
        flush=True,
    )
    return dataclasses.replace(champion, preprocessing=prepared)


def record(cfg: PromoteConfig, client: Any, decision: dict[str, Any]) -> None:
    """The decision as tags on the candidate version, and the alias move when it won."""
    candidate_version, champion_version = str(decision["candidate_version"]), decision["champion_version"]
    tags = {
        "promotion.decision": "promoted" if decision["promoted"] else "rejected",
        "promotion.reason": decision["reason"],
        "promotion.metric": decision["metric"],
        "promotion.greater_is_better": str(decision["greater_is_better"]),
        "promotion.min_absolute_change": str(cfg.min_absolute_change),
        "promotion.min_relative_change": str(cfg.min_relative_change),
        "promotion.split": cfg.split,
        "promotion.seed": str(cfg.seed),
        "promotion.resolution": cfg.resolution,
        "promotion.norm_stats": cfg.norm_stats,
        "promotion.manifest_sha256": decision["manifest_sha256"],
        "promotion.candidate_score": str(decision["candidate_score"]),
        "promotion.champion_version": str(champion_version),
        "promotion.champion_score": str(decision.get("champion_score", "")),
        # Every metric of both models, so a decision on one metric can be reviewed against the others.
        "promotion.candidate_metrics": json.dumps(decision["candidate_metrics"], sort_keys=True),
        "promotion.champion_metrics": json.dumps(decision.get("champion_metrics", {}), sort_keys=True),
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
