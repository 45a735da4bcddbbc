"""Evaluation, promotion and batch translation against a real MLflow registry (sqlite), a model trained by
`p2p train` on real CamVid shards, and a real local Ray cluster; translation and evaluation at the frames'
native 480×360 too."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import mlflow.artifacts
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from test_preprocessing import stored_inputs
from train_helpers import build, camvid_source, job

import pix2pix
from pipelines.cli import main
from pipelines.config import ConfigError
from pipelines.dataset.lock import LOCK_NAME, LockHeld
from pipelines.images import decode_image
from pipelines.inference.translate import TranslateConfig, run_translate
from pipelines.manifest import read_manifest, shard_uris
from pipelines.preprocessing import Preprocessing, to_image
from pipelines.registry.evaluate import EvaluateConfig, run_evaluate
from pipelines.registry.models import load_model, log_generator
from pipelines.registry.promote import (
    LOCK_PREFIX,
    PromoteConfig,
    measured,
    promote,
    promotion_lock,
    scored_like,
)
from pipelines.registry.scoring import score_split
from pipelines.training.train import preprocessing, run_training
from pix2pix import Pix2PixConfig, build_generator

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]
NAME = "camvid-l2p"


def evaluate(model_uri: str, manifest: str, tracking_uri: str) -> dict[str, Any]:
    return run_evaluate(EvaluateConfig(model_uri, manifest, "val", tracking_uri=tracking_uri))


def register_untrained(registry: dict[str, Any], seed: int, direction: str = "AtoB") -> str:
    """A real, freshly initialised generator registered the way `p2p train` registers one, with the recorded
    preprocessing of the trained one (or of another task): the baseline a trained model has to beat."""
    torch.manual_seed(seed)
    config = Pix2PixConfig(**registry["model"])
    generator = build_generator(config).eval()
    recorded = Preprocessing.from_dict({**registry["preprocessing"], "direction": direction})
    client = MlflowClient(registry["tracking_uri"])
    run_id = client.create_run(registry["experiment_id"]).info.run_id
    info = log_generator(generator, config, recorded, run_id, registry["tracking_uri"], NAME)
    client.set_terminated(run_id)
    return str(info.registered_model_version)


@pytest.fixture(scope="module")
def registry(camvid_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One registered model: v1 untrained, v2 trained by `p2p train`, v3 untrained, v4 another task."""
    root = tmp_path_factory.mktemp("registry")
    manifest = build(camvid_dir, camvid_source(camvid_dir, root / "src", 16, 6), str(root / "dataset"))
    cfg = job(manifest, root, run_name="trained", model__n_epochs=2, model__n_epochs_decay=0)
    cfg.derive(read_manifest(manifest))
    recorded = preprocessing(cfg, read_manifest(manifest)).to_dict()
    client = MlflowClient(cfg.mlflow.tracking_uri)
    state: dict[str, Any] = {
        "root": root,
        "manifest": manifest,
        "tracking_uri": cfg.mlflow.tracking_uri,
        "experiment_id": client.create_experiment("registry-fixture", (root / "mlartifacts").as_uri()),
        "preprocessing": recorded,
        "model": {"netG": "unet", "unet_downs": 6, "ngf": 16, "ndf": 16},
    }
    state["v1"] = register_untrained(state, seed=1)
    cfg.mlflow.register_as = NAME
    state["trained"] = run_training(cfg)
    state["v2"] = str(state["trained"]["registered_version"])
    state["v3"] = register_untrained(state, seed=3)
    state["v4"] = register_untrained(state, seed=4, direction="BtoA")
    return state


def test_evaluate_logs_a_run_linked_to_the_version(registry: dict[str, Any]) -> None:
    uri = registry["tracking_uri"]
    result = evaluate(f"models:/{NAME}/{registry['v2']}", registry["manifest"], uri)
    metrics = result["metrics"]
    assert (
        metrics["samples"] == 6
        and 0 < metrics["l1"] < 1
        and metrics["psnr"] > 0
        and -1 < metrics["ssim"] <= 1
    )
    client = MlflowClient(uri)
    run = client.get_run(result["run_id"])
    assert run.data.tags["p2p.model_version"] == registry["v2"]
    assert run.data.tags["p2p.manifest_sha256"] == result["manifest_sha256"]
    assert run.data.metrics["eval_l1"] == pytest.approx(metrics["l1"])
    assert client.get_model_version(NAME, registry["v2"]).tags["eval.val.run_id"] == result["run_id"]
    # The training checkpoint scores the same as the registered (exported) model.
    from_checkpoint = evaluate(registry["trained"]["checkpoint"], registry["manifest"], uri)
    assert from_checkpoint["metrics"]["l1"] == pytest.approx(metrics["l1"], abs=1e-5)
    # The run folder itself: its newest complete checkpoint, the one the run registered.
    run_folder = str(Path(registry["trained"]["checkpoint"]).parent)  # .../trained/checkpoint_<time>
    from_run = evaluate(run_folder, registry["manifest"], uri)
    assert from_run["metrics"]["l1"] == pytest.approx(metrics["l1"], abs=1e-5)


def test_promotion_moves_the_alias_only_for_a_better_candidate(registry: dict[str, Any]) -> None:
    uri, manifest = registry["tracking_uri"], registry["manifest"]
    client = MlflowClient(uri)

    def run(version: str, **kwargs: Any) -> dict[str, Any]:
        return promote(PromoteConfig(NAME, version, manifest, "val", tracking_uri=uri, **kwargs))

    first = run(registry["v1"])
    assert first["promoted"] and "first version" in first["reason"]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == registry["v1"]

    def tags() -> dict[str, dict[str, str]]:
        return {v: client.get_model_version(NAME, registry[v]).tags for v in ("v1", "v2")}

    before = tags()
    dry = run(registry["v2"], dry_run=True)
    assert dry["promoted"] and dry["candidate_score"] < dry["champion_score"]  # trained beats untrained L1
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == registry["v1"]
    assert tags() == before  # a dry run tags no version: no decision, no evaluation pointer moved

    second = run(registry["v2"])
    assert second["promoted"]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == registry["v2"]
    tags = client.get_model_version(NAME, registry["v2"]).tags
    assert tags["promotion.decision"] == "promoted" and tags["promotion.champion_version"] == registry["v1"]
    assert tags["promotion.manifest_sha256"] == second["manifest_sha256"]
    assert float(tags["promotion.candidate_score"]) == pytest.approx(second["candidate_score"])

    third = run(registry["v3"])
    assert not third["promoted"] and third["candidate_score"] > third["champion_score"]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == registry["v2"]
    assert client.get_model_version(NAME, registry["v3"]).tags["promotion.decision"] == "rejected"
    # The same comparison, scored twice, gives the same numbers: same data, split and seed.
    assert run(registry["v3"], dry_run=True)["champion_score"] == third["champion_score"]

    with pytest.raises(ValueError, match=r"different task.*direction: 'BtoA' vs 'AtoB'"):
        run(registry["v4"])

    cli = subprocess.run(
        [
            str(Path(sys.executable).parent / "p2p"),
            "promote",
            NAME,
            "--candidate",
            registry["v3"],
            "--split",
            "val",
            "--manifest",
            manifest,
            "--dry-run",
            "--tracking-uri",
            uri,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr
    assert "champion unchanged" in cli.stdout


def test_translate_a_folder_and_a_dataset_split(
    registry: dict[str, Any], camvid_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri, manifest = registry["tracking_uri"], registry["manifest"]
    # Inputs as a user has them: colour-coded label maps (taken from the val shards) plus broken files.
    folder = tmp_path / "inputs"
    (folder / "street").mkdir(parents=True)
    keys = []
    for shard in shard_uris(manifest, read_manifest(manifest), "val"):
        with tarfile.open(fileobj=io.BytesIO(Path(shard).read_bytes())) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".input.png") and len(keys) < 3:
                    key = member.name.split(".")[0]
                    (folder / "street" / f"{key}.png").write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
                    keys.append(key)
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    # CamVid's own class-id mask, not the colour label map this labels → photo model was trained on.
    (folder / "mask.png").write_bytes(next((camvid_dir / "val" / "labels").glob("*.png")).read_bytes())
    # A second file with an existing key would write that key's output too: neither is translated.
    (folder / "street" / f"{keys[0]}.jpg").write_bytes((folder / "street" / f"{keys[0]}.png").read_bytes())

    out = tmp_path / "translated"
    report = run_translate(
        TranslateConfig(f"models:/{NAME}@champion", str(folder), str(out), tracking_uri=uri)
    )
    assert report["translated"] == 2 and report["quarantined"] == 5 and report["seen"] == 7
    reasons = {Path(q["paths"][0]).name: q["reason"] for q in report["quarantine"]}
    assert "zero-byte" in reasons["empty.png"] and "not an image" in reasons["notes.txt"]
    assert (
        "raw class-id mask" in reasons["mask.png"] and "--class-ids colours such masks" in reasons["mask.png"]
    )
    assert reasons[f"{keys[0]}.png"] == f"duplicate key 'street/{keys[0]}': also {keys[0]}.jpg"
    assert reasons[f"{keys[0]}.jpg"] == f"duplicate key 'street/{keys[0]}': also {keys[0]}.png"
    printed = capsys.readouterr().out  # the console says why, and where every reason is
    assert f"[translate] quarantined: 2 × duplicate key 'street/{keys[0]}'; 1 × " in printed
    assert f"1 × {reasons['empty.png']}" in printed
    assert f"(each input and its reason: {out}/translate_report.json)" in printed
    assert not (out / "street" / f"{keys[0]}.png").exists()
    for key in keys[1:]:
        image = cv2.imread(str(out / "street" / f"{key}.png"))
        assert image is not None and image.shape == (64, 64, 3)  # the model's crop size
    assert json.loads((out / "translate_report.json").read_text())["translated"] == 2

    split_out = tmp_path / "split"
    report = run_translate(
        TranslateConfig(
            f"models:/{NAME}@champion",
            manifest,
            str(split_out),
            split="val",
            tracking_uri=uri,
            output_size="source",
        )
    )
    assert report["translated"] == 6 and report["quarantined"] == 0 and report["other_files"] == 0
    assert len(list(split_out.glob("*.png"))) == 6
    assert cv2.imread(str(next(split_out.glob("*.png")))).shape == (72, 72, 3)  # back to the stored size

    # Raw class-id masks, as CamVid ships them, coloured with the palette the model recorded (as the build
    # coloured its dataset), then translated.
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "mask.png").write_bytes((folder / "mask.png").read_bytes())
    coloured = run_translate(
        TranslateConfig(
            f"models:/{NAME}@champion", str(masks), str(tmp_path / "m"), tracking_uri=uri, class_ids=True
        )
    )
    assert coloured["translated"] == 1 and cv2.imread(str(tmp_path / "m" / "mask.png")).shape == (64, 64, 3)

    # Into a folder holding another run's outputs: they stay, said and counted, not passed off as this run's.
    capsys.readouterr()
    mixed = run_translate(
        TranslateConfig(f"models:/{NAME}@champion", manifest, str(out), split="val", tracking_uri=uri)
    )
    assert mixed["translated"] == 6 and mixed["other_files"] == 2
    assert f"{out} also holds 2 file(s) this run did not write" in capsys.readouterr().out


def test_a_champion_trained_at_another_size_is_scored_on_the_candidates_pictures(
    registry: dict[str, Any],
) -> None:
    """At resolution model each model's recorded geometry prepares its inputs and targets: a champion
    trained at 32 px was measured on other pictures than a 64 px candidate."""
    candidate = load_model(f"models:/{NAME}/{registry['v2']}", registry["tracking_uri"])
    small = Preprocessing.from_dict({**registry["preprocessing"], "crop_size": 32, "load_size": 36})
    champion = dataclasses.replace(candidate, preprocessing=small, version="0")
    own = score_split(champion, registry["manifest"], "val").metrics
    alike = score_split(scored_like(champion, candidate), registry["manifest"], "val").metrics
    reference = score_split(candidate, registry["manifest"], "val").metrics
    assert alike == reference and own["l1"] != reference["l1"]  # the same generator, the same pictures


def test_a_broken_model_is_never_promoted(registry: dict[str, Any]) -> None:
    uri = registry["tracking_uri"]
    config = Pix2PixConfig(**registry["model"])
    generator = build_generator(config).eval()
    with torch.no_grad():
        for parameter in generator.parameters():
            parameter.fill_(float("nan"))  # diverged
    recorded = Preprocessing.from_dict(registry["preprocessing"])
    run_id = MlflowClient(uri).create_run(registry["experiment_id"]).info.run_id
    log_generator(generator, config, recorded, run_id, uri, "diverged")
    decision = promote(PromoteConfig("diverged", "1", registry["manifest"], "val", tracking_uri=uri))
    assert not decision["promoted"] and decision["reason"] == "the candidate's l1 is nan: never promoted"
    assert not MlflowClient(uri).get_registered_model("diverged").aliases
    with pytest.raises(ValueError, match=r"fid was not measured on split 'val' .*: choose another --metric"):
        measured({"metrics": {"l1": 0.1}, "skipped": ["FID skipped: no Inception weights"]}, "fid", "val")


def test_translate_refuses_to_write_into_its_input_or_misalign_a_centre_crop(
    registry: dict[str, Any], tmp_path: Path
) -> None:
    uri = registry["tracking_uri"]
    folder = tmp_path / "inputs"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"a user's image")
    for output in (folder, folder / "translated"):  # OUTPUT/a.png would overwrite the input
        with pytest.raises(ConfigError, match="overlap: write the translations to a folder outside"):
            run_translate(
                TranslateConfig(f"models:/{NAME}@champion", str(folder), str(output), tracking_uri=uri)
            )
    assert (folder / "a.png").read_bytes() == b"a user's image"
    # A centre-crop model's output covers the centre of each input: stretched to its size it is misplaced.
    torch.manual_seed(0)
    config = Pix2PixConfig(**registry["model"])
    recorded = Preprocessing.from_dict({**registry["preprocessing"], "preprocess": "crop"})
    client = MlflowClient(uri)
    run_id = client.create_run(registry["experiment_id"]).info.run_id
    log_generator(build_generator(config).eval(), config, recorded, run_id, uri, "centre-crop")
    cfg = TranslateConfig("models:/centre-crop/1", str(folder), str(tmp_path / "out"), tracking_uri=uri)
    cfg.output_size = "source"
    with pytest.raises(ConfigError, match=r"trained with preprocess crop: .* use --resolution native"):
        run_translate(cfg)
    assert not (tmp_path / "out").exists()


def test_a_killed_translation_leaves_no_report_and_holds_the_folder_until_it_is_gone(
    registry: dict[str, Any], ray_session: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real `p2p translate` process on this Ray cluster, killed (SIGKILL) while it writes: the folder keeps
    no report (an earlier run's report would vouch for images this run replaced), a second translation into
    the folder while it runs is refused, and the next one after it died takes over its stale lock."""
    uri, model = registry["tracking_uri"], f"models:/{NAME}/{registry['v2']}"
    folder, out = tmp_path / "inputs", tmp_path / "out"
    folder.mkdir()
    shard = shard_uris(registry["manifest"], read_manifest(registry["manifest"]), "val")[0]
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".input.png"))
        label = decode_image(tar.extractfile(member).read(), member.name)  # type: ignore[union-attr]
    frame = cv2.resize(label, (512, 384), interpolation=cv2.INTER_NEAREST)
    for index in range(60):  # at their own size: long enough a run to be killed in the middle
        cv2.imwrite(str(folder / f"frame-{index:03d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    out.mkdir()
    (out / "translate_report.json").write_text('{"translated": 60}')  # an earlier translation's
    command = [str(Path(sys.executable).parent / "p2p"), "translate", model, str(folder), str(out)]
    command += ["--resolution", "native", "--batch-size", "1", "--tracking-uri", uri]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    log = tmp_path / "translate.log"
    with log.open("w") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and process.poll() is None and len(list(out.glob("*.png"))) < 2:
            time.sleep(0.05)
        assert process.poll() is None, log.read_text()
        assert (out / LOCK_NAME).exists()
        with pytest.raises(LockHeld, match=rf"another translation is writing .*\(pid {process.pid} "):
            run_translate(TranslateConfig(model, str(folder), str(out), tracking_uri=uri))
    finally:
        process.kill()
        process.wait()
    written = len(list(out.glob("*.png")))
    assert 0 < written < 60 and not (out / "translate_report.json").exists()

    report = run_translate(
        TranslateConfig(model, str(folder), str(out), tracking_uri=uri, resolution="native")
    )
    assert report["translated"] == 60 and len(list(out.glob("*.png"))) == 60
    assert "taking over the stale lock of" in capsys.readouterr().out
    assert not (out / LOCK_NAME).exists()


def test_a_logged_model_carries_the_library_sources_only(registry: dict[str, Any]) -> None:
    """The model's code/ folder (for MLflow-native loading) is pix2pix's .py files, not what else lies in
    the package folder (ruff.toml, a linter's cache, __pycache__)."""
    artifacts = MlflowClient(registry["tracking_uri"]).get_model_version_download_uri(NAME, registry["v1"])
    logged = sorted(p.name for p in (Path(artifacts.removeprefix("file://")) / "code" / "pix2pix").iterdir())
    assert logged == sorted(p.name for p in Path(pix2pix.__file__).parent.glob("*.py"))
    assert "networks.py" in logged


def test_a_registry_model_cannot_run_code_in_evaluate(registry: dict[str, Any], tmp_path: Path) -> None:
    """MLflow puts a model's code/ folder first on sys.path when loading it: a line planted there would run
    inside `p2p evaluate`. p2p reads only MLmodel and the weights file, so the planted code never runs."""
    uri = registry["tracking_uri"]
    artifacts = MlflowClient(uri).get_model_version_download_uri(NAME, registry["v2"])
    planted = Path(artifacts.removeprefix("file://")) / "code" / "pix2pix" / "__init__.py"
    assert planted.is_file()
    marker = tmp_path / "planted-code-ran"
    original = planted.read_text()
    planted.write_text(original + f"\nopen({str(marker)!r}, 'w').write('ran')\n")
    command = [str(Path(sys.executable).parent / "p2p"), "evaluate", f"models:/{NAME}/{registry['v2']}"]
    command += ["--manifest", registry["manifest"], "--split", "val", "--tracking-uri", uri]
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        planted.write_text(original)
    assert result.returncode == 0, result.stderr
    assert '"samples": 6.0' in result.stdout
    assert not marker.exists(), "code from the registry ran during evaluate"


def test_concurrent_promotions_end_with_the_best_candidate(registry: dict[str, Any]) -> None:
    """Two real `p2p promote` processes on one sqlite registry, the worse candidate and the better one, both
    starting from champion v1: they take turns under the registry lock, so v2 (trained) ends as champion
    whichever finishes first (before the lock, both saw v1 and the last writer won)."""
    uri, manifest = registry["tracking_uri"], registry["manifest"]
    client = MlflowClient(uri)
    client.set_registered_model_alias(NAME, "champion", registry["v1"])
    p2p = str(Path(sys.executable).parent / "p2p")
    common = ["--split", "val", "--manifest", manifest, "--tracking-uri", uri]
    processes = [
        subprocess.Popen(
            [p2p, "promote", NAME, "--candidate", version, *common],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for version in (registry["v3"], registry["v2"])
    ]
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, out + err
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == registry["v2"]
    assert not client.search_registered_models(f"name='{LOCK_PREFIX}{NAME}'")  # the lock is released


def test_a_rebuild_while_a_promotion_waits_for_the_lock_promotes_nothing(
    registry: dict[str, Any], camvid_dir: Path, tmp_path: Path
) -> None:
    """The candidate is scored, then the promotion waits for the registry lock while the dataset is rebuilt
    in place: the champion would be scored on other data than the candidate, so nothing is promoted."""
    uri = registry["tracking_uri"]
    source = camvid_source(camvid_dir, tmp_path / "src", 16, 6)
    manifest = build(camvid_dir, source, str(tmp_path / "dataset"))
    client = MlflowClient(uri)
    previous = str(client.get_model_version_by_alias(NAME, "champion").version)
    client.set_registered_model_alias(NAME, "champion", registry["v3"])
    before = client.get_model_version(NAME, registry["v2"]).tags
    outcome: dict[str, Any] = {}

    def promotion() -> None:
        try:
            outcome["decision"] = promote(
                PromoteConfig(NAME, registry["v2"], manifest, "val", tracking_uri=uri, lock_wait_s=300)
            )
        except Exception as exc:
            outcome["error"] = exc

    with promotion_lock(client, NAME, wait_s=0):  # another promotion of the model, still deciding
        promoting = threading.Thread(target=promotion)
        promoting.start()
        deadline = time.time() + 300
        while time.time() < deadline and promoting.is_alive():  # until the candidate has been scored
            scored = client.get_model_version(NAME, registry["v2"]).tags.get("eval.val.run_id")
            if scored and scored != before.get("eval.val.run_id"):
                break
            time.sleep(0.2)
        assert promoting.is_alive(), outcome
        build(camvid_dir, source, str(tmp_path / "dataset"), samples_per_shard=4)  # a new build, same folder
    promoting.join(timeout=300)
    assert "decision" not in outcome
    assert "changed during this promotion" in str(outcome["error"])
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == registry["v3"]
    after = client.get_model_version(NAME, registry["v2"]).tags
    assert after.get("promotion.decision") == before.get("promotion.decision")  # no decision recorded
    client.set_registered_model_alias(NAME, "champion", previous)  # as the later tests expect it


@pytest.fixture(scope="module")
def native_dataset(camvid_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Three real CamVid val frames (and one train frame) stored at their own 480×360."""
    root = tmp_path_factory.mktemp("native")
    source = camvid_source(camvid_dir, root / "src", 1, 3)
    return build(camvid_dir, source, str(root / "dataset"), resize={"mode": "native"})


def read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path))
    assert image is not None, path
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def detail(image: np.ndarray) -> float:
    """Mean step between horizontal neighbours: what an upscaled small picture lacks."""
    return float(np.abs(np.diff(image.astype(np.int16), axis=1)).mean())


def test_translate_and_evaluate_at_native_resolution(
    registry: dict[str, Any], native_dataset: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`p2p translate --resolution native` gives CamVid's 480×360 frames back at 480×360, translated at that
    size (the model trained on 64 px crops runs padded to 512×384 and cropped back), whole or in tiles;
    `p2p evaluate --resolution native` scores those outputs against the stored 480×360 targets."""
    uri = registry["tracking_uri"]
    model_uri = f"models:/{NAME}/{registry['v2']}"
    model = load_model(model_uri, uri)
    assert model.size_factor == 64  # unet with 6 downsamplings
    inputs = stored_inputs(native_dataset, "val")  # colour-coded label maps, as the dataset stores them
    assert len(inputs) == 3
    common = ["--tracking-uri", uri, "--resolution", "native"]

    out = tmp_path / "native"
    assert main(["translate", model_uri, native_dataset, str(out), "--split", "val", *common]) == 0
    report = json.loads((out / "translate_report.json").read_text())
    assert report["translated"] == 3 and report["resolution"] == "native" and report["tile_size"] == 0
    outputs = {}
    for key, data in inputs.items():
        outputs[key] = read_rgb(out / f"{key}.png")
        assert outputs[key].shape == (360, 480, 3)
        # Exactly the model at the frame's own size, not a resize of its 64 px output.
        image = model.preprocessing.input_tensor(decode_image(data, key), "native")
        assert image.shape == (3, 360, 480)
        expected = to_image(model.translate(image[None])[0])
        assert np.abs(outputs[key].astype(np.int16) - expected).max() <= 1, key
        small = to_image(model.generator(model.preprocessing.input_tensor(decode_image(data, key))[None])[0])
        upscaled = cv2.resize(small, (480, 360), interpolation=cv2.INTER_CUBIC)  # `--output-size source`
        assert detail(outputs[key]) > 3 * detail(upscaled), key  # measured: 4.1 vs 0.47

    # The same frames as a folder of files, in overlapping 256 px tiles (4× the model's factor): the same
    # size and, in eval mode with batch norm, the same pixels up to a rounding step here and there.
    folder = tmp_path / "frames"
    folder.mkdir()
    for key, data in inputs.items():
        (folder / f"{key}.png").write_bytes(data)
    tiled_out = tmp_path / "tiled"
    tiles = ["--tile-size", "256", "--tile-overlap", "128", "--batch-size", "4"]
    assert main(["translate", model_uri, str(folder), str(tiled_out), *common, *tiles]) == 0
    for key in inputs:
        tiled = read_rgb(tiled_out / f"{key}.png")
        assert tiled.shape == (360, 480, 3)
        difference = np.abs(tiled.astype(np.int16) - outputs[key])
        assert difference.mean() < 0.1 and difference.max() <= 2, key  # measured: 0.011 and 1

    # A tile the generator cannot take is a one-line user error before anything runs.
    capsys.readouterr()
    too_small = ["--tile-size", "32", "--tile-overlap", "16"]
    assert main(["translate", model_uri, str(folder), str(tmp_path / "bad"), *common, *too_small]) == 2
    err = capsys.readouterr().err
    assert "tile_size 32 is smaller than the 64 px" in err and len(err.strip().splitlines()) == 1

    # Evaluation at the stored 480×360: the outputs above against the stored targets.
    assert main(["evaluate", model_uri, "--manifest", native_dataset, "--split", "val", *common]) == 0
    printed = capsys.readouterr().out  # progress lines, then the JSON result
    result = json.loads(printed[printed.index("{\n") :])
    metrics = result["metrics"]
    assert result["resolution"] == "native" and metrics["samples"] == 3
    assert 0 < metrics["l1"] < 1 and metrics["psnr"] > 0 and -1 < metrics["ssim"] <= 1
    targets = {}
    for shard in shard_uris(native_dataset, read_manifest(native_dataset), "val"):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if ".target." in member.name:
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    targets[member.name.split(".")[0]] = decode_image(data, member.name)
    by_hand = np.mean([np.abs(outputs[k] / 255.0 - targets[k] / 255.0).mean() for k in outputs])
    assert metrics["l1"] == pytest.approx(by_hand, abs=1e-3)  # the outputs are PNGs: rounded to 1/255
    client = MlflowClient(uri)
    run = client.get_run(result["run_id"])
    assert run.data.tags["p2p.resolution"] == "native" and run.info.run_name == "eval-val-native"
    version_tags = client.get_model_version(NAME, registry["v2"]).tags
    assert version_tags["eval.val.native.run_id"] == result["run_id"]
    sheet = read_rgb(
        Path(mlflow.artifacts.download_artifacts(artifact_uri=result["sheet"], tracking_uri=uri))
    )
    assert sheet.shape[1] == 3 * 480  # input | output | target at the stored size
    # Scores at the model's resolution are another measurement of the same data.
    at_model = evaluate(model_uri, native_dataset, uri)
    assert at_model["resolution"] == "model" and at_model["metrics"]["l1"] != pytest.approx(metrics["l1"])


def test_promotion_scores_both_models_alike_at_native_resolution_and_per_image_norm(
    registry: dict[str, Any], native_dataset: str
) -> None:
    uri = registry["tracking_uri"]
    client = MlflowClient(uri)
    cfg = PromoteConfig(
        NAME,
        registry["v3"],
        native_dataset,
        "val",
        tracking_uri=uri,
        dry_run=True,
        resolution="native",
        norm_stats="per_image",
    )
    decision = promote(cfg)
    assert decision["resolution"] == "native" and decision["norm_stats"] == "per_image"
    evaluations = [decision["candidate_eval_run_id"], decision.get("champion_eval_run_id")]
    for run_id in filter(None, evaluations):  # the champion's too, when there is one to compare with
        run = client.get_run(run_id)
        assert run.data.tags["p2p.resolution"] == "native" and run.data.tags["p2p.norm_stats"] == "per_image"
        assert run.info.run_name == "eval-val-native-per_image_norm" and run.data.metrics["eval_samples"] == 3
    # Per-image statistics are another measurement than eval mode's running averages of the same model.
    running = promote(dataclasses.replace(cfg, norm_stats="running"))
    assert running["candidate_score"] != pytest.approx(decision["candidate_score"])
    assert client.get_run(running["candidate_eval_run_id"]).data.tags["p2p.norm_stats"] == "running"
    with pytest.raises(ConfigError, match="norm_stats must be running or per_image"):
        promote(dataclasses.replace(cfg, norm_stats="batch"))  # type: ignore[arg-type]
