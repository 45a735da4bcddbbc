"""`p2p sweep --config SWEEP.yaml`: a grid of training configs as concurrent trials on the Ray cluster, each
its own MLflow run under one parent run; then every trial is evaluated on the same split, and a table and a
plot of the results are written and logged.

The job reads top to bottom:
1. `plan_trials` (driver, before Ray): the base `train` config, each trial's `set` values and each of
   `seeds` give one `TrainJobConfig` per trial run, validated here so that a typo fails before anything
   starts. `samples_per_trial` fixes every run's `max_steps` to samples / global batch, so trials with
   different batch sizes see the same number of samples.
2. `open_sweep` (under `SweepLock`: one driver per sweep): `<storage>/<name>/sweep.json` records the
   plan and the parent MLflow run. Running the same sweep again continues it (finished trials are not
   trained again, unfinished ones resume from their newest checkpoint); a different plan under the same
   name is refused.
3. `run_trials` (Ray Tune): one trial per planned run, a function that runs the ordinary training job (Ray
   Train's TorchTrainer) with a fixed run name. When the run exists already (Tune retried a killed trial,
   or the sweep was re-run) it is resumed like `p2p train --resume`: same MLflow run, no duplicate metric
   steps. A finished run leaves a record on storage and is skipped.
4. `evaluate_trials` (driver): every trial's final generator on `eval_split` with the same seed and the
   same quality measures (`pipelines.registry.scoring`), cached per trial on storage.
5. `report`: mean and spread over seeds per trial, as Markdown, CSV and a PNG plot, written next to
   sweep.json and logged to the parent run.

Why a Tune function around the existing job rather than a Tune-specific training loop: a trial is then
exactly a `p2p train` run (same checkpoints, resume, MLflow layout, registry path), and Tune adds what a
sweep needs on top: concurrency within the cluster's resources and retries of failed trials.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pipelines import storage
from pipelines.config import ConfigError, flat_paths, from_dict, merge, nest, option, refuse_derived, value_at
from pipelines.dataset.lock import BuildLock, LockConfig
from pipelines.manifest import Manifest, manifest_sha256, read_manifest
from pipelines.registry import tracking
from pipelines.registry.models import load_model
from pipelines.registry.scoring import METRICS, evaluate_model, resolve_quality
from pipelines.runtime import cluster_gpus, init_ray
from pipelines.training.loader import steps_per_epoch
from pipelines.training.train import (
    RUN_NAME,
    TrainJobConfig,
    check_against_dataset,
    resumed_run,
    run_info_uri,
    run_training,
)

SWEEP_FILE = "sweep.json"
# The trial function only waits on its TorchTrainer, whose workers hold the real resources; Tune refuses
# an empty request, so it asks for a hundredth of a CPU (counted when deciding how many trials fit).
TRIAL_CPUS = 0.01
TRIAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# The columns of the table and the panels of the plot, in this order, when measured.
REPORTED = ("l1", "psnr", "ssim", "fcn_pixel_acc", "fcn_class_acc", "fcn_iou", "fid", "kid")
PLOTTED = ("l1", "ssim", "fcn_iou", "fid")


@dataclass
class TrialSpec:
    name: str = option("", "trial name (letters, digits, '.', '_', '-'): names its runs and its table row")
    set: dict[str, Any] = option(
        {}, "train config values of this trial by dotted path, e.g. model.netD: pixel"
    )


@dataclass
class SweepConfig:
    name: str = option("", "sweep name: its folder under the train storage and its parent MLflow run")
    train: TrainJobConfig = field(default_factory=TrainJobConfig)  # every trial starts from this config
    trials: list[TrialSpec] = field(default_factory=list)  # empty: one trial, the train config as it is
    seeds: list[int] = option([0], "each trial is trained once per seed (the table shows mean and spread)")
    samples_per_trial: int = option(
        0, "training samples per run: max_steps = this / global batch (0: the train config's epochs)"
    )
    concurrent_trials: int = option(0, "trials at once (0: as many as the cluster's CPUs or GPUs fit)")
    trial_retries: int = option(2, "times Tune restarts a failed trial (it resumes from its checkpoint)")
    eval_split: str = option("val", "split every trial is evaluated on")
    eval_seed: int = option(0, "seed of the evaluation")
    fid_weights: str = option("", "FID Inception weights (else $P2P_FID_WEIGHTS; without them no FID)")
    segmenter: str = option(
        "auto", "FCN-score segmenter: auto (the dataset's registered one), a URI, or none"
    )

    # What a trial's run takes from the sweep rather than from its train config or its `set`.
    SETS_PER_RUN: ClassVar[dict[str, str]] = {
        "seed": "the sweep's seeds",
        "run_name": "the sweep, trial and seed names",
        "mlflow.register_as": "nothing: a sweep registers no model (promote one afterwards)",
    }
    RUN_DERIVED: ClassVar[dict[str, str]] = {**TrainJobConfig.DERIVED, **SETS_PER_RUN}  # a trial's `set`
    # The sweep's own, for every trial alike (a trial setting them would train where, or log where, the
    # sweep does not look): given under `train`, not in a trial's `set`.
    # How the sweep is carried out, not what it measures: may change when a sweep is run again.
    HOW_IT_RUNS: ClassVar[tuple[str, ...]] = ("concurrent_trials", "trial_retries")
    # How the trained runs are scored: may change too (a typo'd split fixed, FID weights added); every
    # cached score records how it was measured and is measured again when that differs.
    HOW_IT_IS_SCORED: ClassVar[tuple[str, ...]] = ("eval_split", "eval_seed", "fid_weights", "segmenter")
    SWEEP_WIDE: ClassVar[dict[str, str]] = {
        "storage": "the sweep's train.storage",
        "mlflow.tracking_uri": "the sweep's train.mlflow.tracking_uri (trials are evaluated from one store)",
    }
    DERIVED: ClassVar[dict[str, str]] = {f"train.{path}": source for path, source in RUN_DERIVED.items()}

    def validate(self) -> None:
        if not self.name or not RUN_NAME.fullmatch(self.name):
            raise ConfigError(
                f"sweep name {self.name!r}: give --name with letters, digits, '.', '_' and '-' "
                "(it names a folder and the parent MLflow run)"
            )
        names = [t.name for t in self.trials]
        for name in names:
            if not TRIAL_NAME.fullmatch(name):
                raise ConfigError(f"trial name {name!r}: use letters, digits, '.', '_' and '-' (64 at most)")
        if len(set(names)) != len(names):
            raise ConfigError(f"trial names must be unique, got {names}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be a non-empty list of distinct integers, got {self.seeds}")
        for name in ("samples_per_trial", "concurrent_trials", "trial_retries"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class PlannedRun:
    trial: str
    seed: int
    config: TrainJobConfig

    @property
    def run_name(self) -> str:
        return self.config.run_name


# ----------------------------------------------------------------------------------------------------------
# 1. Plan
# ----------------------------------------------------------------------------------------------------------


def runs_storage(cfg: SweepConfig) -> str:
    return storage.join(storage.normalize_uri(cfg.train.storage), cfg.name)


def plan_trials(cfg: SweepConfig) -> list[PlannedRun]:
    """Every run of the sweep, in table order, each config validated."""
    cfg.validate()
    # Trials run in Tune's own working folders: a relative path would point elsewhere there (a relative
    # storage put every trial's checkpoints and records under Ray's temp folder, where the driver never
    # found them).
    if cfg.train.data.manifest:
        cfg.train.data.manifest = storage.normalize_uri(cfg.train.data.manifest)
    cfg.train.storage = storage.normalize_uri(cfg.train.storage)
    if cfg.train.mlflow.tracking_uri:
        cfg.train.mlflow.tracking_uri = tracking.absolute_sqlite(cfg.train.mlflow.tracking_uri)
    base = dataclasses.asdict(cfg.train)
    trials = cfg.trials or [TrialSpec(name="base")]
    planned = []
    for trial in trials:
        values = base
        given: dict[str, Any] = {}
        for path, value in trial.set.items():
            values = merge(values, nest(path.split("."), value))
            given = merge(given, nest(path.split("."), value))
        # Else silently overwritten below or by the job: two trials would train the same config.
        per_sweep = {"max_steps": "samples_per_trial"} if cfg.samples_per_trial else {}
        refuse_derived(
            {**SweepConfig.RUN_DERIVED, **SweepConfig.SWEEP_WIDE, **per_sweep}, given, f"trial {trial.name}: "
        )
        for seed in cfg.seeds:
            where = f"trial {trial.name}"
            run = from_dict(TrainJobConfig, merge(values, {"seed": seed}), where)
            run.run_name = f"{cfg.name}-{trial.name}-s{seed}"
            run.storage = storage.join(runs_storage(cfg), "runs")
            run.mlflow.register_as = ""  # a sweep compares; promotion is a separate, deliberate step
            if cfg.samples_per_trial:
                run.max_steps = max(1, cfg.samples_per_trial // run.global_batch_size)
            try:
                run.validate()
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from exc
            planned.append(PlannedRun(trial.name, seed, run))
    return planned


# ----------------------------------------------------------------------------------------------------------
# 2. The sweep's record and parent run
# ----------------------------------------------------------------------------------------------------------


def recorded_plan(cfg: SweepConfig) -> dict[str, Any]:
    """The config as recorded (on storage, and read by every trial): credentials out of the tracking URI,
    which trials take from the environment (`tracking.export_credentials`)."""
    values = dataclasses.asdict(cfg)
    values["train"]["mlflow"]["tracking_uri"] = tracking.for_workers(
        values["train"]["mlflow"]["tracking_uri"]
    )
    return values


def open_sweep(cfg: SweepConfig, tracking_uri: str) -> str:
    """The parent MLflow run id: new, or the recorded one when this sweep is run again."""
    record_uri = storage.join(runs_storage(cfg), SWEEP_FILE)
    plan = recorded_plan(cfg)
    if storage.exists(record_uri):
        record = json.loads(storage.read_bytes(record_uri))
        changed = sorted(
            path
            for path in set(flat_paths(plan)) | set(flat_paths(record["config"]))
            if path.split(".")[0] not in SweepConfig.HOW_IT_RUNS + SweepConfig.HOW_IT_IS_SCORED
            and value_at(plan, path, None) != value_at(record["config"], path, None)
        )
        if changed:
            shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
            raise ConfigError(
                f"sweep {cfg.name!r} already exists under {cfg.train.storage} with another plan ({shown} "
                "differ): choose another --name, or run it again with its recorded config to continue it "
                f"({', '.join(SweepConfig.HOW_IT_RUNS + SweepConfig.HOW_IT_IS_SCORED)} may change)"
            )
        print(
            f"[sweep] continuing sweep {cfg.name} (parent MLflow run {record['parent_run_id']})", flush=True
        )
        return str(record["parent_run_id"])
    client = tracking.client(tracking_uri)
    exp_id = tracking.experiment_id(client, cfg.train.mlflow.experiment, tracking_uri)
    tags = {"p2p.kind": "sweep", tracking.RECORD_TAG: record_uri}
    parent = str(client.create_run(exp_id, run_name=cfg.name, tags=tags).info.run_id)
    try:
        tracking.log_params(client, parent, {"sweep": plan})
        storage.write_bytes_atomic(record_uri, json.dumps({"config": plan, "parent_run_id": parent}).encode())
    except BaseException:  # interrupted before the record: a run nothing could continue
        with contextlib.suppress(Exception):
            client.delete_run(parent)
        raise
    tracking.end_orphans(client, exp_id, cfg.name, record_uri, parent, "[sweep]")  # a start killed there
    return parent


# ----------------------------------------------------------------------------------------------------------
# 3. Train: one Tune trial per planned run
# ----------------------------------------------------------------------------------------------------------


def trial_record_uri(run: PlannedRun) -> str:
    return storage.join(run.config.storage, run.run_name, "trial.json")


def tune_trial(params: dict[str, Any]) -> None:
    train_trial(params)  # the outcome goes to storage; Tune's own results are not where it is read


def train_trial(params: dict[str, Any]) -> dict[str, Any]:
    """The Tune trial: train (or resume, or skip) one planned run. Runs in a Tune actor; reads the plan from
    storage, so nothing but the sweep's location and the run's name travels as a task argument."""
    record = json.loads(storage.read_bytes(params["sweep"]))
    cfg = from_dict(SweepConfig, record["config"])
    cfg.train.mlflow.tracking_uri = tracking.on_worker(cfg.train.mlflow.tracking_uri)
    run = next(r for r in plan_trials(cfg) if r.run_name == params["run"])
    done_uri = trial_record_uri(run)
    if storage.exists(done_uri):
        return dict(json.loads(storage.read_bytes(done_uri)))
    run.config.mlflow.parent_run_id = record["parent_run_id"]
    if storage.exists(run_info_uri(run.config)):
        # A retried trial, or a sweep run again: continue the run from its newest checkpoint.
        resumed, mlflow_run_id = resumed_run(run.run_name, run.config.storage, {})
        outcome = run_training(resumed, resume=mlflow_run_id, wait_for_driver=True)
    else:
        outcome = run_training(run.config, wait_for_driver=True)
    result = {
        "trial": run.trial,
        "seed": run.seed,
        "run_name": run.run_name,
        "mlflow_run_id": outcome["mlflow_run_id"],
        "model_uri": outcome["model_uri"],
    }
    storage.write_bytes_atomic(done_uri, json.dumps(result).encode())
    return result


def concurrency(cfg: SweepConfig, runs: list[PlannedRun]) -> int:
    """Trials at once: the configured number, or as many as the cluster's GPUs (or CPUs) hold."""
    import ray

    if cfg.concurrent_trials:
        return cfg.concurrent_trials
    widest = max(r.config.workers for r in runs)
    gpus = cluster_gpus()
    if gpus:
        return max(1, gpus // widest)
    cpus = ray.cluster_resources().get("CPU", 1)
    per_trial = max(r.config.workers * r.config.cpus_per_worker for r in runs) + TRIAL_CPUS
    return max(1, int(cpus // per_trial))


def run_trials(cfg: SweepConfig, runs: list[PlannedRun]) -> list[dict[str, Any]]:
    import ray.tune

    record_uri = storage.join(runs_storage(cfg), SWEEP_FILE)
    filesystem, path = (
        storage.resolve(runs_storage(cfg)) if storage.is_s3(cfg.train.storage) else (None, runs_storage(cfg))
    )
    at_once = concurrency(cfg, runs)
    print(f"[sweep] {len(runs)} run(s), {at_once} at a time", flush=True)
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(tune_trial, {"CPU": TRIAL_CPUS}),
        param_space={
            "sweep": record_uri,
            "run": ray.tune.grid_search([r.run_name for r in runs]),
        },
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=at_once),
        run_config=ray.tune.RunConfig(
            name="tune",
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=ray.tune.FailureConfig(max_failures=cfg.trial_retries),
            verbose=0,
        ),
    )
    grid = tuner.fit()
    failed = [(r.config or {}).get("run", "?") for r in (grid[i] for i in range(len(grid))) if r.error]
    if failed:
        raise RuntimeError(
            f"sweep {cfg.name}: {len(failed)} trial(s) failed after {cfg.trial_retries} retries: "
            f"{', '.join(failed)}; run the sweep again to resume them (finished trials are kept)"
        )
    return [json.loads(storage.read_bytes(trial_record_uri(run))) for run in runs]


# ----------------------------------------------------------------------------------------------------------
# 4. Evaluate every trial on the same split
# ----------------------------------------------------------------------------------------------------------


def evaluate_trials(
    cfg: SweepConfig, runs: list[PlannedRun], outcomes: list[dict[str, Any]], tracking_uri: str
) -> list[dict[str, Any]]:
    manifest = cfg.train.data.manifest
    quality = resolve_quality(manifest, tracking_uri, cfg.fid_weights, cfg.segmenter, sheet=4)
    for line in quality.skipped:
        print(f"[sweep] {line}", flush=True)
    client = tracking.client(tracking_uri)
    # What the scores depend on beyond the plan: a row cached by an earlier invocation is reused only if
    # it was measured the same way (the dataset rebuilt, another segmenter registered, FID weights given).
    segmenter = quality.segmenter
    measured_with = {
        "manifest_sha256": manifest_sha256(manifest),
        "segmenter": f"{segmenter.uri} v{segmenter.version}" if segmenter else None,
        "fid_weights": Path(quality.fid_weights).name if quality.fid_weights else None,
        "eval_seed": cfg.eval_seed,
    }
    rows = []
    for run, outcome in zip(runs, outcomes, strict=True):
        cached = storage.join(run.config.storage, run.run_name, f"eval-{cfg.eval_split}.json")
        if storage.exists(cached):
            row = json.loads(storage.read_bytes(cached))
            if row.get("measured_with") == measured_with:
                rows.append(row)
                continue
            print(f"[sweep] {run.run_name}: evaluated again (cached scores measured otherwise)", flush=True)
        model = load_model(outcome["model_uri"], tracking_uri)
        result = evaluate_model(model, manifest, cfg.eval_split, cfg.eval_seed, tracking_uri, quality=quality)
        metrics = {k: float(v) for k, v in result["metrics"].items()}
        # On the training run too, so MLflow's compare view of the parent's children shows them.
        client.log_batch(
            outcome["mlflow_run_id"],
            metrics=tracking.metric_list({f"sweep_{cfg.eval_split}_{k}": v for k, v in metrics.items()}, 0),
        )
        row = {**outcome, "eval_run_id": result["run_id"], "metrics": metrics, "measured_with": measured_with}
        storage.write_bytes_atomic(cached, json.dumps(row).encode())
        print(
            f"[sweep] {run.run_name}: " + " ".join(f"{k} {metrics[k]:.4g}" for k in REPORTED if k in metrics),
            flush=True,
        )
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------
# 5. Report
# ----------------------------------------------------------------------------------------------------------


@dataclass
class TrialSummary:
    trial: str
    runs: int
    mean: dict[str, float]
    std: dict[str, float]  # over seeds (0 with one seed)


def summarize(rows: list[dict[str, Any]]) -> list[TrialSummary]:
    order = list(dict.fromkeys(row["trial"] for row in rows))
    summaries = []
    for trial in order:
        values = [row["metrics"] for row in rows if row["trial"] == trial]
        keys = [k for k in REPORTED if all(k in v for v in values)]
        mean = {k: float(np.mean([v[k] for v in values])) for k in keys}
        std = {k: float(np.std([v[k] for v in values], ddof=1)) if len(values) > 1 else 0.0 for k in keys}
        summaries.append(TrialSummary(trial, len(values), mean, std))
    return summaries


def markdown_table(summaries: list[TrialSummary], split: str) -> str:
    keys = [k for k in REPORTED if all(k in s.mean for s in summaries)]
    arrows = {k: "↓" if METRICS.get(k) == "lower" else "↑" for k in keys}
    header = ["trial", "runs", *[f"{k} {arrows[k]}" for k in keys]]
    lines = [
        f"Evaluated on the `{split}` split; mean ± standard deviation over seeds.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for s in summaries:
        cells = [s.trial, str(s.runs)]
        cells += [f"{s.mean[k]:.4g}" + (f" ± {s.std[k]:.2g}" if s.runs > 1 else "") for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_rows(rows: list[dict[str, Any]]) -> str:
    keys = [k for k in REPORTED if all(k in row["metrics"] for row in rows)]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["trial", "seed", "run_name", "mlflow_run_id", *keys])
    for row in rows:
        writer.writerow(
            [row["trial"], row["seed"], row["run_name"], row["mlflow_run_id"]]
            + [f"{row['metrics'][k]:.6g}" for k in keys]
        )
    return out.getvalue()


def plot(summaries: list[TrialSummary], title: str) -> bytes:
    """One bar panel per plotted metric, trials side by side, error bars over seeds; PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in PLOTTED if all(k in s.mean for s in summaries)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys) + 1, 3.6), squeeze=False)
    names = [s.trial for s in summaries]
    for ax, key in zip(axes[0], keys, strict=True):
        ax.bar(
            range(len(names)),
            [s.mean[key] for s in summaries],
            yerr=[s.std[key] for s in summaries],
            color="#4C72B0",
            capsize=3,
        )
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        ax.set_title(f"{key} ({'lower' if METRICS.get(key) == 'lower' else 'higher'} is better)", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def builds_note(runs: list[PlannedRun]) -> str:
    """A line for the report when the trials trained on different dataset builds (the folder was rebuilt
    during the sweep: a trial started or retried since then trained on the new build): their scores then
    compare more than their settings. "" when they all trained on one."""
    builds: dict[str, list[str]] = {}
    for run in runs:
        recorded = json.loads(storage.read_bytes(run_info_uri(run.config))).get("dataset_build") or "?"
        builds.setdefault(str(recorded), []).append(run.run_name)
    if len(builds) < 2:
        return ""
    listed = "; ".join(f"{build}: {', '.join(names)}" for build, names in sorted(builds.items()))
    return (
        f"Note: the trials trained on {len(builds)} dataset builds (the dataset was rebuilt during the "
        f"sweep), {listed}: scores differ by data as well as by settings; re-run the sweep under a new name "
        "to compare on one build."
    )


def report(
    cfg: SweepConfig, rows: list[dict[str, Any]], parent: str, tracking_uri: str, note: str = ""
) -> dict[str, str]:
    summaries = summarize(rows)
    table = markdown_table(summaries, cfg.eval_split)
    files = {
        "results.md": (table + (f"\n{note}\n" if note else "")).encode(),
        "results.csv": csv_rows(rows).encode(),
        "results.png": plot(summaries, f"sweep {cfg.name}: {cfg.eval_split} split"),
    }
    client = tracking.client(tracking_uri)
    written = {}
    for name, data in files.items():
        uri = storage.join(runs_storage(cfg), name)
        storage.write_bytes_atomic(uri, data)
        written[name] = uri
        tracking.log_bytes(client, parent, "sweep", name, data)
    for s in summaries:
        client.log_batch(
            parent,
            metrics=tracking.metric_list(
                {f"{s.trial}.{k}": v for k, v in s.mean.items() if math.isfinite(v)}, 0
            ),
        )
    client.set_terminated(parent, "FINISHED")
    return written


def check_epochs_hold_the_samples(runs: list[PlannedRun], manifest: Manifest, samples: int) -> None:
    """Training stops at its epochs even before max_steps: a trial whose epochs hold fewer than
    ``samples_per_trial`` samples would see fewer than the others (and larger batches fewer still, as
    each epoch drops its last partial batch), silently."""
    for run in runs:
        cfg = run.config
        per_epoch = steps_per_epoch(manifest, "train", cfg.workers, cfg.global_batch_size // cfg.workers)
        if cfg.max_steps > cfg.epochs * per_epoch:
            needed = math.ceil(cfg.max_steps / per_epoch)
            raise ConfigError(
                f"trial {run.trial}: samples_per_trial {samples} is {cfg.max_steps} steps at global batch "
                f"{cfg.global_batch_size}, {needed} epochs of {per_epoch} steps, and the train config stops "
                f"after {cfg.epochs} (model.n_epochs + model.n_epochs_decay): raise them, or lower "
                "samples_per_trial"
            )


def check_against_dataset_before_ray(cfg: SweepConfig, runs: list[PlannedRun]) -> None:
    """What every trial and the evaluation need from the dataset, checked before Ray starts: else a missing
    manifest or a split's typo fails each trial `trial_retries` + 1 times, or only after every trial."""
    manifest = read_manifest(cfg.train.data.manifest)
    if cfg.eval_split not in manifest.splits:
        splits = ", ".join(manifest.splits)
        raise ConfigError(f"eval_split {cfg.eval_split!r} is not a split of the dataset (it has {splits})")
    for run in runs:
        try:
            check_against_dataset(run.config, manifest)
        except ConfigError as exc:
            raise ConfigError(f"trial {run.trial}: {exc}") from exc
    if cfg.samples_per_trial:
        check_epochs_hold_the_samples(runs, manifest, cfg.samples_per_trial)


class SweepLock(BuildLock):
    """One driver per sweep: two drivers of one name would run two Tune experiments over one folder, each
    trial twice in turn (the run lock makes the second wait), and record two parent runs, the second
    overwriting the first's record. The build lock's machinery (`pipelines.dataset.lock`); a dead driver's
    stale lock is taken over."""

    BUSY = (
        "sweep folder {output} has a driver running: {holder}; stop that one (Ctrl-C there) or let it "
        "finish, then run the sweep again to continue it (lock {uri})"
    )
    LABEL = "[sweep]"


def run_sweep(cfg: SweepConfig) -> dict[str, Any]:
    runs = plan_trials(cfg)
    check_against_dataset_before_ray(cfg, runs)
    tracking_uri = tracking.tracking_uri(cfg.train.mlflow.tracking_uri)
    cfg.train.mlflow.tracking_uri = tracking_uri
    tracking.export_credentials(tracking_uri)  # before Ray starts: trial processes inherit it
    with SweepLock(runs_storage(cfg), LockConfig(break_lock=True)):
        init_ray()
        parent = open_sweep(cfg, tracking_uri)
        outcomes = run_trials(cfg, runs)
        rows = evaluate_trials(cfg, runs, outcomes, tracking_uri)
        note = builds_note(runs)
        if note:
            print(f"[sweep] {note}", flush=True)
        written = report(cfg, rows, parent, tracking_uri, note)
    print(storage.read_bytes(written["results.md"]).decode(), flush=True)
    print(f"[sweep] done: {written['results.md']}, {written['results.png']}", flush=True)
    return {"parent_run_id": parent, "rows": rows, "files": written}
