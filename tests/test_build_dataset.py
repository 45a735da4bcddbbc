"""`p2p dataset build` on a real local Ray cluster: real CamVid through every builder, to a folder and to a
real S3 server; broken inputs quarantined with reasons; idempotent re-runs; a killed build re-run."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import webdataset as wds
from process_helpers import sigint_gets_through, sigint_has_a_handler
from ray._private import state as ray_state

from pipelines import storage
from pipelines.config import from_dict
from pipelines.dataset import build as build_module
from pipelines.dataset import source_record
from pipelines.dataset.build import DatasetBuildConfig, ShardConfig, plan_shards, run_build, task_groups
from pipelines.listing import reason_counts
from pipelines.manifest import read_manifest, shard_uris, tar_sample_keys, verify_shards

pytestmark = pytest.mark.usefixtures("ray_session")


def camvid_palette_lut(camvid: Path) -> np.ndarray:
    lut = np.zeros((256, 3), np.uint8)
    for c in json.loads((camvid / "classes.json").read_text())["classes"]:
        lut[c["id"]] = c["color"]
    return lut


def config(**sections: dict) -> DatasetBuildConfig:
    return from_dict(DatasetBuildConfig, sections)


def read_local_shards(output: Path, split: str) -> list[dict]:
    """Samples of one split through stock webdataset, in shard order."""
    manifest = read_manifest(str(output))
    urls = shard_uris(str(output), manifest, split)
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, empty_check=False)
    return list(dataset)


def copy_camvid_subset(camvid: Path, dest: Path, n: int, with_labels: bool = False) -> list[str]:
    keys = sorted(p.stem for p in (camvid / "train" / "images").glob("*.jpg"))[:: 367 // n][:n]
    (dest / "images").mkdir(parents=True)
    if with_labels:
        (dest / "labels").mkdir()
    for key in keys:
        shutil.copy(camvid / "train" / "images" / f"{key}.jpg", dest / "images")
        if with_labels:
            shutil.copy(camvid / "train" / "labels" / f"{key}.png", dest / "labels")
    return keys


def frames(n: int, per_sequence: int = 30) -> list[dict]:
    return [{"key": f"seq{i // per_sequence:02d}_{i:05d}", "split": "train", "bytes": 1} for i in range(n)]


def keys_of(shards: list[dict]) -> list[list[str]]:
    return [[sample["key"] for sample in shard["samples"]] for shard in shards]


def test_shard_plan_mixes_sequences_reproducibly_and_sizes_small_datasets() -> None:
    shuffled = keys_of(plan_shards(frames(233), ShardConfig()))
    # Auto size: 233 samples give 15 shards of at most 16 (every CPU of a small cluster gets a task).
    assert [len(shard) for shard in shuffled] == [16] * 14 + [9]
    assert all(len({key[:5] for key in shard}) >= 4 for shard in shuffled)  # several scenes per shard
    assert keys_of(plan_shards(frames(233), ShardConfig())) == shuffled  # same seed, same bytes
    assert keys_of(plan_shards(frames(233), ShardConfig(shuffle_seed=1))) != shuffled
    # A hash order, not a permutation of the list: one more file leaves the others in their order.
    grown = [key for shard in keys_of(plan_shards(frames(234), ShardConfig())) for key in shard]
    assert [key for key in grown if key != "seq07_00233"] == [key for shard in shuffled for key in shard]
    # Off: sorted by key, so the first shard holds a single scene.
    assert {key[:5] for key in keys_of(plan_shards(frames(233), ShardConfig(shuffle=False)))[0]} == {"seq00"}
    # Larger datasets: 32 shards until shards reach 1,000 samples; an explicit size wins.
    assert len(plan_shards(frames(5000), ShardConfig())) == 32
    assert {len(s["samples"]) for s in plan_shards(frames(100_000, 1000), ShardConfig())} == {1000}
    assert len(plan_shards(frames(233), ShardConfig(samples_per_shard=100))) == 3


def test_small_shards_share_ray_tasks_of_similar_work() -> None:
    # 5,000 samples: 32 train shards of 141 and 33 val/test shards of 16 (the auto size), dealt into 8 tasks.
    shards = [{"name": f"s{i}", "samples": [0] * n} for i, n in enumerate([141] * 32 + [16] * 33)]
    groups = task_groups(shards, 8)
    assert len(groups) == 8
    assert sorted(s["name"] for g in groups for s in g) == sorted(s["name"] for s in shards)  # each once
    loads = [sum(len(s["samples"]) for s in g) for g in groups]
    assert max(loads) - min(loads) <= 141  # within one shard of each other
    assert len(task_groups(shards[:3], 8)) == 3  # never an empty task
    assert task_groups([], 8) == []


def test_one_operator_datasets_run_without_ray_datas_reservation_and_the_context_is_restored() -> None:
    import ray.data

    context = ray.data.DataContext.get_current()
    assert context.op_resource_reservation_enabled  # Ray's default, which other datasets keep
    with build_module.one_operator_context():
        dataset = ray.data.from_items([{"x": 1}]).map_batches(lambda batch: batch)
    # Ray Data copies the context into the Dataset: the build's dataset keeps the setting after the block.
    assert dataset.context.op_resource_reservation_enabled is False
    assert context.op_resource_reservation_enabled
    assert dataset.take_all() == [{"x": 1}]


def test_a_source_without_one_usable_pair_is_refused_before_anything_is_written(
    camvid_dir: Path, tmp_path: Path
) -> None:
    copy_camvid_subset(camvid_dir, tmp_path / "src", 3, with_labels=True)
    (tmp_path / "src" / "images" / "notes.txt").write_text("not a photo")
    cfg = config(  # a typo in a folder name: no image has its label map
        source={"uri": str(tmp_path / "src"), "layout": "paired", "a_dir": "labelz", "b_dir": "images"},
        output=str(tmp_path / "out"),
    )
    refused = r"no sample to build: all 4 file\(s\) in labelz, images were refused \(3 × no matching file in"
    with pytest.raises(ValueError, match=refused):
        run_build(cfg)
    assert not (tmp_path / "out").exists()  # nothing written: no empty folder left to puzzle over


def test_camvid_labels_to_local_folder_pixel_exact(camvid_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "camvid-labels"
    cfg = config(
        source={"uri": str(camvid_dir), "layout": "paired", "a_dir": "labels", "b_dir": "images"},
        output=str(out),
        derive={"builder": "labels", "palette": str(camvid_dir / "classes.json")},
        resize={"mode": "resize", "size": 128},
        shards={"samples_per_shard": 64},
    )
    manifest = run_build(cfg)

    totals = manifest.totals
    # classes.json and README.md sit beside the split folders: seen and counted, but not inputs to quarantine
    assert totals.files_seen == 2 * 468 + 2 and totals.files_ignored == 2
    assert totals.samples_written == 468 and totals.quarantined == 0
    assert manifest.scanned_folders == ("train/labels", "train/images", "val/labels", "val/images")
    assert {s: manifest.splits[s].samples for s in manifest.splits} == {"train": 367, "val": 101}
    assert [Path(s.path).name for s in manifest.splits["val"].shards] == [
        "val-000000.tar",
        "val-000001.tar",
    ]
    assert verify_shards(str(out), manifest) == []

    # Stock webdataset reads it; the label input is pixel-exact against an independent computation.
    samples = read_local_shards(out, "val")
    assert len(samples) == 101
    lut = camvid_palette_lut(camvid_dir)
    for sample in samples[:5]:
        key = sample["__key__"]
        meta = json.loads(sample["json"])
        assert meta["key"] == key and meta["split"] == "val"
        ids = cv2.imread(str(camvid_dir / "val" / "labels" / f"{key}.png"), cv2.IMREAD_UNCHANGED)
        expected = lut[cv2.resize(ids, (128, 128), interpolation=cv2.INTER_NEAREST_EXACT)]  # pixel centres
        stored = cv2.cvtColor(
            cv2.imdecode(np.frombuffer(sample["input.png"], np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB
        )
        assert np.array_equal(stored, expected)
        photo = cv2.imdecode(np.frombuffer(sample["target.jpg"], np.uint8), cv2.IMREAD_COLOR)
        assert photo.shape == (128, 128, 3)

    # CamVid's frames are stored in a seeded random order, not frame after frame of one scene.
    keys = [sample["__key__"] for sample in samples]
    assert sorted(keys) != keys and sorted(keys) == sorted(
        path.stem for path in (camvid_dir / "val" / "images").iterdir()
    )

    # Ray Data reads the same shards.
    import ray

    ray_ds = ray.data.read_webdataset(shard_uris(str(out), manifest, "train"))
    assert ray_ds.count() == 367


def test_canny_from_s3_to_s3(camvid_dir: Path, tmp_path: Path, s3_server) -> None:
    keys = copy_camvid_subset(camvid_dir, tmp_path / "raw", 8)
    client = s3_server.client()
    for key in keys:
        client.upload_file(
            str(tmp_path / "raw" / "images" / f"{key}.jpg"), "p2p-test", f"raw/canny/{key}.jpg"
        )
    # 40 CJK characters: 120 bytes of UTF-8, beyond USTAR's 100-byte name field (it aborted builds).
    long_key = "長い名前のファイル" * 4 + "写真です"
    assert len(long_key) == 40 and len(long_key.encode()) == 120
    client.upload_file(
        str(tmp_path / "raw" / "images" / f"{keys[0]}.jpg"), "p2p-test", f"raw/canny/{long_key}.jpg"
    )
    cfg = config(
        source={"uri": "s3://p2p-test/raw/canny", "layout": "photos"},
        output="s3://p2p-test/datasets/canny",
        derive={"builder": "canny"},
        resize={"mode": "crop", "size": 128},
        split={"train": 0.5, "val": 0.5, "test": 0.0},
        shards={"samples_per_shard": 3},
    )
    manifest = run_build(cfg)
    assert manifest.totals.samples_written == 9 and manifest.totals.quarantined == 0
    assert sum(s.samples for s in manifest.splits.values()) == 9
    assert verify_shards("s3://p2p-test/datasets/canny", manifest) == []
    assert manifest.sample_format.input_channels == 1 and manifest.channels("AtoB") == (1, 3)

    import pyarrow.fs as pafs
    import ray

    uris = [
        u for split in manifest.splits for u in shard_uris("s3://p2p-test/datasets/canny", manifest, split)
    ]
    fs, _ = storage.resolve(uris[0])
    assert isinstance(fs, pafs.S3FileSystem)
    rows = ray.data.read_webdataset(
        [u.removeprefix("s3://") for u in uris], filesystem=fs, decoder=None
    ).take_all()
    assert len(rows) == 9
    assert long_key in {row["__key__"] for row in rows}
    # Stock webdataset reads the pax long name too (from local copies of the same shards).
    local = []
    for i, uri in enumerate(uris):
        local.append(tmp_path / f"copy-{i}.tar")
        local[-1].write_bytes(storage.read_bytes(uri))
    stock = list(wds.WebDataset([str(p) for p in local], shardshuffle=False, nodesplitter=None))
    assert len(stock) == 9 and long_key in {s["__key__"] for s in stock}
    for row in rows:
        edges = cv2.imdecode(np.frombuffer(row["input.png"], np.uint8), cv2.IMREAD_UNCHANGED)
        assert edges.shape == (128, 128) and set(np.unique(edges)) <= {0, 255}
        assert 0.5 < (edges == 255).mean() < 0.99  # black edges on a white background
        meta = row["json"] if isinstance(row["json"], dict) else json.loads(row["json"])
        assert meta["canny"]["low"] < meta["canny"]["high"]  # automatic thresholds recorded
        assert row["input.png"][24] == 1  # binary edges stored as a 1-bit PNG
        assert meta["source_size"] == [360, 480]  # the photo's own size (decoded at a reduced JPEG scale)


@pytest.mark.slow
def test_hed_edges_from_real_photos(
    camvid_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    copy_camvid_subset(camvid_dir, tmp_path / "raw", 4)
    (tmp_path / "raw" / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole JPEG")
    out = tmp_path / "hed"

    def hed_config(output: Path, pipeline: str, actors: int = 0) -> DatasetBuildConfig:
        return config(
            source={"uri": str(tmp_path / "raw"), "layout": "photos"},
            output=str(output),
            derive={"builder": "hed", "hed_batch_size": 2, "hed_pipeline": pipeline, "hed_actors": actors},
            resize={"mode": "crop", "size": 128},
            split={"train": 1.0, "val": 0.0, "test": 0.0},
        )

    manifest = run_build(hed_config(out, "fused"))
    assert manifest.totals.samples_written == 4 and manifest.totals.quarantined == 1
    # Split (what GPU clusters get): CPU tasks decode and write, the actor runs the network only. Same
    # shards, byte for byte, and the same quarantine; a re-run reuses the shards through the same stages.
    split = run_build(hed_config(tmp_path / "hed-split", "split"))
    assert [(s.path, s.sha256) for s in split.shards()] == [(s.path, s.sha256) for s in manifest.shards()]
    # The decode was not fused into the HED actor. (Ray's public state API needs the dashboard, which the
    # test cluster leaves out: GCS's actor table, read through ray's private helper.)
    actors = {actor["ActorClassName"] for actor in ray_state.actors().values()}
    assert "MapWorker(MapBatches(HEDStage))" in actors, actors
    assert [q.reason for q in split.quarantine] == [q.reason for q in manifest.quarantine]
    # A build that dies before its manifest (here the driver, once the shards are written) leaves its
    # shards and their sidecars; the re-run reuses them.
    crashed = tmp_path / "hed-crashed"

    def driver_dies(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(build_module, "write_manifest", driver_dies)
        with pytest.raises(KeyboardInterrupt):
            run_build(hed_config(crashed, "split"))
    assert not (crashed / "manifest.json").exists()
    capsys.readouterr()
    again = run_build(hed_config(crashed, "split"))
    assert f"reused {len(split.shards())}, built 0 shard(s)" in capsys.readouterr().out
    assert [s.sha256 for s in again.shards()] == [s.sha256 for s in split.shards()]
    # CPU actors on every slot would starve the split's decode tasks: the build runs fused and says so.
    crowded = run_build(hed_config(tmp_path / "hed-crowded", "split", actors=2))
    assert "building fused instead" in capsys.readouterr().out
    assert [s.sha256 for s in crowded.shards()] == [s.sha256 for s in split.shards()]
    for sample in read_local_shards(out, "train"):
        edges = cv2.imdecode(np.frombuffer(sample["input.png"], np.uint8), cv2.IMREAD_UNCHANGED)
        dark = edges < 128
        assert 0.005 < dark.mean() < 0.3
        # thinned to 1 px: 2x2 all-edge blocks survive only where four branches meet (as in MATLAB's thin)
        blocks = dark[:-1, :-1] & dark[1:, :-1] & dark[:-1, 1:] & dark[1:, 1:]
        assert blocks.sum() <= 0.01 * dark.sum()


def test_split_hed_stages_hand_io_failures_to_the_driver(camvid_dir: Path, tmp_path: Path) -> None:
    """The split pipeline's CPU stages turn a lasting I/O failure into the record that fails the build
    (never a quarantined sample), and pass what they did not build (reused shards, errors) down unchanged.
    Run in this process: the stages are plain functions of a batch."""
    import pickle

    from pipelines.dataset.build import LoadedShard, load_stage, write_stage

    copy_camvid_subset(camvid_dir, tmp_path / "raw", 2)
    photo = sorted((tmp_path / "raw" / "images").iterdir())[0]
    unreadable = tmp_path / "raw" / "images" / "folder.jpg"  # a folder where a photo should be: EISDIR
    unreadable.mkdir()
    cfg = dataclasses.asdict(
        config(
            source={"uri": str(tmp_path / "raw"), "layout": "photos"},
            output=str(tmp_path / "out"),
            derive={"builder": "hed", "hed_pipeline": "split"},
            resize={"size": 64},
        )
    )
    kwargs = {"config": cfg, "build_dir": str(tmp_path / "out" / "shards" / "b")}

    def plan(index: int, path: Path) -> dict:
        sample = {"key": path.stem, "split": "train", "a": "", "b": str(path), "bytes": 1}
        return {"split": "train", "index": index, "samples": [sample]}

    rows = {"plans": [json.dumps([plan(0, photo)]), json.dumps([plan(1, unreadable)])]}
    loaded = [pickle.loads(blob) for blob in load_stage(rows, **kwargs)["shard"]]
    assert isinstance(loaded[0], LoadedShard) and len(loaded[0].samples) == 1
    assert [r["kind"] for r in loaded[1]] == ["io_error"] and "directory" in loaded[1][0]["reason"].lower()

    # Thinned edges as the HED actor leaves them; a file standing where the shard's folder should be makes
    # the write fail on I/O too, and the load's error record passes through.
    shard = loaded[0]
    shard.samples = [(s, np.zeros((64, 64), bool), t, m) for s, _, t, m in shard.samples]
    shard.finish_edges = (5, True)
    (tmp_path / "blocked").write_text("a file, not a folder")
    stuck = dataclasses.replace(shard, tar_uri=str(tmp_path / "blocked" / "train-000000.tar"))
    written = write_stage({"shard": [pickle.dumps(stuck), pickle.dumps(loaded[1])]}, **kwargs)["record"]
    assert [json.loads(r)["kind"] for r in written] == ["io_error", "io_error"]
    ok = [json.loads(r) for r in write_stage({"shard": [pickle.dumps(shard)]}, **kwargs)["record"]]
    assert [r["kind"] for r in ok] == ["shard"] and ok[0]["node"] and ok[0]["samples"] == 1


def test_side_by_side_and_grayscale_layouts(camvid_dir: Path, tmp_path: Path) -> None:
    keys = copy_camvid_subset(camvid_dir, tmp_path / "raw", 3)
    ab = tmp_path / "ab"
    ab.mkdir()
    for key in keys:
        photo = cv2.imread(str(tmp_path / "raw" / "images" / f"{key}.jpg"))
        cv2.imwrite(str(ab / f"{key}.png"), np.concatenate([255 - photo, photo], axis=1))
    manifest = run_build(
        config(
            source={"uri": str(ab), "layout": "side_by_side"},
            output=str(tmp_path / "ab-out"),
            resize={"mode": "native", "multiple": 32},
            split={"train": 1.0, "val": 0.0, "test": 0.0},
        )
    )
    assert manifest.totals.samples_written == 3
    sample = read_local_shards(tmp_path / "ab-out", "train")[0]
    a = cv2.imdecode(np.frombuffer(sample["input.png"], np.uint8), cv2.IMREAD_COLOR).astype(int)
    b = cv2.imdecode(np.frombuffer(sample["target.jpg"], np.uint8), cv2.IMREAD_COLOR).astype(int)
    assert a.shape == b.shape == (352, 480, 3)  # 360 cropped to a multiple of 32; each half 480 wide
    assert np.abs((255 - a) - b).mean() < 6  # the left half is the inverse of the right (JPEG noise)

    manifest = run_build(
        config(
            source={"uri": str(tmp_path / "raw"), "layout": "photos"},
            output=str(tmp_path / "gray"),
            derive={"builder": "grayscale"},
            resize={"size": 64},
            split={"train": 1.0, "val": 0.0, "test": 0.0},
        )
    )
    gray = read_local_shards(tmp_path / "gray", "train")[0]
    assert cv2.imdecode(np.frombuffer(gray["input.png"], np.uint8), cv2.IMREAD_UNCHANGED).shape == (64, 64)


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(".png", array)
    assert ok
    path.write_bytes(data.tobytes())


def broken_source(root: Path, camvid: Path) -> dict[str, str]:
    """A paired labels source with one good pair and one bad item of every kind: item → expected reason."""
    keys = copy_camvid_subset(camvid, root / "good", 2, with_labels=True)
    (root / "A").mkdir()
    (root / "B").mkdir()
    for key in keys:  # two real, good pairs
        shutil.move(root / "good" / "labels" / f"{key}.png", root / "A")
        shutil.move(root / "good" / "images" / f"{key}.jpg", root / "B")
    shutil.rmtree(root / "good")
    photo = (root / "B" / f"{keys[0]}.jpg").read_bytes()
    mask = (root / "A" / f"{keys[0]}.png").read_bytes()
    expected = {}

    def pair(key: str, a: bytes, b: bytes, reason: str, a_ext: str = "png", b_ext: str = "jpg") -> None:
        (root / "A" / f"{key}.{a_ext}").write_bytes(a)
        (root / "B" / f"{key}.{b_ext}").write_bytes(b)
        expected[key] = reason

    pair("zero_target", mask, b"", "zero-byte file (the target, zero_target.jpg)")
    pair("zero_pair", b"", b"", "zero-byte file (the input and the target)")
    pair("truncated_target", mask, photo[: len(photo) // 2], "truncated")
    pair("random_bytes", mask, os.urandom(2048), "not an image")
    pair("text_as_image", mask, b"hello, I am text\n" * 20, "not an image")
    ids = cv2.imread(str(root / "A" / f"{keys[0]}.png"), cv2.IMREAD_UNCHANGED)
    write_png(root / "A" / "size_mismatch.png", ids[:100, :100])
    (root / "B" / "size_mismatch.jpg").write_bytes(photo)
    expected["size_mismatch"] = "size mismatch"
    bad_ids = ids.copy()
    bad_ids[:10, :10] = 40
    write_png(root / "A" / "ids_outside.png", bad_ids)
    (root / "B" / "ids_outside.jpg").write_bytes(photo)
    expected["ids_outside"] = "outside the palette"
    # A PNG whose header claims 40000 x 40000 px: rejected before any pixel is decoded.
    bomb = bytearray(cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tobytes())
    import struct
    import zlib

    bomb[16:24] = struct.pack(">II", 40000, 40000)
    bomb[29:33] = struct.pack(">I", zlib.crc32(bytes(bomb[12:29])) & 0xFFFFFFFF)
    (root / "A" / "bomb.png").write_bytes(mask)
    (root / "B" / "bomb.png").write_bytes(bytes(bomb))
    expected["bomb"] = "decompression bomb"
    (root / "A" / "unmatched_a.png").write_bytes(mask)
    expected["unmatched_a"] = "no matching file in B/"
    (root / "B" / "unmatched_b.jpg").write_bytes(photo)
    expected["unmatched_b"] = "no matching file in A/"
    (root / "B" / "notes.txt").write_text("not an image")
    expected["notes.txt"] = "not an image file"
    (root / "A" / "dup.png").write_bytes(mask)
    (root / "A" / "dup.jpg").write_bytes(photo)
    (root / "B" / "dup.jpg").write_bytes(photo)
    expected["dup.png"] = "duplicate key"
    expected["dup.jpg"] = "lossless"  # the kept A file is a JPEG mask
    bad_name = os.fsencode(root / "B") + b"/bad\xffname.jpg"
    with open(bad_name, "wb") as f:
        f.write(photo)
    expected["bad\udcffname"] = "unreadable file name"  # how Python names the undecodable byte
    # A Windows path extracted on Linux: the shard reader refuses such a member, so the build does.
    pair("win\\dir", mask, photo, "name cannot be stored in a shard: backslashes")
    (root / "README.md").write_text("stray file beside the folders")  # not in A/ or B/: ignored, counted
    return expected


def test_broken_inputs_are_quarantined_with_reasons_and_counts_reconcile(
    camvid_dir: Path, tmp_path: Path
) -> None:
    expected = broken_source(tmp_path / "src", camvid_dir)
    out = tmp_path / "out"
    manifest = run_build(
        config(
            source={"uri": str(tmp_path / "src"), "a_dir": "A", "b_dir": "B"},
            output=str(out),
            derive={"builder": "labels", "palette": str(camvid_dir / "classes.json")},
            resize={"size": 64},
            split={"train": 1.0, "val": 0.0, "test": 0.0},
        )
    )
    totals = manifest.totals
    assert totals.samples_written == 2  # the two real pairs
    assert totals.samples_written + totals.quarantined == totals.items_seen
    files_in_source = sum(len(files) for _, _, files in os.walk(os.fsencode(tmp_path / "src")))
    assert totals.files_seen == files_in_source and totals.files_ignored == 1  # README.md
    # Every file: in a written pair (2 each), listed in the quarantine, or ignored.
    quarantined_files = sum(len(q.paths) for q in manifest.quarantine)
    assert 2 * totals.samples_written + quarantined_files + totals.files_ignored == totals.files_seen
    records = [(" ".join(q.paths), q.reason) for q in manifest.quarantine]
    text = "\n".join(f"{p!a} -> {r}" for p, r in records)
    for item, reason in expected.items():
        assert any(item in p and reason in r for p, r in records), f"{item!a}: {reason}\n{text}"
    assert len(records) == len(expected)
    # A refused pair names the file at fault after its reason (its record lists both files).
    reasons = {Path(q.paths[0]).name: q.reason for q in manifest.quarantine}
    assert reasons["truncated_target.png"].endswith("(the target, truncated_target.jpg)")
    assert reasons["ids_outside.png"].endswith("(the input, ids_outside.png)")
    assert reasons["dup.jpg"].endswith("(the input, dup.jpg)")  # a JPEG mask


def build_command(source: Path, out: Path, palette: Path) -> list[str]:
    return [
        str(Path(sys.executable).parent / "p2p"),
        "dataset",
        "build",
        "--source",
        str(source),
        "--layout",
        "paired",
        "--a-dir",
        "labels",
        "--b-dir",
        "images",
        "--builder",
        "labels",
        "--palette",
        str(palette),
        "--output",
        str(out),
        "--size",
        "64",
        "--samples-per-shard",
        "8",
        "--set",
        "split.train=1.0",
        "--set",
        "split.val=0.0",
        "--set",
        "split.test=0.0",
    ]


def test_killed_build_rerun_leaves_a_complete_unique_dataset(camvid_dir: Path, tmp_path: Path) -> None:
    """`kill -9` of the driver alone, as the OOM killer does, while it runs its own local Ray cluster: what
    that cluster started ends with it (`pipelines.reaper`), so nothing writes after the kill. The re-run
    takes over the dead build's lock and reuses exactly its completed shards."""
    import psutil
    import ray

    copy_camvid_subset(camvid_dir, tmp_path / "src", 48, with_labels=True)
    out = tmp_path / "out"
    # "local": a cluster of its own even where a `ray start` on this machine left an address to join.
    own_cluster = {**os.environ, "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1"}
    command = build_command(tmp_path / "src", out, camvid_dir / "classes.json")
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen(
            command, env=own_cluster, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def name(process: psutil.Process) -> str:
        try:
            return str(process.name())
        except psutil.Error:  # ended meanwhile
            return ""

    def group_of(process: psutil.Process) -> int | None:
        try:
            return os.getpgid(process.pid)
        except ProcessLookupError:  # ended meanwhile
            return None

    def running(process: psutil.Process) -> bool:
        try:  # an orphaned zombie waits for an init that may never collect it: it has ended all the same
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    try:
        deadline = time.time() + 180  # its own cluster starts first
        while time.time() < deadline and not list(out.glob("shards/*/*.json")):
            time.sleep(0.05)
        assert list(out.glob("shards/*/*.json")), (tmp_path / "killed.log").read_text()
        started = psutil.Process(proc.pid).children(recursive=True)
        assert any(name(p) == "raylet" for p in started), "not its own cluster"
        # A terminal's Ctrl-C would reach the job's process group: none of its cluster's processes there
        # may take it (the dashboard's died of it, and Ray Train's abort then waited on them).
        in_its_group = [p for p in started if running(p) and group_of(p) == proc.pid]
        assert in_its_group, "its cluster's processes left the job's process group"
        takes_ctrl_c = [f"{p.pid} {name(p)}" for p in in_its_group if sigint_gets_through(p.pid)]
        assert not takes_ctrl_c, f"Ctrl-C would reach these processes of its cluster: {takes_ctrl_c}"
        # Its workers keep Python's handler: a non-forced ray.cancel (Ray Data's early stop) interrupts
        # their tasks through it.
        workers = [
            p for p in started if running(p) and name(p).startswith("ray::") and "Agent" not in name(p)
        ]
        assert workers and all(sigint_has_a_handler(p.pid) for p in workers if running(p))
        proc.kill()  # mid-build: some shards written, no manifest yet
        proc.wait()
        deadline = time.time() + 30
        while time.time() < deadline and any(running(p) for p in started):
            time.sleep(0.2)
        left = [f"{p.pid} {name(p)}" for p in started if running(p)]
        assert not left, f"still running after the build was killed: {left}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the test's failure left
    assert not (out / "manifest.json").exists()

    def completed() -> dict[str, int]:
        """Shards whose sidecar says complete → the inode of their tar (a rebuilt tar gets a new one)."""
        return {p.name: p.with_suffix(".tar").stat().st_ino for p in out.glob("shards/*/*.json")}

    before = completed()
    time.sleep(1.0)
    assert completed() == before, "shards were written after the build and its cluster ended"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    # The killed build's lock is left behind; its pid is gone on this host, so the re-run takes it over.
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        "taking over the stale lock of" in result.stdout and f"pid {proc.pid} no longer runs" in result.stdout
    )
    # Resumed, not restarted: exactly the completed shards are reused (same files, untouched), the rest built.
    assert f"reused {len(before)}, built {6 - len(before)} shard(s)" in result.stdout, result.stdout
    manifest = read_manifest(str(out))
    for name, inode in before.items():
        assert (out / "shards" / manifest.build_id / name).with_suffix(".tar").stat().st_ino == inode
    assert manifest.totals.samples_written == 48
    assert verify_shards(str(out), manifest) == []
    listed = {s.path for s in manifest.splits["train"].shards}
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"}
    sources = f"shards/{manifest.build_id}/sources.json.gz"
    assert on_disk == listed | {sources}  # no orphan, partial or temp files
    # What the build read, the reused shards' files included: the content a later build compares against.
    read = json.loads(gzip.decompress((out / sources).read_bytes()))["files"]
    assert len(read) == 96 and all(len(sha256) == 64 for _, _, sha256, _ in read.values())
    keys = [k for path in sorted(listed) for k in tar_sample_keys((out / path).read_bytes())]
    assert len(keys) == len(set(keys)) == 48

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "up to date" in again.stdout
    assert read_manifest(str(out)).build_id == manifest.build_id

    inspect = subprocess.run(
        [command[0], "dataset", "inspect", str(out), "--verify"], capture_output=True, text=True
    )
    assert inspect.returncode == 0 and "OK" in inspect.stdout and "48 samples" in inspect.stdout
    # Corrupt a shard: verification says so and fails.
    first = out / sorted(listed)[0]
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a sample
    first.write_bytes(bytes(data))
    inspect = subprocess.run(
        [command[0], "dataset", "inspect", str(out), "--verify"], capture_output=True, text=True
    )
    assert inspect.returncode == 1 and "sha256" in inspect.stdout


def test_split_folders_below_the_side_folders_keep_their_split(tmp_path: Path) -> None:
    """The authors' layout (A/{train,val,test}, B/{...}, as their combine_A_and_B reads it): each image
    keeps its folder's split; hashing the keys put test images into train."""
    for side in ("A", "B"):
        for split in ("train", "val", "test"):
            (tmp_path / "src" / side / split).mkdir(parents=True)
            for i in range(4):
                (tmp_path / "src" / side / split / f"{i}.png").write_bytes(b"x")
    cfg = config(
        source={"uri": str(tmp_path / "src"), "a_dir": "A", "b_dir": "B"}, output=str(tmp_path / "o")
    )
    plan = build_module.plan_build(cfg)
    assert len(plan.samples) == 12
    assert {(s["key"].split("/")[0], s["split"]) for s in plan.samples} == {
        (n, n) for n in ("train", "val", "test")
    }


def test_pairs_match_by_their_own_names_not_by_their_shard_keys(tmp_path: Path) -> None:
    """Shard keys have no dots (WebDataset splits names there): img.v2 and img_v2 are different images."""
    for side, names in (("A", ["img.v2", "x.v2", "x_v2"]), ("B", ["img_v2", "x.v2", "x_v2"])):
        (tmp_path / side).mkdir()
        for name in names:
            (tmp_path / side / f"{name}.png").write_bytes(b"x")
    plan = build_module.plan_build(config(source={"uri": str(tmp_path)}, output=str(tmp_path / "o")))
    assert [s["key"] for s in plan.samples] == ["x_v2"]  # x.v2 and x_v2 would share one shard key
    reasons = sorted(q["reason"] for q in plan.quarantine)
    assert reasons == [
        "duplicate key 'x_v2': also the pair 'x.v2' (dots become _)",
        "no matching file in A/",
        "no matching file in B/",
    ]


def test_names_pair_across_unicode_forms_and_a_case_mismatch_is_named(tmp_path: Path) -> None:
    """macOS writes "café" decomposed (NFD), Linux tools composed (NFC): one name to a user, one pair, keyed
    as the input is named (a key places its sample in a split: an NFD pair keeps its NFD key). A name
    differing only in case is still two names (Linux); the reason names the unmatched file it may mean."""
    nfc, nfd, nfd_both = "caf\u00e9", "cafe\u0301", "nin\u0303o"
    for side, names in (
        ("A", [nfc, nfd_both, "Street", "twin", "Twin"]),
        ("B", [nfd, nfd_both, "street", "twin", "tw\u0131n"]),
    ):
        (tmp_path / side).mkdir()
        for name in names:
            (tmp_path / side / f"{name}.png").write_bytes(b"x")
    (tmp_path / "B" / f"{nfc}.jpg").write_bytes(b"x")  # beside its NFD twin: a duplicate
    plan = build_module.plan_build(config(source={"uri": str(tmp_path)}, output=str(tmp_path / "o")))
    assert sorted(s["key"] for s in plan.samples) == sorted([nfc, nfd_both, "twin"])
    (paired,) = [s for s in plan.samples if s["key"] == nfc]
    assert paired["a"].endswith(f"A/{nfc}.png") and paired["b"].endswith(f"B/{nfd}.png")
    reasons = sorted(q["reason"] for q in plan.quarantine)
    assert reasons == [
        f"duplicate key '{nfc}': also {nfd}.png (the same name in another Unicode form)",
        "no matching file in A/",  # twın (dotless ı): no casefold twin in A/
        "no matching file in A/: it has Street.png, a name that differs only in case",
        "no matching file in B/",  # Twin: B's twin is paired with A's twin, not a candidate
        "no matching file in B/: it has street.png, a name that differs only in case",
    ]
    assert reason_counts(reasons)[0] == ("no matching file in A/", 2)  # one kind, whatever the hint


def test_a_sample_the_shard_reader_would_refuse_is_quarantined_not_written(
    camvid_dir: Path, tmp_path: Path
) -> None:
    """A member over the reader's size limit stops every training run that reads it: the build quarantines
    its sample instead (here with a lowered limit: a real photo at native size against a small crop)."""
    from pipelines.shards import read_members

    photo = next((camvid_dir / "train" / "images").glob("*.jpg"))
    (tmp_path / "src").mkdir()
    shutil.copy(photo, tmp_path / "src" / "full.jpg")
    crop = cv2.imread(str(photo))[:64, :64]
    cv2.imwrite(str(tmp_path / "src" / "crop.png"), crop)
    cfg = config(
        source={"uri": str(tmp_path / "src"), "layout": "photos", "photos_dir": ""},
        output=str(tmp_path / "out"),
        derive={"builder": "grayscale"},
        resize={"mode": "native"},
        shards={"target_format": "png"},
    )
    (shard_plan,) = plan_shards(build_module.plan_build(cfg).samples, cfg.shards)
    builder = build_module.ShardBuilder(dataclasses.asdict(cfg), str(tmp_path / "out" / "shards" / "x"))
    builder.max_member_bytes = 100_000  # a 64 px PNG fits, a 960x720 one does not
    records = builder.build_shard(shard_plan)
    (refused,) = [r for r in records if r["kind"] == "quarantine"]
    assert refused["paths"] == [str(tmp_path / "src" / "full.jpg")]
    assert refused["reason"].startswith("too large to store: target.png encodes to "), refused["reason"]
    assert "over the shard reader's 100,000-byte member limit" in refused["reason"]
    (written,) = [r for r in records if r["kind"] == "shard"]
    assert written["samples"] == written["files"] == 1
    with open(tmp_path / "out" / "shards" / "x" / written["name"], "rb") as tar:
        names = [m.name for m in read_members(tar, builder.max_member_bytes) if not m.problem]
    assert names == ["crop.input.png", "crop.target.png", "crop.json"]


def test_a_source_file_rewritten_in_place_is_a_new_build(tmp_path: Path) -> None:
    """Same path, same byte size, other pixels: not "up to date", and its shard is not reused."""
    (tmp_path / "src").mkdir()
    image = tmp_path / "src" / "p.png"
    image.write_bytes(b"a" * 100)
    cfg = config(
        source={"uri": str(tmp_path / "src"), "layout": "photos", "photos_dir": ""},
        output=str(tmp_path / "o"),
        derive={"builder": "grayscale"},
    )

    def planned() -> tuple[str, str]:
        shards = plan_shards(build_module.plan_build(cfg).samples, cfg.shards)
        return build_module.build_id_of(cfg, shards), build_module.plan_digest(shards[0])

    before = planned()
    assert planned() == before  # listing again changes nothing
    image.write_bytes(b"b" * 100)
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a later edit, to the second
    after = planned()
    assert after[0] != before[0] and after[1] != before[1]


def test_an_edited_palette_file_is_a_new_build_and_its_void_class_is_recorded(tmp_path: Path) -> None:
    palette = tmp_path / "palette.csv"
    palette.write_text("id,name,r,g,b\n0,void,0,0,0\n1,road,128,64,128\n")
    cfg = config(
        source={"uri": str(tmp_path), "a_dir": "A", "b_dir": "B"},
        output=str(tmp_path / "o"),
        derive={"builder": "labels", "palette": str(palette), "ignore_id": 0},
    )
    before = build_module.build_id_of(cfg, [])
    palette.write_text("id,name,r,g,b\n0,void,0,0,0\n1,road,200,0,0\n")  # same path, other colours
    assert build_module.build_id_of(cfg, []) != before
    # CSV palettes have no void class: --ignore-id gives it, and the manifest's palette must carry it.
    assert build_module.build_palette(cfg.derive).to_dict()["ignore_id"] == 0
    # Padding label maps with class 0 needs a void class or a class 0.
    palette.write_text("id,name,r,g,b\n1,road,128,64,128\n2,sky,0,0,255\n")
    padded = config(
        source={"uri": str(tmp_path), "a_dir": "A", "b_dir": "B"},
        output=str(tmp_path / "o"),
        derive={"builder": "labels", "palette": str(palette)},
        resize={"mode": "pad"},
    )
    with pytest.raises(ValueError, match="resize mode pad fills label maps with class 0, which the palette"):
        run_build(padded)


def test_changed_config_replaces_the_old_build(
    camvid_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy_camvid_subset(camvid_dir, tmp_path / "src", 3, with_labels=True)
    base = {
        "source": {"uri": str(tmp_path / "src"), "a_dir": "labels", "b_dir": "images"},
        "output": str(tmp_path / "out"),
        "derive": {"builder": "labels", "palette": str(camvid_dir / "classes.json")},
        "split": {"train": 1.0, "val": 0.0, "test": 0.0},
    }
    first = run_build(config(**base, resize={"size": 64}))
    # A first build drops only its own sidecars: nothing to report.
    assert "leftover" not in capsys.readouterr().out
    read_by_a_running_job = shard_uris(str(tmp_path / "out"), first, "train")
    second = run_build(config(**base, resize={"size": 32}))
    assert first.build_id != second.build_id
    # The replaced build stays for keep_replaced_hours (24 by default): jobs that read its manifest before
    # the replacement stream its shards epoch after epoch.
    assert sorted(p.name for p in (tmp_path / "out" / "shards").iterdir()) == sorted(
        [first.build_id, second.build_id]
    )
    assert all(os.path.exists(uri) for uri in read_by_a_running_job)
    assert f"kept shards/{first.build_id}/: replaced less than 24 h ago" in capsys.readouterr().out
    assert read_manifest(str(tmp_path / "out")).build_id == second.build_id
    # So does its manifest, beside the new one: a run started on it can be resumed on it.
    kept = tmp_path / "out" / f"manifest.{first.build_id}.json"
    assert read_manifest(str(kept)) == first
    assert shard_uris(str(kept), first, "train") == read_by_a_running_job
    # Built again (A, B, then A): the kept copy of the manifest now in use goes; B's is kept.
    third = run_build(config(**base, resize={"size": 64}))
    assert third.build_id == first.build_id and not kept.exists()
    assert read_manifest(str(tmp_path / "out" / f"manifest.{second.build_id}.json")) == second
    # Once that time is past (here: none to keep), the next build of the output removes it, manifest too.
    again = run_build(config(**base, resize={"size": 32}, keep_replaced_hours=0))
    assert again.build_id == second.build_id
    assert [p.name for p in (tmp_path / "out" / "shards").iterdir()] == [second.build_id]
    assert sorted(p.name for p in (tmp_path / "out").glob("manifest*")) == ["manifest.json"]
    assert "removed 1 leftover(s) of other or interrupted builds" in capsys.readouterr().out


def test_files_touched_or_copied_without_their_times_are_the_same_build(
    camvid_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A touch, `cp -r` or a sync that drops times changes no pixel: the build stays up to date (every shard
    would otherwise be rebuilt). Bytes rewritten at the same size are still a new build. The files of a
    shard whose every sample was quarantined count too."""
    keys = copy_camvid_subset(camvid_dir, tmp_path / "src", 3, with_labels=True)
    shutil.copy(tmp_path / "src" / "labels" / f"{keys[0]}.png", tmp_path / "src" / "labels" / "broken.png")
    (tmp_path / "src" / "images" / "broken.jpg").write_bytes(b"not an image at all")
    base = {
        "source": {"uri": str(tmp_path / "src"), "a_dir": "labels", "b_dir": "images"},
        "output": str(tmp_path / "out"),
        "derive": {"builder": "labels", "palette": str(camvid_dir / "classes.json")},
        "resize": {"size": 32},
        "split": {"train": 1.0, "val": 0.0, "test": 0.0},
        "shards": {"samples_per_shard": 1},  # broken's shard is all quarantine: no tar
    }
    first = run_build(config(**base))
    assert first.totals.quarantined == 1 and first.totals.shards == 3
    for path in (tmp_path / "src").rglob("*.*"):
        os.utime(path, (2e9, 2e9))
    capsys.readouterr()
    again = run_build(config(**base))
    printed = capsys.readouterr().out
    assert again.build_id == first.build_id and "up to date" in printed, printed
    assert (
        "8 file(s) have new times at their old sizes" in printed
        and "8 of them hold the same bytes" in printed
    )

    # Read once: the record now knows the new times hold the same bytes.
    assert run_build(config(**base)).build_id == first.build_id
    assert "comparing their content" not in capsys.readouterr().out

    image = sorted((tmp_path / "src" / "images").iterdir())[0]
    data = bytearray(image.read_bytes())
    data[len(data) // 2] ^= 0xFF  # other bytes, same size
    image.write_bytes(bytes(data))
    changed = run_build(config(**base))
    assert changed.build_id != first.build_id
    printed = capsys.readouterr().out
    assert (
        "1 file(s) have new times at their old sizes" in printed
        and "0 of them hold the same bytes" in printed
    )

    # A damaged record is only a lost shortcut: said, and the build goes on.
    record = tmp_path / "out" / "shards" / changed.build_id / "sources.json.gz"
    record.write_bytes(record.read_bytes()[:20])
    os.utime(image, (3e9, 3e9))
    assert run_build(config(**base)).build_id != changed.build_id
    assert "sources.json.gz is unreadable" in capsys.readouterr().out


def test_a_shard_read_from_other_bytes_than_its_plan_proved_is_removed_and_the_build_fails(
    tmp_path: Path,
) -> None:
    """A file planned with its old time (same bytes as the last build read) but read with other bytes (it
    changed between the plan and its task, or an interrupted run's shard is reused) must not be built, or
    stay, under the old identity."""
    build_dir = tmp_path / "shards" / "b"
    build_dir.mkdir(parents=True)
    for name in ("train-000000.tar", "train-000000.json", "train-000001.tar", "train-000001.json"):
        (build_dir / name).write_bytes(b"x")
    plan = build_module.SourcePlan(
        [], [], 0, [], [], proven={"/src/p0.png": "a" * 64, "/src/p1.png": "b" * 64}
    )
    records = [
        {"kind": "shard", "name": "train-000000.tar", "sources": {"/src/p0.png": "c" * 64}},
        {"kind": "empty", "name": "train-000001.tar", "sources": {"/src/p1.png": "b" * 64}},
    ]
    with pytest.raises(storage.StorageError, match=r"1 source file\(s\) changed while the build read them"):
        build_module.check_read_as_planned(plan, records, str(build_dir))
    assert sorted(p.name for p in build_dir.iterdir()) == ["train-000001.json", "train-000001.tar"]
    build_module.check_read_as_planned(plan, records[1:], str(build_dir))  # read as proved: nothing to say


def test_a_source_file_removed_during_the_build_is_named_as_such(tmp_path: Path) -> None:
    """Not bad data to quarantine, nor a storage outage to wait out: the source changed under the build."""
    sources: dict[str, str] = {}
    (tmp_path / "here.png").write_bytes(b"x")
    assert source_record.read_source(str(tmp_path / "here.png"), sources) == b"x" and len(sources) == 1
    with pytest.raises(FileNotFoundError, match=r"gone\.png was listed, then removed from the source during"):
        source_record.read_source(str(tmp_path / "gone.png"), sources)


def test_a_damaged_source_record_loses_its_bad_entries_and_never_fails_a_build() -> None:
    good = [10, 1.5, "a" * 64, 2.5]
    assert source_record.source_entry(good) and source_record.source_entry([10, 1, None, 2])
    for bad in (None, [10, None, "a", 2.5], [10, 1.5, "a"], [10, "yesterday", "a", 1], [True, 1, "a", 1], {}):
        assert not source_record.source_entry(bad), bad
    infos = [("/s/x.png", 10, 9.0), ("/s/y.png", 10, 9.0)]
    times, proven = source_record.same_content_times(infos, {"/s/x.png": [10, 1.5, "a" * 64, 9.0]})
    assert times == {"/s/x.png": 1.5, "/s/y.png": 9.0} and proven == {"/s/x.png": "a" * 64}


def test_bad_s3_settings_fail_at_start_with_a_clear_message(
    s3_server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cfg = config(
        source={"uri": str(tmp_path), "layout": "photos"},
        output="s3://no-such-bucket/ds",
        derive={"builder": "canny"},
    )
    (tmp_path / "x.jpg").write_bytes(b"")
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket' does not exist"):
        run_build(cfg)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    cfg.output = "s3://p2p-test/ds"
    with pytest.raises(storage.StorageError, match="credentials rejected"):
        run_build(cfg)


def test_tar_members_follow_the_webdataset_layout(camvid_dir: Path, tmp_path: Path) -> None:
    keys = copy_camvid_subset(camvid_dir, tmp_path / "src", 2)
    manifest = run_build(
        config(
            source={"uri": str(tmp_path / "src"), "layout": "photos", "photos_dir": "images"},
            output=str(tmp_path / "o"),
            derive={"builder": "grayscale"},
            resize={"size": 32},
            split={"train": 1.0, "val": 0.0, "test": 0.0},
            shards={"shuffle": False},
        )
    )
    path = tmp_path / "o" / manifest.splits["train"].shards[0].path
    with tarfile.open(fileobj=io.BytesIO(path.read_bytes())) as tar:
        names = tar.getnames()
    assert names == [f"{k}.{ext}" for k in sorted(keys) for ext in ("input.png", "target.jpg", "json")]
