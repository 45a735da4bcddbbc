"""Multi-node on a real Ray cluster, here: two raylets on 127.0.0.1 (`node_a` the head, `node_b`; see
tests/local_cluster.py for why and how), the session's SeaweedFS S3 server as the storage every node sees, and
the jobs run as a user runs them: `p2p` in a subprocess with RAY_ADDRESS pointing at the cluster.

What it proves:
- `p2p dataset build` runs its shard tasks on both nodes, writing to S3, and the manifest verifies;
- `p2p train --workers 2` with `placement_strategy=SPREAD` puts one worker on each node (the run's
  `p2p.worker_nodes` tag, recorded by the workers themselves), with checkpoints on S3;
- when node_b dies mid-training (SIGKILL of its raylet and workers) and comes back, the run resumes from its
  last checkpoint and ends at the uninterrupted run's step, as one FINISHED MLflow run with one value per step
  for every loss;
- a local folder as `--storage` on this 2-node cluster is refused in one line (exit 2) before anything is
  created, and accepted with `--storage-shared`.

Budget: one cluster for the module (~10 s); every node has 1 CPU and the training workers take 0.5 each, so
the driver, Ray Train's controller and the loaders never wait on CPUs the trainers hold (Ray Data and Ray
Train together on 2 CPUs can otherwise deadlock). The module took 1m50 to 2m40 on the shared 2-core machine.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import S3_TEST_BUCKET
from local_cluster import LocalCluster
from mlflow import MlflowClient
from train_helpers import camvid_source, job_values

from pipelines import storage
from pipelines.manifest import read_manifest, verify_shards
from pix2pix import load_checkpoint

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
S3_ROOT = f"s3://{S3_TEST_BUCKET}/multinode"
LOSSES = ("loss_d_real", "loss_d_fake", "loss_d_total", "loss_g_gan", "loss_g_rec", "loss_g_total")


@pytest.fixture(scope="module")
def cluster(s3_server: Any) -> Iterator[LocalCluster]:
    """Started after the S3 server, so that every node's workers inherit its AWS_* settings."""
    started = time.perf_counter()
    cluster = LocalCluster.start()
    try:
        cluster.add("node_b")
        print(f"\n2-node cluster at {cluster.address} up in {time.perf_counter() - started:.1f} s")
        yield cluster
    finally:
        left = cluster.stop()
    assert not left, f"cluster processes still running after stop: {left}"


def p2p(cluster: LocalCluster, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=cluster.env(),
        timeout=timeout,
    )


def write_yaml(path: Path, values: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(values))
    return str(path)


@pytest.fixture(scope="module")
def built(
    cluster: LocalCluster, camvid_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """24 train / 6 val CamVid pairs uploaded to S3, built by `p2p dataset build` into 8 shards on S3."""
    root = tmp_path_factory.mktemp("multinode-src")
    source = camvid_source(camvid_dir, root / "src", 24, 6)
    raw = f"{S3_ROOT}/raw"
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        storage.write_bytes_atomic(storage.join(raw, path.relative_to(source).as_posix()), path.read_bytes())
    config = {
        "source": {"uri": raw, "a_dir": "labels", "b_dir": "images"},
        "output": f"{S3_ROOT}/dataset",
        "derive": {"builder": "labels", "palette": str(camvid_dir / "classes.json")},
        "resize": {"size": 72},
        "shards": {"samples_per_shard": 4},
    }
    result = p2p(cluster, "dataset", "build", "--config", write_yaml(root / "build.yaml", config))
    assert result.returncode == 0, result.stdout + result.stderr
    return {"manifest": config["output"], "stdout": result.stdout}


def train_config(built: dict[str, str], tmp: Path, name: str, **overrides: Any) -> str:
    values = job_values(
        built["manifest"],
        tmp,
        run_name=name,
        storage=f"{S3_ROOT}/runs",
        placement_strategy="SPREAD",
        checkpoint_every=4,
        max_failures=3,
        # Long enough (about 5 s of training) that node_b is lost mid-run, once Ray Train has recorded the
        # first checkpoint (it takes one report per worker each 2 s).
        model__n_epochs=4,
        model__n_epochs_decay=4,
        **overrides,
    )
    return write_yaml(tmp / f"{name}.yaml", values)


def mlflow_run(tmp: Path) -> Any:
    """The only run of the experiment in this test's own MLflow store."""
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("pix2pix").experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def loss_steps(tmp: Path, run_id: str) -> dict[str, list[int]]:
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    return {k: sorted(m.step for m in client.get_metric_history(run_id, k)) for k in LOSSES}


def final_step(run_name: str) -> int:
    checkpoints = sorted(
        uri
        for uri in storage.list_files(f"{S3_ROOT}/runs/{run_name}")
        if uri.endswith("/checkpoint.pt") and "/checkpoint_" in uri
    )
    assert checkpoints, f"no checkpoint of {run_name} on S3"
    return max(int(load_checkpoint(storage.read_bytes(uri))["step"]) for uri in checkpoints)


def registered_checkpoints(run_name: str) -> int:
    """Checkpoints Ray Train has recorded as reported by every rank (its checkpoint manager's snapshot on
    storage): the ones a restart resumes from. A checkpoint folder on S3 alone may still be unregistered."""
    uri = f"{S3_ROOT}/runs/{run_name}/checkpoint_manager_snapshot.json"
    try:
        return len(json.loads(storage.read_bytes(uri)).get("checkpoint_results") or [])
    except (FileNotFoundError, ValueError):  # not yet written, or caught mid-write
        return 0


def test_dataset_build_runs_shard_tasks_on_both_nodes(cluster: LocalCluster, built: dict[str, str]) -> None:
    match = re.search(r"\[build\] shard tasks ran on (\d+) node\(s\): (.*)", built["stdout"])
    assert match, built["stdout"]
    used = {part.split(" x")[0] for part in match.group(2).split(", ")}
    assert used == {cluster.node_ids["node_a"][:8], cluster.node_ids["node_b"][:8]}, match.group(0)
    manifest = read_manifest(built["manifest"])
    assert manifest.totals.shards == 8 and manifest.totals.samples_written == 30
    assert verify_shards(built["manifest"], manifest) == []


@pytest.fixture(scope="module")
def uninterrupted(
    cluster: LocalCluster, built: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("train-spread")
    # progress_every_s 0: a console line after every step and every epoch, to check both kinds.
    result = p2p(cluster, "train", "--config", train_config(built, tmp, "spread", progress_every_s=0))
    assert result.returncode == 0, result.stdout + result.stderr
    run = mlflow_run(tmp)
    steps = loss_steps(tmp, run.info.run_id)
    return {"tmp": tmp, "run": run, "stdout": result.stdout, "stderr": result.stderr, "steps": steps}


def test_train_puts_one_worker_on_each_node_with_checkpoints_on_s3(
    cluster: LocalCluster, uninterrupted: dict[str, Any]
) -> None:
    run = uninterrupted["run"]
    assert run.info.status == "FINISHED"
    nodes = json.loads(run.data.tags["p2p.worker_nodes"])  # by rank, as the workers saw themselves
    assert sorted(nodes) == sorted([cluster.node_ids["node_a"], cluster.node_ids["node_b"]])
    assert "2 worker(s) on 2 node(s)" in uninterrupted["stdout"]
    # Ray Train's own note about its PreemptionWatcher actor stays in Ray's logs (`pipelines/__init__.py`).
    assert "constructor arguments in the object store" not in uninterrupted["stderr"]
    lines = re.findall(r"\[train\] epoch (\d)/8 step (\d+)/96 .*", uninterrupted["stdout"])
    assert ("1", "1") in lines  # within the first epoch, after its first step
    assert "val_l1" in next(
        line for line in uninterrupted["stdout"].splitlines() if "epoch 8/8 step 96/96" in line
    )
    assert final_step("spread") == 96  # 24 samples / global batch 2 = 12 steps x 8 epochs
    assert uninterrupted["steps"]["loss_g_rec"] == list(range(2, 97, 2))  # log_every 2


def test_a_node_lost_mid_training_resumes_from_the_last_checkpoint(
    cluster: LocalCluster, built: dict[str, str], uninterrupted: dict[str, Any], tmp_path: Path
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "train", "--config", train_config(built, tmp_path, "lost")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO_ROOT,
        env=cluster.env(),
    )
    readd_errors: list[BaseException] = []

    def add_back() -> None:  # node_b returns 5 s after it was lost, while the run goes on
        time.sleep(5)
        try:
            cluster.add("node_b")
        except BaseException as exc:
            readd_errors.append(exc)

    readd = threading.Thread(target=add_back, daemon=True)
    try:
        deadline = time.monotonic() + 180
        while registered_checkpoints("lost") < 1:  # on S3 is not enough: Ray Train must have recorded it
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the deadline"
            time.sleep(0.2)
        cluster.remove("node_b")  # SIGKILL: its worker dies mid-step, rank 0 loses its peer
        lost_at = time.monotonic()
        readd.start()  # Ray Train may also restart both workers on node_a before node_b is back
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if readd.ident is not None:
            readd.join(timeout=60)
    assert not readd_errors, readd_errors
    print(f"training ended {time.monotonic() - lost_at:.1f} s after node_b was lost")
    print("\n".join(line for line in output.splitlines() if "worker(s) on" in line or "resumed at" in line))
    assert proc.returncode == 0, output

    resumed = [int(s) for s in re.findall(r"resumed at step (\d+)", output)]
    assert resumed and 0 < min(resumed) < 96, output  # restarted from a mid-run checkpoint
    assert "2 worker(s) on 2 node(s)" in output  # the first attempt used both nodes
    assert final_step("lost") == final_step("spread") == 96
    run = mlflow_run(tmp_path)
    assert run.info.status == "FINISHED"
    steps = loss_steps(tmp_path, run.info.run_id)
    for key, logged in steps.items():
        assert len(logged) == len(set(logged)), f"{key}: steps logged twice: {logged}"
    assert steps == uninterrupted["steps"]


def test_a_local_storage_folder_is_refused_on_several_nodes_unless_shared(
    cluster: LocalCluster, built: dict[str, str], tmp_path: Path
) -> None:
    folder = tmp_path / "checkpoints"
    config = train_config(built, tmp_path, "local")
    refused = p2p(cluster, "train", "--config", config, "--storage", str(folder))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    # One line from p2p (Ray's own "Connecting to existing Ray cluster" INFO lines come before it).
    errors = [line for line in refused.stderr.splitlines() if line.startswith("p2p train: error:")]
    assert len(errors) == 1 and refused.stderr.rstrip().endswith(errors[0]), refused.stderr
    assert "is a local folder but the Ray cluster has 2 nodes" in errors[0], errors
    assert "s3://" in errors[0] and "--storage-shared" in errors[0]
    assert not folder.exists()  # refused before the run record or any checkpoint
    assert not (tmp_path / "mlflow.db").exists()  # nor an MLflow run

    # Declared shared (here it is: every node runs on this machine): the check passes; no training needed.
    check = (
        "from pipelines.training.train import TrainJobConfig, check_storage_reachable\n"
        "from pipelines.runtime import init_ray\n"
        "init_ray()\n"
        f"check_storage_reachable(TrainJobConfig(storage={str(folder)!r}, storage_shared=True))\n"
        "print('accepted')\n"
    )
    accepted = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, cwd=REPO_ROOT, env=cluster.env()
    )
    assert accepted.returncode == 0 and accepted.stdout.strip() == "accepted", accepted.stderr
