"""`p2p train` on a real local Ray cluster with 2 gloo workers, real CamVid shards from the dataset builder,
checkpoints on a folder and on the SeaweedFS S3 server, MLflow on sqlite."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import psutil
import pytest
import torch
from mlflow import MlflowClient
from train_helpers import build, camvid_source, job, own_processes

from pipelines import storage
from pipelines.config import ConfigError
from pipelines.manifest import read_manifest
from pipelines.registry import tracking
from pipelines.runtime import TrainingInterrupted
from pipelines.training.loader import close_loader, workers_started
from pipelines.training.train import (
    PendingUploads,
    new_run,
    open_run,
    resumed_run,
    run_info_uri,
    run_training,
)
from pix2pix import load_checkpoint, load_generator

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]


@pytest.fixture(scope="module")
def camvid_dataset(camvid_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """24 train / 6 val real CamVid pairs (labels → photo) at 72 px, in 8-sample shards."""
    root = tmp_path_factory.mktemp("camvid-ds")
    return build(camvid_dir, camvid_source(camvid_dir, root / "src", 24, 6), str(root / "dataset"))


def metric_history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_end_to_end_on_local_storage(camvid_dataset: str, tmp_path: Path) -> None:
    cfg = job(
        camvid_dataset,
        tmp_path,
        run_name="local",
        checkpoint_every=5,
        # After the first candidate (step 5) every one comes sooner than this, except the last, always taken.
        checkpoint_min_interval_s=3600,
        # The plateau schedule counts its patience in epochs: every epoch is validated, whatever the floor.
        model__lr_policy="plateau",
        val_min_interval_s=3600,
        mlflow__register_as="camvid-labels2photo",
    )
    outcome = run_training(cfg)

    client = MlflowClient(cfg.mlflow.tracking_uri)
    run = client.get_run(outcome["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.netG"] == "unet" and run.data.params["global_batch_size"] == "2"
    rec = metric_history(client, run.info.run_id, "loss_g_rec")
    assert len(rec) >= 10 and all(np.isfinite(v) for _, v in rec)
    assert rec[-1][0] == 24  # 12 steps per epoch × 2 epochs, same on both ranks
    assert np.mean([v for _, v in rec[-3:]]) < np.mean([v for _, v in rec[:3]])  # the L1 term falls
    for key in (
        "loss_d_real",
        "loss_d_fake",
        "loss_g_gan",
        "samples_per_s",
        "val_l1",
        "val_psnr",
        "val_ssim",
    ):
        assert client.get_metric_history(run.info.run_id, key), key
    assert [step for step, _ in metric_history(client, run.info.run_id, "val_l1")] == [12, 24]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert artifacts == {"samples/epoch_001.png", "samples/epoch_002.png"}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "dataset")] == ["dataset/manifest.json"]

    checkpoints = sorted(p for p in (tmp_path / "runs" / "local").glob("checkpoint_*") if p.is_dir())
    assert [load_checkpoint(p / "checkpoint.pt")["step"] for p in checkpoints] == [5, 24]
    state = load_checkpoint(Path(outcome["checkpoint"]) / "checkpoint.pt")
    assert state["step"] == 24 and state["epoch"] == 2

    # The registered model is the checkpoint's generator.
    (version,) = client.search_model_versions("name='camvid-labels2photo'")
    assert version.run_id == run.info.run_id
    assert run.inputs.dataset_inputs[0].dataset.digest == read_manifest(camvid_dataset).build_id
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # UI: runs, not traces
    model = mlflow.pytorch.load_model("models:/camvid-labels2photo/1")  # exported in eval mode
    generator, _ = load_generator(Path(outcome["checkpoint"]) / "checkpoint.pt")
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(model(x), generator(x), atol=1e-6)

    secret = os.environ["AWS_SECRET_ACCESS_KEY"]  # set by the S3 fixture for the whole session
    assert all(secret not in v for v in run.data.params.values())
    assert all(secret not in v for v in run.data.tags.values())

    # Resuming the finished run trains nothing and registers no identical second version.
    again = run_training(*resumed_run("local", str(tmp_path / "runs"), {}))
    assert again["registered_version"] == outcome["registered_version"] == 1
    assert again["model_uri"] == outcome["model_uri"]
    assert len(client.search_model_versions("name='camvid-labels2photo'")) == 1
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def test_a_relative_dataset_path_is_made_absolute_before_the_workers_see_it(
    camvid_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ray Train runs each worker in its own folder, where a relative path points elsewhere.
    monkeypatch.chdir(Path(camvid_dataset).parent)
    cfg, manifest = new_run(job(Path(camvid_dataset).name, tmp_path, run_name="relative"))
    assert cfg.data.manifest == camvid_dataset and manifest.totals.samples_written == 30


def test_of_two_runs_started_under_one_name_at_once_the_second_is_refused(
    camvid_dataset: str, tmp_path: Path
) -> None:
    # Both pass new_run's check (nothing exists yet); only one may claim the name on storage.
    first_cfg, manifest = new_run(job(camvid_dataset, tmp_path, run_name="twice"))
    second_cfg, _ = new_run(job(camvid_dataset, tmp_path, run_name="twice"))
    first = open_run(first_cfg, manifest)
    with pytest.raises(FileExistsError, match=r"run 'twice' already exists .*--resume twice"):
        open_run(second_cfg, manifest)
    assert json.loads(storage.read_bytes(run_info_uri(first_cfg)))["mlflow_run_id"] == first
    client = MlflowClient(first_cfg.mlflow.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("pix2pix").experiment_id])
    assert [run.info.run_id for run in runs] == [first]  # the refused one's MLflow run is deleted


def test_a_start_that_never_wrote_its_run_record_leaves_no_run_running(
    camvid_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, manifest = new_run(job(camvid_dataset, tmp_path, run_name="orphans"))
    client = MlflowClient(cfg.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name("pix2pix") or client.get_experiment(
        client.create_experiment("pix2pix")
    )
    exp_id = experiment.experiment_id
    # What a start killed (SIGKILL) between creating its MLflow run and writing the record leaves behind,
    # and a live run of the same name under other storage, which is not this record's.
    killed = client.create_run(exp_id, run_name="orphans", tags={tracking.RECORD_TAG: run_info_uri(cfg)})
    other_record = str(tmp_path / "other" / "orphans" / "p2p_run.json")
    elsewhere = client.create_run(exp_id, run_name="orphans", tags={tracking.RECORD_TAG: other_record})

    # A start interrupted (Ctrl-C) while writing the record: its run is removed, not left RUNNING.
    def interrupted(uri: str, data: bytes) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(storage, "create_exclusive", interrupted)
        with pytest.raises(KeyboardInterrupt):
            open_run(cfg, manifest)
    assert not storage.exists(run_info_uri(cfg))
    left = {r.info.run_id for r in client.search_runs([exp_id])}
    assert left == {killed.info.run_id, elsewhere.info.run_id}

    run_id = open_run(cfg, manifest)
    statuses = {r.info.run_id: r.info.status for r in client.search_runs([exp_id])}
    assert statuses == {run_id: "RUNNING", killed.info.run_id: "KILLED", elsewhere.info.run_id: "RUNNING"}
    assert run_id in client.get_run(killed.info.run_id).data.tags["p2p.orphaned"]

    # A record write that landed but whose answer was lost: the run it names is kept for --resume.
    landed_cfg, _ = new_run(job(camvid_dataset, tmp_path, run_name="landed"))
    create_exclusive = storage.create_exclusive

    def landed_then_lost(uri: str, data: bytes) -> None:
        create_exclusive(uri, data)
        raise OSError("connection reset by peer")

    with monkeypatch.context() as patch:
        patch.setattr(storage, "create_exclusive", landed_then_lost)
        with pytest.raises(OSError):
            open_run(landed_cfg, manifest)
    recorded = json.loads(storage.read_bytes(run_info_uri(landed_cfg)))["mlflow_run_id"]
    assert client.get_run(recorded).info.lifecycle_stage == "active"


def test_settings_that_would_fail_in_the_workers_are_refused_before_the_run_exists(
    camvid_dataset: str, tmp_path: Path
) -> None:
    cfg = job(camvid_dataset, tmp_path, run_name="plateau", val_split="test2", model__lr_policy="plateau")
    with pytest.raises(ConfigError, match="lr_policy plateau follows the validation L1, but the dataset has"):
        new_run(cfg)
    cfg = job(camvid_dataset, tmp_path, run_name="fp16", precision="fp16", use_gpu=False)
    with pytest.raises(ConfigError, match="precision fp16 needs GPU workers"):
        run_training(cfg)
    assert not (tmp_path / "runs" / "fp16").exists() and not (tmp_path / "mlflow.db").exists()


def test_preprocess_none_is_checked_against_the_stored_sizes_before_the_run_exists(
    camvid_dir: Path, camvid_dataset: str, tmp_path: Path
) -> None:
    """``data.preprocess none`` feeds images at their stored size: the crop_size checks do not cover it."""
    cfg = job(camvid_dataset, tmp_path, run_name="none", data__preprocess="none")  # 72 px, unet_downs 6
    with pytest.raises(
        ConfigError, match=r"preprocess none trains on the stored 72x72 images: .* divisible by 64"
    ):
        new_run(cfg)
    fits = job(
        camvid_dataset, tmp_path, run_name="none", data__preprocess="none", model__netG="resnet_6blocks"
    )
    assert new_run(fits)[0].data.preprocess == "none"  # 72 is a multiple of 4: nothing refused
    # Native size (real CamVid: 960x720, cut to multiples of 1 px): sizes vary, and 720 is no multiple of 64.
    native = build(
        camvid_dir,
        camvid_source(camvid_dir, tmp_path / "src", 2, 0),
        str(tmp_path / "native"),
        resize={"mode": "native"},
    )
    with pytest.raises(ConfigError, match=r"a batch of 2 per worker cannot be stacked"):
        new_run(job(native, tmp_path, run_name="n", data__preprocess="none", workers=1, global_batch_size=2))
    with pytest.raises(
        ConfigError, match=r"cut to multiples of 1 px, and netG=unet needs multiples of 64: rebuild"
    ):
        new_run(job(native, tmp_path, run_name="n", data__preprocess="none"))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_run_resumes_on_the_dataset_build_it_started_on_while_the_rebuild_keeps_it(
    camvid_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A rebuild into the same folder replaces the shards: resuming on them would skip other batches. The
    run resumes on its own build, whose manifest the rebuild kept beside the new one with its shards, and
    is refused once they are gone."""
    source = camvid_source(camvid_dir, tmp_path / "src", 4, 0)
    dataset = build(camvid_dir, source, str(tmp_path / "dataset"))
    first = run_training(job(dataset, tmp_path, run_name="rebuilt", max_steps=2))
    started_on = read_manifest(dataset).build_id
    assert resumed_run("rebuilt", str(tmp_path / "runs"), {})[0].data.manifest == dataset  # same build
    rebuilt = read_manifest(build(camvid_dir, source, dataset, resize={"size": 64})).build_id
    assert rebuilt != started_on
    capsys.readouterr()

    cfg, run_id = resumed_run("rebuilt", str(tmp_path / "runs"), {"max_steps": 4})
    kept = str(tmp_path / "dataset" / f"manifest.{started_on}.json")
    assert cfg.data.manifest == dataset and read_manifest(kept).build_id == started_on
    assert f"continuing on its own build {started_on}, kept at {kept}" in capsys.readouterr().out
    second = run_training(cfg, resume=run_id)  # the workers read the kept manifest and its shards
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    state = load_checkpoint(Path(second["checkpoint"]) / "checkpoint.pt")
    recorded = state["extra"]["preprocessing"]
    assert state["step"] == 4 and recorded["dataset_build_id"] == started_on
    assert recorded["manifest"] == dataset  # the folder, not the kept copy
    # The logged model says the same (from the checkpoint, not from the folder's current manifest).
    from pipelines.registry.models import load_model

    model = load_model(second["model_uri"], cfg.mlflow.tracking_uri)
    assert model.preprocessing.dataset_build_id == started_on
    record = json.loads((tmp_path / "runs" / "rebuilt" / "p2p_run.json").read_text())
    assert record["dataset_build"] == started_on and record["config"]["data"]["manifest"] == dataset

    # Once a later build no longer keeps it (keep_replaced_hours), the run cannot continue.
    build(camvid_dir, source, dataset, resize={"size": 48}, keep_replaced_hours=0)
    assert not os.path.exists(kept)
    with pytest.raises(
        ConfigError,
        match=rf"run 'rebuilt' trained on dataset build {started_on}, and .* now holds build \w+; the old "
        r"build's shards are gone",
    ):
        resumed_run("rebuilt", str(tmp_path / "runs"), {})


def test_a_finish_interrupted_after_registering_does_not_register_again(
    camvid_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver dies (or the store stops answering) between registering the generator and tagging the
    run with it: the resume's finish finds that version instead of registering a duplicate."""
    import contextlib

    from pipelines.registry import tracking
    from pipelines.training import train as train_module
    from pix2pix import TrainingStep, save_checkpoint

    cfg, manifest = new_run(job(camvid_dataset, tmp_path, run_name="fin", mlflow__register_as="fin-model"))
    run_id = open_run(cfg, manifest)
    step = TrainingStep(cfg.model)
    step.step = 24
    save_checkpoint(tmp_path / "ck" / "checkpoint.pt", step)

    class Result:  # what Ray's fit returns: its checkpoint, as a folder
        class checkpoint:
            @staticmethod
            @contextlib.contextmanager
            def as_directory() -> Any:
                yield str(tmp_path / "ck")

    real_client = tracking.client

    class DiesBeforeTagging:  # the real client, until the finish records what it logged
        def __init__(self, uri: str) -> None:
            self.client = real_client(uri)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.client, name)

        def log_batch(self, run_id: str, **kwargs: Any) -> Any:
            if kwargs.get("tags"):
                raise ConnectionError("the driver was killed here")
            return self.client.log_batch(run_id, **kwargs)

    monkeypatch.setattr(tracking, "client", DiesBeforeTagging)
    with pytest.raises(ConnectionError):
        train_module.finish_run(cfg, run_id, Result())
    monkeypatch.setattr(tracking, "client", real_client)
    again = train_module.finish_run(cfg, run_id, Result())
    client = MlflowClient(cfg.mlflow.tracking_uri)
    versions = client.search_model_versions("name='fin-model'")
    assert [int(v.version) for v in versions] == [1] and again["registered_version"] == 1
    assert client.get_run(run_id).data.tags["p2p.generator_version"] == "1"
    # A later step (a resume with more steps) is a new version, as before.
    step.step = 30
    save_checkpoint(tmp_path / "ck" / "checkpoint.pt", step)
    assert train_module.finish_run(cfg, run_id, Result())["registered_version"] == 2


def test_a_run_has_one_driver_at_a_time(camvid_dataset: str, tmp_path: Path) -> None:
    """A `--resume` while the run's first driver still runs (its terminal gone, say) would train into the
    same checkpoints and log every step twice: refused while that driver's lock is alive."""
    import socket

    cfg, manifest = new_run(job(camvid_dataset, tmp_path, run_name="twice-driven"))
    run_id = open_run(cfg, manifest)
    alive = {  # as a driver running in this very process would have written it, heartbeat fresh
        "holder": "someone@" + socket.gethostname(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": "2026-12-06T00:00:00Z",
        "token": "other",
        "heartbeat_epoch": time.time(),
    }
    lock = tmp_path / "runs" / "twice-driven" / ".p2p-build.lock"
    lock.write_text(json.dumps(alive))
    with pytest.raises(
        storage.StorageError, match=r"run folder .*twice-driven has a driver running: someone@"
    ):
        run_training(*resumed_run("twice-driven", str(tmp_path / "runs"), {}))
    client = MlflowClient(cfg.mlflow.tracking_uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # untouched: still the first driver's
    assert json.loads(lock.read_text())["token"] == "other"


def test_more_workers_than_the_machine_has_are_refused_before_the_run_exists(
    camvid_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ray Train would wait for the third CPU without end; this session's cluster is one 2-CPU machine.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = job(camvid_dataset, tmp_path, run_name="too-big", workers=3, global_batch_size=3, cpus_per_worker=1)
    with pytest.raises(ConfigError, match=r"3 workers need 3 CPUs and the cluster has 2: lower --workers"):
        run_training(cfg)
    assert not (tmp_path / "runs" / "too-big").exists() and not (tmp_path / "mlflow.db").exists()


def test_end_to_end_on_s3(camvid_dir: Path, tmp_path: Path) -> None:
    source = camvid_source(camvid_dir, tmp_path / "src", 8, 2)
    manifest = build(camvid_dir, source, "s3://p2p-test/train-test/dataset", samples_per_shard=4)
    cfg = job(
        manifest,
        tmp_path,
        run_name="on-s3",
        storage="s3://p2p-test/train-test/runs",
        model__n_epochs=2,  # 3 epochs of 4 steps, cut at step 10
        max_steps=10,
        val_min_interval_s=3600,  # only the run's last epoch end is validated
    )
    outcome = run_training(cfg)
    # A URI the other verbs take (Ray's own path has no scheme: `p2p evaluate` read it as a local path).
    assert outcome["checkpoint"].startswith("s3://p2p-test/train-test/runs/on-s3/checkpoint_")
    run = MlflowClient(cfg.mlflow.tracking_uri).get_run(outcome["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    state = load_checkpoint(storage.read_bytes(f"{outcome['checkpoint']}/checkpoint.pt"))
    assert state["step"] == 10
    # 4 steps an epoch: the stop at max_steps comes mid-epoch, after the last epoch end the run reaches.
    assert [
        step for step, _ in metric_history(MlflowClient(cfg.mlflow.tracking_uri), run.info.run_id, "val_l1")
    ] == [8]


def test_bad_s3_settings_of_a_run_are_named_before_anything_is_created(
    camvid_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket-p2p' does not exist"):
        new_run(job(camvid_dataset, tmp_path, run_name="bad-s3", storage="s3://no-such-bucket-p2p/runs"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    with pytest.raises(storage.StorageError, match="credentials rejected by"):
        new_run(job(camvid_dataset, tmp_path, run_name="bad-s3", storage="s3://p2p-test/train-test/runs"))
    with pytest.raises(storage.StorageError, match="credentials rejected by"):
        resumed_run("bad-s3", "s3://p2p-test/train-test/runs", {})
    assert not (tmp_path / "mlflow.db").exists()


def test_resume_a_stopped_run_continues_the_same_mlflow_run(camvid_dataset: str, tmp_path: Path) -> None:
    first = run_training(
        job(camvid_dataset, tmp_path, run_name="stop-go", max_steps=6, data__num_workers="auto")
    )
    with pytest.raises(ConfigError, match=r"cannot change: data.crop_size, model.lr"):
        resumed_run("stop-go", str(tmp_path / "runs"), {"model": {"lr": 1.0}, "data": {"crop_size": 32}})
    cfg, run_id = resumed_run("stop-go", str(tmp_path / "runs"), {"max_steps": 10, "workers": 1})
    assert cfg.workers == 1 and cfg.data.batch_size == 2 and cfg.model.ngf == 16  # the recorded config
    second = run_training(cfg, resume=run_id)
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    state = load_checkpoint(Path(second["checkpoint"]) / "checkpoint.pt")
    assert state["step"] == 10
    client = MlflowClient(cfg.mlflow.tracking_uri)
    assert len(client.search_runs([client.get_experiment_by_name("pix2pix").experiment_id])) == 1
    # Auto loader workers: one each for 2 ranks on this machine (a loader fills their all-reduce waits);
    # for one rank whose torch thread leaves fewer than 2 CPUs free, none (decoding in-process).
    alone = 0 if len(os.sched_getaffinity(0)) - 1 < 2 else 1
    workers = [(m.step, m.value) for m in client.get_metric_history(run_id, "loader_workers")]
    assert workers == [(6, 1.0), (10, float(alone))]
    # Resumed once more with nothing left to do: found on the driver, no worker started, no checkpoint.
    written = sorted((tmp_path / "runs" / "stop-go").glob("checkpoint_*"))
    cfg, run_id = resumed_run("stop-go", str(tmp_path / "runs"), {"max_steps": 10, "workers": 1})
    again = run_training(cfg, resume=run_id)
    assert again["model_uri"] == second["model_uri"] and again["checkpoint"] is None
    assert sorted((tmp_path / "runs" / "stop-go").glob("checkpoint_*")) == written
    with pytest.raises(FileExistsError, match="--resume stop-go"):
        run_training(job(camvid_dataset, tmp_path, run_name="stop-go"))


def train_workers() -> list[psutil.Process]:
    return own_processes("RayTrainWorker")


def test_killed_worker_resumes_from_the_last_checkpoint(camvid_dataset: str, tmp_path: Path) -> None:
    cfg = job(
        camvid_dataset,
        tmp_path,
        run_name="killed",
        checkpoint_every=3,
        max_failures=2,
        model__n_epochs=2,
        model__n_epochs_decay=1,
        # Overlapped epochs (a GPU's default) through the real worker: two loaders per rank taking turns
        # over 3 epochs, forked around checkpoint uploads, rebuilt after the kill, same steps in the end.
        data__overlap_epochs=True,
    )
    outcome: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: outcome.update(run_training(cfg)), daemon=True)
    thread.start()
    run_dir = tmp_path / "runs" / "killed"
    deadline = time.time() + 240
    while time.time() < deadline and not list(run_dir.glob("checkpoint_*/checkpoint.pt")):
        time.sleep(0.1)
    workers = train_workers()
    assert workers, "no Ray Train worker process found"
    killed = workers[0].pid
    workers[0].kill()
    thread.join(timeout=600)
    assert not thread.is_alive() and outcome, "training did not finish after the worker was killed"
    assert killed not in [p.pid for p in train_workers()]

    state = load_checkpoint(Path(outcome["checkpoint"]) / "checkpoint.pt")
    assert state["step"] == 36 and state["epoch"] == 3  # same as an uninterrupted run: 12 steps × 3 epochs
    client = MlflowClient(cfg.mlflow.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("pix2pix").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def test_ctrl_c_stops_the_run_and_says_how_to_continue_it(camvid_dataset: str, tmp_path: Path) -> None:
    cfg = job(camvid_dataset, tmp_path, run_name="ctrl-c", model__n_epochs=50)  # minutes: stopped long before
    run_dir = tmp_path / "runs" / "ctrl-c"
    handler = signal.getsignal(signal.SIGINT)
    fitting = threading.Event()

    def press_ctrl_c() -> None:
        # Only once training runs (a checkpoint exists), so the SIGINT reaches the run, not pytest.
        deadline = time.time() + 240
        while time.time() < deadline and not list(run_dir.glob("checkpoint_*/checkpoint.pt")):
            time.sleep(0.1)
        if fitting.is_set():
            os.kill(os.getpid(), signal.SIGINT)

    fitting.set()
    threading.Thread(target=press_ctrl_c, daemon=True).start()
    with pytest.raises(
        TrainingInterrupted, match=r"run ctrl-c stopped.* p2p train --resume ctrl-c --storage "
    ):
        try:
            run_training(cfg)
        finally:
            fitting.clear()
    client = MlflowClient(cfg.mlflow.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("pix2pix").experiment_id])
    assert run.info.status == "KILLED"
    assert signal.getsignal(signal.SIGINT) is handler  # Ray's handler, bound to the ended run, is gone
    assert not train_workers()  # the workers stopped with it


def test_uneven_shards_finish_without_a_hang(camvid_dir: Path, tmp_path: Path) -> None:
    source = camvid_source(camvid_dir, tmp_path / "src", 27, 0)
    manifest = build(camvid_dir, source, str(tmp_path / "uneven"), samples_per_shard=10)

    counts = [s.samples for s in read_manifest(manifest).shards("train")]
    assert counts == [10, 10, 7]
    cfg = job(manifest, tmp_path, run_name="uneven", model__n_epochs=1, model__n_epochs_decay=0)
    outcome = run_training(cfg)
    state = load_checkpoint(Path(outcome["checkpoint"]) / "checkpoint.pt")
    assert state["step"] == 13  # 27 // (2 workers × 1 per worker)


def test_resume_without_rays_snapshot_starts_from_the_newest_checkpoint(
    camvid_dataset: str, tmp_path: Path
) -> None:
    """Ray's checkpoint-manager snapshot lost (storage down while it was written): --resume still continues
    from the newest complete checkpoint on storage, not from step 0, and no metric step is logged twice."""
    first = run_training(job(camvid_dataset, tmp_path, run_name="lost-snapshot", max_steps=6))
    run_folder = tmp_path / "runs" / "lost-snapshot"
    (run_folder / "checkpoint_manager_snapshot.json").unlink()
    newest = max(run_folder.glob("checkpoint_*"))
    newer_but_cut = run_folder / "checkpoint_9999-12-31_23-59-59.000000"  # a save cut short
    newer_but_cut.mkdir()
    (newer_but_cut / "checkpoint.pt").write_bytes((newest / "checkpoint.pt").read_bytes()[:1000])

    cfg, run_id = resumed_run("lost-snapshot", str(tmp_path / "runs"), {"max_steps": 10})
    second = run_training(cfg, resume=run_id)
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    state = load_checkpoint(Path(second["checkpoint"]) / "checkpoint.pt")
    assert state["step"] == 10
    client = MlflowClient(cfg.mlflow.tracking_uri)
    assert [m.value for m in client.get_metric_history(run_id, "resumed_at_step")] == [6.0]  # not 0
    steps = [m.step for m in client.get_metric_history(run_id, "loss_g_rec")]
    assert steps == sorted(set(steps)) and steps[-1] == 10  # one value per step


def test_a_loader_forks_its_workers_only_when_no_checkpoint_upload_runs() -> None:
    """A fork while Ray's upload thread is inside the S3 client leaves the child's S3 client hanging (seen in
    CI; reproduced with a PUT to a silent endpoint: the forked child never builds its client). The loop
    waits for uploads in flight before a persistent loader's first iteration, the one moment it forks."""
    uploads = PendingUploads()
    uploads.started()
    finished_at: list[float] = []

    def upload() -> None:
        time.sleep(0.3)
        finished_at.append(time.perf_counter())
        uploads.finished()

    threading.Thread(target=upload).start()
    uploads.wait()
    assert finished_at and time.perf_counter() >= finished_at[0]  # returned only once the upload ended
    uploads.wait()  # none in flight: at once
    uploads.started()  # an upload Ray never ran (a report skipped after a failed rank): bounded
    began = time.perf_counter()
    uploads.wait(timeout_s=0.2)
    assert 0.2 <= time.perf_counter() - began < 5
    assert workers_started(torch.utils.data.DataLoader(range(4)))  # decodes in-process: never forks
    loader = torch.utils.data.DataLoader(range(4), num_workers=1, persistent_workers=True)
    assert not workers_started(loader)
    assert sorted(int(x) for batch in loader for x in batch) == [0, 1, 2, 3]
    assert workers_started(loader)  # the next epochs reuse these workers: no fork
    close_loader(loader)
