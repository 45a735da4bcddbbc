"""`p2p sweep` on a real local Ray cluster (Ray Tune + Ray Train), real CamVid shards and a sqlite MLflow: a
tiny grid trains as nested runs, every trial is evaluated on the same split, the report is written; a
killed trial is retried from its checkpoint in the same MLflow run; a re-run continues instead of
retraining; a changed plan under the same name is refused."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import psutil
import pytest
from mlflow import MlflowClient
from train_helpers import build, camvid_source, job_values, own_processes

from pipelines import storage
from pipelines.config import ConfigError, from_dict, load_config
from pipelines.sweep import SweepConfig, check_epochs_hold_the_samples, plan_trials, run_sweep


@pytest.fixture(scope="module")
def camvid_dataset(camvid_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("sweep-ds")
    return build(camvid_dir, camvid_source(camvid_dir, root / "src", 16, 4), str(root / "dataset"))


def sweep_config(manifest: str, tmp: Path, **values: Any) -> SweepConfig:
    train = job_values(manifest, tmp, workers=1, global_batch_size=2, checkpoint_every=2, cpus_per_worker=0.5)
    train["data"]["num_workers"] = 0
    return from_dict(
        SweepConfig,
        {
            "name": "tiny",
            "train": train,
            "trials": [
                {"name": "l1", "set": {"model.lambda_gan": 0.0}},
                {"name": "cgan", "set": {"model.netD": "pixel"}},
            ],
            "samples_per_trial": 16,
            "segmenter": "none",
            **values,
        },
    )


def children(client: MlflowClient, parent: str) -> list[Any]:
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.mlflow.parentRunId = '{parent}'",
    )
    return sorted(runs, key=lambda r: r.info.run_name)


def test_plan_gives_equal_samples_and_refuses_bad_trials(tmp_path: Path) -> None:
    cfg = sweep_config("m", tmp_path, seeds=[0, 1])
    cfg.trials[1].set["global_batch_size"] = 4
    runs = plan_trials(cfg)
    assert [(r.trial, r.seed, r.run_name) for r in runs] == [
        ("l1", 0, "tiny-l1-s0"),
        ("l1", 1, "tiny-l1-s1"),
        ("cgan", 0, "tiny-cgan-s0"),
        ("cgan", 1, "tiny-cgan-s1"),
    ]
    assert [r.config.max_steps for r in runs] == [8, 8, 4, 4]  # 16 samples whatever the batch
    assert runs[0].config.model.lambda_gan == 0 and runs[2].config.model.netD == "pixel"
    cfg.trials[0].set["model.netD"] = "huge"
    with pytest.raises(ConfigError, match="trial l1"):
        plan_trials(cfg)
    with pytest.raises(ConfigError, match="unique"):
        plan_trials(sweep_config("m", tmp_path, trials=[{"name": "a"}, {"name": "a"}]))
    # What the job derives or the sweep sets per run would be overwritten: two trials, one config.
    cfg.trials[0].set = {"data.batch_size": 1}
    with pytest.raises(ConfigError, match=r"trial l1: data\.batch_size is not an option: it is derived from"):
        plan_trials(cfg)
    cfg.trials[0].set = {"seed": 7}
    with pytest.raises(ConfigError, match="trial l1: seed is not an option: it is derived from the sweep's"):
        plan_trials(cfg)
    with pytest.raises(ConfigError, match=r"train\.model\.precision is not an option"):
        load_config(SweepConfig, overrides=["name=s", "train.model.precision=bf16"])
    # The sweep's own settings, for every trial alike: a trial would train or log where nobody looks.
    for path in ("storage", "mlflow.tracking_uri", "max_steps"):
        cfg.trials[0].set = {path: 100 if path == "max_steps" else "elsewhere"}
        with pytest.raises(ConfigError, match=rf"trial l1: {re.escape(path)} is not an option"):
            plan_trials(cfg)


def test_trials_trained_on_different_dataset_builds_are_said_to_in_the_report(tmp_path: Path) -> None:
    """A rebuild of the dataset during a sweep: trials started (or retried) since train on the new build."""
    from pipelines.sweep import builds_note
    from pipelines.training.train import run_info_uri

    runs = plan_trials(sweep_config("m", tmp_path))
    for run in runs:
        storage.write_bytes_atomic(run_info_uri(run.config), json.dumps({"dataset_build": "aaaa"}).encode())
    assert builds_note(runs) == ""
    storage.write_bytes_atomic(run_info_uri(runs[1].config), json.dumps({"dataset_build": "bbbb"}).encode())
    assert builds_note(runs).startswith(
        "Note: the trials trained on 2 dataset builds (the dataset was rebuilt during the sweep), aaaa: "
        "tiny-l1-s0; bbbb: tiny-cgan-s0: "
    )


def test_a_sweep_run_again_continues_unless_its_plan_changed(tmp_path: Path) -> None:
    """How it runs (retries, concurrency) may change to push a failed sweep through; what it measures may
    not, and the refusal names what differs."""
    from pipelines.sweep import open_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = sweep_config("m", tmp_path)
    cfg.train.mlflow.tracking_uri = uri
    parent = open_sweep(cfg, uri)
    cfg.trial_retries, cfg.concurrent_trials = 5, 1
    assert open_sweep(cfg, uri) == parent
    cfg.samples_per_trial, cfg.train.model.ngf = 32, 8
    with pytest.raises(ConfigError, match=r"another plan \(samples_per_trial, train\.model\.ngf differ\)"):
        open_sweep(cfg, uri)


def counted_manifest(root: Path, **samples: int) -> str:
    """A manifest with these samples per split and no shards behind it: for checks that read counts only
    (nothing here starts Ray or reads a shard)."""
    from pipelines.manifest import Manifest, SampleFormat, ShardEntry, SplitInfo, Totals

    splits = {
        split: SplitInfo.of([ShardEntry(split, f"shards/b/{split}-000000.tar", n, 1, "0" * 64)])
        for split, n in samples.items()
    }
    total = sum(samples.values())
    fmt = SampleFormat("input.png", "target.jpg", 3, True)
    totals = Totals(2 * total, total, total, 0, len(splits), len(splits), 0)
    Manifest("b", "2026-12-06T00:00:00Z", {}, None, fmt, splits, totals).write(str(root))
    return str(root)


def test_a_sweep_checks_its_dataset_and_has_one_driver_before_ray_starts(tmp_path: Path) -> None:
    from pipelines.dataset.lock import LockHeld
    from pipelines.manifest import ManifestError
    from pipelines.registry import tracking
    from pipelines.sweep import (
        SWEEP_FILE,
        SweepLock,
        check_against_dataset_before_ray,
        open_sweep,
        runs_storage,
    )

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    manifest = counted_manifest(tmp_path / "dataset", train=16, val=4)
    cfg = sweep_config(manifest, tmp_path, samples_per_trial=0)
    cfg.train.mlflow.tracking_uri = uri
    # Typos found before any trial trains (each would fail trial_retries + 1 times, or after every trial).
    for setting, value, refusal in (
        ("eval_split", "vall", r"eval_split 'vall' is not a split of the dataset \(it has train, val\)"),
        ("trial", "vall", r"trial l1: val_split 'vall' is not a split of the dataset"),
        ("manifest", str(tmp_path / "nowhere"), r"no dataset manifest at .*nowhere"),
    ):
        broken = copy.deepcopy(cfg)
        if setting == "eval_split":
            broken.eval_split = value
        elif setting == "trial":
            broken.trials[0].set["val_split"] = value
        else:
            broken.train.data.manifest = value
        with pytest.raises((ConfigError, ManifestError), match=refusal):
            run_sweep(broken)
    assert not (tmp_path / "runs" / "tiny").exists()
    for no_validation in ("", "none"):  # asked for by name: no refusal
        quiet = copy.deepcopy(cfg)
        quiet.trials[0].set["val_split"] = no_validation
        check_against_dataset_before_ray(quiet, plan_trials(quiet))

    client = MlflowClient(uri)
    exp_id = tracking.experiment_id(client, cfg.train.mlflow.experiment, uri)
    record = storage.join(runs_storage(cfg), SWEEP_FILE)
    # What a sweep killed between creating its parent run and writing sweep.json leaves behind.
    tags = {"p2p.kind": "sweep", tracking.RECORD_TAG: record}
    killed = client.create_run(exp_id, run_name="tiny", tags=tags)
    parent = open_sweep(cfg, uri)
    assert client.get_run(killed.info.run_id).info.status == "KILLED"
    assert client.get_run(parent).info.status == "RUNNING"
    # How the runs are scored may change when the sweep is run again (a fixed split, FID weights added).
    rescored = copy.deepcopy(cfg)
    rescored.eval_split, rescored.eval_seed = "train", 3
    assert open_sweep(rescored, uri) == parent
    # A second driver of the sweep is refused before it starts Ray or touches the parent run.
    with SweepLock(runs_storage(cfg)), pytest.raises(LockHeld, match=r"sweep folder .* has a driver running"):
        run_sweep(cfg)


def test_a_trial_whose_epochs_stop_short_of_its_samples_is_refused(tmp_path: Path) -> None:
    """Training ends at its epochs even before max_steps: that trial would see fewer samples."""
    from pipelines.manifest import Manifest, SampleFormat, ShardEntry, SplitInfo, Totals

    train = SplitInfo.of([ShardEntry("train", "shards/b/train-000000.tar", 20, 1, "0" * 64)])
    fmt = SampleFormat("input.png", "target.jpg", 3, True)
    manifest = Manifest(
        "b", "2026-12-06T00:00:00Z", {}, None, fmt, {"train": train}, Totals(40, 20, 20, 0, 1, 1, 0)
    )
    cfg = sweep_config("m", tmp_path, samples_per_trial=16)  # 1 + 1 epochs of 10 steps at batch 2: 40 samples
    cfg.trials[1].set["global_batch_size"] = 4
    check_epochs_hold_the_samples(plan_trials(cfg), manifest, 16)  # 8 and 4 steps: within 20 and 10
    cfg.samples_per_trial = 60  # 30 steps at batch 2: 3 epochs of 10
    with pytest.raises(
        ConfigError, match=r"trial l1: samples_per_trial 60 is 30 steps at global batch 2, 3 epochs"
    ):
        check_epochs_hold_the_samples(plan_trials(cfg), manifest, 60)


def test_relative_paths_are_planned_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tune runs each trial in its own working folder: relative storage, manifest or sqlite paths would
    name other places there (the shipped examples give `storage: runs/sweeps`)."""
    monkeypatch.chdir(tmp_path)
    cfg = sweep_config("ds/manifest.json", tmp_path, name="rel")
    cfg.train.storage, cfg.train.mlflow.tracking_uri = "runs/sweeps", "sqlite:///runs/mlflow.db"
    run = plan_trials(cfg)[0].config
    assert run.storage == str(tmp_path / "runs/sweeps/rel/runs")
    assert run.data.manifest == str(tmp_path / "ds/manifest.json")
    assert run.mlflow.tracking_uri == f"sqlite:///{tmp_path / 'runs/mlflow.db'}"
    # The plan as recorded, planned again where a trial runs (another folder), names the same places.
    recorded = from_dict(SweepConfig, dataclasses.asdict(cfg))
    (tmp_path / "trial-folder").mkdir()
    monkeypatch.chdir(tmp_path / "trial-folder")
    again = plan_trials(recorded)[0].config
    assert (again.storage, again.data.manifest, again.mlflow.tracking_uri) == (
        run.storage,
        run.data.manifest,
        run.mlflow.tracking_uri,
    )


def tune_trials() -> list[psutil.Process]:
    """This session's running Tune function trials (their TorchTrainer controllers are their children)."""
    return own_processes("tune_trial") or own_processes("ImplicitFunc")


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_sweep_trains_evaluates_reports_survives_a_killed_trial_and_continues(
    camvid_dataset: str, tmp_path: Path
) -> None:
    cfg = sweep_config(camvid_dataset, tmp_path, concurrent_trials=1)
    # Kill the first trial's process once its run has a checkpoint: Tune restarts it, and the restarted
    # trial continues the same run from that checkpoint.
    runs_dir = tmp_path / "runs" / "tiny" / "runs"
    killed: list[int] = []

    def kill_first_trial() -> None:
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            # The l1 trial, between its first complete checkpoint and its end (trial.json). A checkpoint_*
            # folder appears when its upload starts: killed then, the trial rightly started over and the
            # test failed once in CI. Once l1 is done, the only trial process is the next trial's.
            l1 = runs_dir / "tiny-l1-s0"
            written = list(l1.glob("checkpoint_*/checkpoint.pt"))
            if written and not (l1 / "trial.json").exists() and tune_trials():
                proc = tune_trials()[0]
                killed.append(proc.pid)
                proc.kill()
            time.sleep(0.2)

    killer = threading.Thread(target=kill_first_trial, daemon=True)
    killer.start()
    outcome = run_sweep(cfg)
    killer.join(timeout=1)
    assert killed, "no trial process was found to kill"

    client = MlflowClient(cfg.train.mlflow.tracking_uri)
    parent = outcome["parent_run_id"]
    nested = children(client, parent)
    assert [r.info.run_name for r in nested] == ["tiny-cgan-s0", "tiny-l1-s0"]  # one run per trial
    for run in nested:
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss_g_rec")]
        assert steps == sorted(set(steps)) and max(steps) == 8, steps  # no duplicates, all 8 steps
    l1_run = next(r for r in nested if r.info.run_name == "tiny-l1-s0")
    resumed = client.get_metric_history(l1_run.info.run_id, "resumed_at_step")
    assert resumed and resumed[0].value > 0  # the killed trial came back from its checkpoint
    assert (
        "loss_d_total" not in l1_run.data.metrics and "loss_d_total" in nested[0].data.metrics
    )  # L1 alone: no D

    rows = outcome["rows"]
    assert [(r["trial"], r["seed"]) for r in rows] == [("l1", 0), ("cgan", 0)]
    assert all(np.isfinite(r["metrics"]["l1"]) and r["metrics"]["l1"] > 0 for r in rows)
    table = Path(outcome["files"]["results.md"]).read_text()
    assert "| l1 | 1 |" in table and "| cgan | 1 |" in table and "ssim ↑" in table
    assert Path(outcome["files"]["results.csv"]).read_text().count("\n") == 3
    png = cv2.imread(outcome["files"]["results.png"])
    assert png is not None and png.shape[0] > 100
    artifacts = {a.path for a in client.list_artifacts(parent, "sweep")}
    assert artifacts == {"sweep/results.md", "sweep/results.csv", "sweep/results.png"}
    assert client.get_run(parent).data.metrics["cgan.l1"] == pytest.approx(rows[1]["metrics"]["l1"])

    # Run again: nothing is retrained or re-evaluated, the same parent run gets the same table.
    again = run_sweep(sweep_config(camvid_dataset, tmp_path, concurrent_trials=1))
    assert again["parent_run_id"] == parent
    assert [r["eval_run_id"] for r in again["rows"]] == [r["eval_run_id"] for r in rows]
    assert len(children(client, parent)) == 2

    # Another plan under the same name is refused before anything runs.
    with pytest.raises(ConfigError, match="another plan"):
        run_sweep(sweep_config(camvid_dataset, tmp_path, samples_per_trial=32))
