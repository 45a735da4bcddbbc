"""The training data path on real CamVid content (downscaled in memory) in shards written here, no Ray:
equal full batches on every rank over uneven shards, reproducible epochs, the same crop/flip for input and
target, nearest-only label maps, exact-once eval, and integrity errors that name the shard."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from pipelines.config import ConfigError, from_dict
from pipelines.dataset.build import tar_bytes
from pipelines.manifest import (
    Manifest,
    ManifestError,
    SampleFormat,
    ShardEntry,
    SplitInfo,
    Totals,
    read_manifest,
)
from pipelines.preprocessing import to_tensor
from pipelines.training import loader as loader_module
from pipelines.training.loader import (
    LoaderConfig,
    RunLoader,
    ShardDataset,
    ShardError,
    augments_on_device,
    crop_flip,
    make_eval_loader,
    make_train_loader,
    steps_per_epoch,
    workers_started,
)

SIZE = (64, 48)  # (width, height) the CamVid images are shrunk to in memory

LABELS_FORMAT = SampleFormat("input.png", "target.jpg", input_channels=3, input_is_label_map=True)
EDGES_FORMAT = dataclasses.replace(LABELS_FORMAT, input_channels=1, input_is_label_map=False)
LOSSLESS_FORMAT = dataclasses.replace(LABELS_FORMAT, target="target.png", input_is_label_map=False)

Sample = tuple[str, np.ndarray, np.ndarray]  # key, input (HxW or HxWx3 RGB), target (HxWx3 RGB)


# ----------------------------------------------------------------------------------------------------------
# Writing shards and manifests
# ----------------------------------------------------------------------------------------------------------


def encode(image: np.ndarray, ext: str) -> bytes:
    bgr = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(f".{ext}", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95] if ext == "jpg" else [])
    assert ok
    return data.tobytes()


def manifest_of(shards: dict[str, list[ShardEntry]], fmt: SampleFormat) -> Manifest:
    """A consistent manifest listing `shards` (totals as a build of paired files would record them)."""
    splits = {name: SplitInfo.of(entries) for name, entries in shards.items()}
    samples = sum(s.samples for s in splits.values())
    totals = Totals(
        files_seen=2 * samples,
        items_seen=samples,
        samples_written=samples,
        quarantined=0,
        shards=sum(len(s.shards) for s in splits.values()),
        bytes=sum(s.bytes for s in splits.values()),
        build_seconds=0.0,
        files_ignored=0,
    )
    return Manifest("test", "2024-01-01T00:00:00Z", {}, None, fmt, splits, totals)


def write_dataset(root: Path, splits: dict[str, list[list[Sample]]], fmt: SampleFormat) -> str:
    """Shards as `p2p dataset build` writes them (sorted plain tars) plus a manifest with true checksums."""
    listed: dict[str, list[ShardEntry]] = {}
    for split, shards in splits.items():
        entries = listed.setdefault(split, [])
        for index, samples in enumerate(shards):
            members: list[tuple[str, bytes]] = []
            for key, inp, tgt in sorted(samples, key=lambda s: s[0]):
                members += [
                    (f"{key}.{fmt.input}", encode(inp, fmt.input.split(".")[1])),
                    (f"{key}.{fmt.target}", encode(tgt, fmt.target.split(".")[1])),
                    (f"{key}.json", json.dumps({"key": key}).encode()),
                ]
            data = tar_bytes(members)
            path = f"shards/test/{split}-{index:06d}.tar"
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_bytes(data)
            entries.append(ShardEntry(split, path, len(samples), len(data), hashlib.sha256(data).hexdigest()))
    manifest_of(listed, fmt).write(str(root))
    return str(root)


def chunks(samples: list[Sample], sizes: list[int]) -> list[list[Sample]]:
    assert sum(sizes) <= len(samples)
    bounds = list(itertools.accumulate([0, *sizes]))
    return [samples[a:b] for a, b in itertools.pairwise(bounds)]


def camvid(camvid_dir: Path, split: str, n: int) -> list[Sample]:
    """n real (key, colour label map, photo) samples, shrunk to SIZE (labels with nearest)."""
    lut = np.zeros((256, 3), np.uint8)
    for c in json.loads((camvid_dir / "classes.json").read_text())["classes"]:
        lut[c["id"]] = c["color"]
    keys = sorted(p.stem for p in (camvid_dir / split / "images").glob("*.jpg"))[:n]
    out = []
    for key in keys:
        photo = cv2.imread(str(camvid_dir / split / "images" / f"{key}.jpg"), cv2.IMREAD_COLOR_RGB)
        ids = cv2.imread(str(camvid_dir / split / "labels" / f"{key}.png"), cv2.IMREAD_GRAYSCALE)
        photo = cv2.resize(photo, SIZE, interpolation=cv2.INTER_AREA)
        labels = lut[cv2.resize(ids, SIZE, interpolation=cv2.INTER_NEAREST)]
        out.append((key, labels, photo))
    return out


def colours(image: np.ndarray) -> set[tuple[int, ...]]:
    return {tuple(int(v) for v in c) for c in image.reshape(-1, image.shape[-1])}


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """CxHxW in [-1, 1] → HxWxC uint8 (exact for values that came from uint8)."""
    return np.round((t.permute(1, 2, 0).numpy() + 1.0) * 127.5).astype(np.uint8)


def config(root: str, **overrides: Any) -> LoaderConfig:
    values: dict[str, Any] = {
        "load_size": 36,
        "crop_size": 32,
        "batch_size": 2,
        "num_workers": 2,
        "shuffle_buffer": 8,
    }
    return LoaderConfig(manifest=root, **{**values, **overrides})


def batches(loader: Any) -> list[dict[str, Any]]:
    return list(loader)


@pytest.fixture(scope="module")
def labels_data(camvid_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Train shards of 10/10/7 real samples (the uneven case), val shards of 5/5/3."""
    train, val = camvid(camvid_dir, "train", 27), camvid(camvid_dir, "val", 13)
    root = write_dataset(
        tmp_path_factory.mktemp("labels"),
        {"train": chunks(train, [10, 10, 7]), "val": chunks(val, [5, 5, 3])},
        LABELS_FORMAT,
    )
    return {"root": root, "train": train, "val": val, "labels": {k: colours(i) for k, i, _ in train + val}}


@pytest.fixture(scope="module")
def single_shard(camvid_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """One shard of 10 samples: fewer shards than ranks × workers."""
    return write_dataset(
        tmp_path_factory.mktemp("single"), {"train": [camvid(camvid_dir, "train", 10)]}, LABELS_FORMAT
    )


# ----------------------------------------------------------------------------------------------------------
# Equal steps on every rank
# ----------------------------------------------------------------------------------------------------------


def test_uneven_shards_give_every_rank_the_same_full_batches(labels_data: dict[str, Any]) -> None:
    cfg = config(labels_data["root"])
    steps = steps_per_epoch(read_manifest(cfg.manifest), "train", world_size=2, batch_size=2)
    assert steps == 27 // 4
    seen_all: set[str] = set()
    for epoch in range(3):
        keys_by_rank = []
        for rank in range(2):
            loader = make_train_loader(cfg, rank=rank, world_size=2, epoch=epoch)
            out = batches(loader)
            assert len(out) == len(loader) == steps
            for batch in out:
                assert batch["A"].shape == (2, 3, 32, 32) and batch["B"].shape == (2, 3, 32, 32)
                assert len(batch["key"]) == 2
            keys_by_rank.append([k for b in out for k in b["key"]])
        distinct = set(keys_by_rank[0]) | set(keys_by_rank[1])
        assert len(distinct) >= 18, f"epoch {epoch}: only {len(distinct)} of 27 samples"
        seen_all |= distinct
    assert seen_all == {k for k, _, _ in labels_data["train"]}


def test_more_consumers_than_shards_still_gives_equal_counts(single_shard: str) -> None:
    for workers in (2, 0):
        cfg = config(single_shard, num_workers=workers)
        keys = []
        for rank in range(2):
            out = batches(make_train_loader(cfg, rank=rank, world_size=2, epoch=0))
            assert len(out) == 10 // 4 and all(len(b["key"]) == 2 for b in out)
            keys += [k for b in out for k in b["key"]]
        # The ranks share the one shard sample by sample: disjoint samples, no repeats.
        assert len(set(keys)) == len(keys) == 8


def test_plans_add_up_for_many_layouts(tmp_path: Path) -> None:
    """Quotas are whole batches summing to steps × batch_size on every rank; shares never overlap; every
    rank holds the same samples to one, so none goes unseen (beyond the remainder) or repeats for lack of
    samples on its rank, however uneven the shards."""
    rng = random.Random(0)
    for case in range(60):
        sizes = [rng.randint(1, 12) for _ in range(rng.randint(1, 7))]
        world, workers, batch = rng.randint(1, 4), rng.randint(1, 3), rng.randint(1, 3)
        if sum(sizes) < world * batch:
            continue
        shards = [ShardEntry("train", f"s{i}.tar", n, 1, "0" * 64) for i, n in enumerate(sizes)]
        root = tmp_path / str(case)
        manifest_of({"train": shards}, LABELS_FORMAT).write(str(root))
        cfg = LoaderConfig(manifest=str(root), batch_size=batch, num_workers=workers)
        steps = sum(sizes) // (world * batch)
        for epoch in range(2):
            owned: list[tuple[int, int]] = []
            for rank in range(world):
                dataset = ShardDataset(cfg, "train", rank, world, epoch, train=True)
                quotas, held = [], 0
                for worker in range(workers):
                    pieces, quota = dataset.worker_plan(worker, workers)
                    assert quota % batch == 0 and (quota == 0 or pieces), (sizes, world, workers, batch)
                    quotas.append(quota)
                    owned += [(p.shard, pos) for p in pieces for pos in p.positions()]
                    held += sum(p.count for p in pieces)
                assert sum(quotas) == steps * batch
                assert held in (sum(sizes) // world, -(-sum(sizes) // world)), (sizes, world, rank, held)
            assert len(owned) == len(set(owned)), (sizes, world, workers)


def test_a_mid_epoch_resume_keeps_the_loader_worker_count_its_batches_were_planned_with(
    labels_data: dict[str, Any],
) -> None:
    """The worker count is part of the epoch's plan (0 and 1 plan alike): a resume that skips the batches
    already trained must read the rest of the same plan, whatever this machine's default count."""
    from pipelines.training.train import resumed_loader_workers

    def keys(workers: int) -> list[list[str]]:
        loader = make_train_loader(config(labels_data["root"], num_workers=workers), rank=0, world_size=1)
        return [b["key"] for b in loader]

    assert keys(0) == keys(1) and keys(3) != keys(2)  # why the count matters
    made_with = {"extra": {"loader_workers": 3}}
    assert resumed_loader_workers(made_with, mid_epoch=True, default=2) == 3
    assert resumed_loader_workers(made_with, mid_epoch=False, default=2) == 2  # a new epoch: a new plan
    assert resumed_loader_workers({"extra": {"loader_workers": 0}}, mid_epoch=True, default=1) == 1
    assert resumed_loader_workers({"extra": {}}, mid_epoch=True, default=2) == 2  # an older checkpoint
    assert resumed_loader_workers(None, mid_epoch=False, default=2) == 2


def test_same_seed_epoch_rank_is_reproducible_and_epochs_differ(labels_data: dict[str, Any]) -> None:
    cfg = config(labels_data["root"])
    first, again = (batches(make_train_loader(cfg, rank=1, world_size=2, epoch=0)) for _ in range(2))
    for a, b in zip(first, again, strict=True):
        assert a["key"] == b["key"]
        assert torch.equal(a["A"], b["A"]) and torch.equal(a["B"], b["B"])
    later = batches(make_train_loader(cfg, rank=1, world_size=2, epoch=1))
    assert [b["key"] for b in later] != [b["key"] for b in first]


# ----------------------------------------------------------------------------------------------------------
# Augmentation and tensors
# ----------------------------------------------------------------------------------------------------------


def coordinate_dataset(root: Path, height: int, width: int) -> str:
    """16 lossless samples in two train shards: targets encode their own pixel coordinates (x * 4, y * 5,
    noise) and input = 255 - target, so any crop or flip can be read back from the pixels."""
    ys, xs = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(0)
    samples = []
    for i in range(16):
        target = np.dstack([xs * 4, ys * 5, rng.integers(0, 256, xs.shape)]).astype(np.uint8)
        samples.append((f"s{i:02d}", 255 - target, target))
    return write_dataset(root, {"train": [samples[:8], samples[8:]]}, LOSSLESS_FORMAT)


def test_crop_and_flip_are_the_same_for_input_and_target(tmp_path: Path) -> None:
    """Target pixels encode their own coordinates and input = 255 - target, stored losslessly: after a
    random crop and flip the relation holds exactly and the coordinates show crop and flip varied."""
    root = coordinate_dataset(tmp_path, SIZE[1], SIZE[0])
    out = batches(make_train_loader(config(root, preprocess="crop", batch_size=4, num_workers=0)))
    flips, offsets = set(), set()
    for batch in out:
        assert torch.allclose(batch["A"], -batch["B"], atol=1e-6)
        for b in batch["B"]:
            image = to_uint8(b).astype(int)
            x, y = image[0, :, 0] // 4, image[:, 0, 1] // 5
            flipped = bool(x[0] > x[-1])
            assert np.array_equal(np.abs(np.diff(x)), np.ones(31)) and np.array_equal(np.diff(y), np.ones(31))
            flips.add(flipped)
            offsets.add((int(x.min()), int(y[0])))
    assert flips == {True, False} and len(offsets) > 4

    # With resizing (linear/area on both images) on pure noise, the relation holds up to rounding.
    rng = np.random.default_rng(1)
    noise = [rng.integers(0, 256, (SIZE[1], SIZE[0], 3)).astype(np.uint8) for _ in range(8)]
    root = write_dataset(
        tmp_path / "noise", {"train": [[(f"n{i}", 255 - t, t) for i, t in enumerate(noise)]]}, LOSSLESS_FORMAT
    )
    for batch in make_train_loader(config(root, load_size=40, batch_size=4, num_workers=0)):
        assert (batch["A"] + batch["B"]).abs().max() <= 2 / 127.5 + 1e-6


def test_label_maps_keep_only_their_own_colours(labels_data: dict[str, Any]) -> None:
    """Resizing a label map (down to 36 or up to 80) never blends colours: it goes through as a mask."""
    for load, crop in ((36, 32), (80, 64)):
        cfg = config(labels_data["root"], load_size=load, crop_size=crop, num_workers=0)
        for batch in make_train_loader(cfg):
            for key, a, b in zip(batch["key"], batch["A"], batch["B"], strict=True):
                assert colours(to_uint8(a)) <= labels_data["labels"][key]
                assert a.shape == b.shape == (3, crop, crop)
    # The photo target is interpolated: it gains colours that a nearest resize could not make.
    batch = next(iter(make_train_loader(config(labels_data["root"], load_size=80, crop_size=64))))
    source = {k: t for k, _, t in labels_data["train"]}[batch["key"][0]]
    assert not colours(to_uint8(batch["B"][0])) <= colours(source)


def test_stored_size_round_trips_in_rgb(labels_data: dict[str, Any]) -> None:
    """preprocess=none in eval returns the stored pixels: RGB order, exact label colours."""
    cfg = config(labels_data["root"], preprocess="none", batch_size=1, num_workers=0)
    sources = {k: i for k, i, _ in labels_data["val"]}
    for batch in make_eval_loader(cfg):
        assert np.array_equal(to_uint8(batch["A"][0]), sources[batch["key"][0]])


def test_validating_draws_nothing_from_the_global_generator(labels_data: dict[str, Any]) -> None:
    """Training's dropout on CPU draws from torch's global generator: a validation loader drawing its seed
    from there would change the training by whether (so when, under `val_min_interval_s`) it validates."""
    cfg = config(labels_data["root"], batch_size=2, num_workers=0)
    before = torch.random.get_rng_state()
    for _ in range(2):
        assert list(make_eval_loader(cfg))
    assert torch.equal(torch.random.get_rng_state(), before)


def test_every_preprocess_mode_gives_the_expected_size(labels_data: dict[str, Any]) -> None:
    """Stored 64x48: crop modes give crop_size squares (reflect-padded where the image is smaller);
    none keeps the stored size; in eval too."""
    expected = {
        "resize_and_crop": (32, 32),
        "crop": (56, 56),
        "scale_width_and_crop": (32, 32),
        "none": (48, 64),
    }
    for mode, size in expected.items():
        crop = 56 if mode == "crop" else 32  # crop: 56 > 48 rows; scale_width: 64x48 → 36x27 < 32 rows
        cfg = config(labels_data["root"], preprocess=mode, crop_size=crop, load_size=36, num_workers=0)
        for loader in (make_train_loader(cfg), make_eval_loader(cfg)):
            batch = next(iter(loader))
            assert batch["A"].shape[2:] == batch["B"].shape[2:] == size, mode
            for key, a in zip(batch["key"], batch["A"], strict=True):
                assert colours(to_uint8(a)) <= labels_data["labels"][key], mode


def test_edges_stay_one_channel_and_btoa_swaps(camvid_dir: Path, tmp_path: Path) -> None:
    samples = [
        (k, cv2.Canny(cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY), 50, 150), photo)
        for k, _, photo in camvid(camvid_dir, "train", 4)
    ]
    root = write_dataset(tmp_path, {"train": [samples]}, EDGES_FORMAT)
    manifest = read_manifest(root)
    assert manifest.channels("AtoB") == (1, 3) and manifest.channels("BtoA") == (3, 1)
    for direction, (ca, cb) in (("AtoB", (1, 3)), ("BtoA", (3, 1))):
        cfg = config(root, direction=direction, num_workers=0)
        for loader in (make_train_loader(cfg), make_eval_loader(cfg, split="train")):
            for batch in loader:
                n = len(batch["key"])
                assert batch["A"].shape == (n, ca, 32, 32) and batch["B"].shape == (n, cb, 32, 32)
                assert batch["A"].dtype == batch["B"].dtype == torch.float32
                for t in (batch["A"], batch["B"]):
                    assert t.min() >= -1.0 and t.max() <= 1.0
                edges = batch["A"] if direction == "AtoB" else batch["B"]
                assert edges.min() == -1.0 and edges.max() > 0.0


# ----------------------------------------------------------------------------------------------------------
# Eval
# ----------------------------------------------------------------------------------------------------------


def test_eval_reads_every_sample_once_across_ranks_deterministically(
    labels_data: dict[str, Any], single_shard: str
) -> None:
    for root, split, total in ((labels_data["root"], "val", 13), (single_shard, "train", 10)):
        cfg = config(root)
        runs = []
        for _ in range(2):
            per_rank = [batches(make_eval_loader(cfg, split=split, rank=r, world_size=2)) for r in range(2)]
            runs.append(per_rank)
            keys = [k for out in per_rank for b in out for k in b["key"]]
            assert len(keys) == len(set(keys)) == total
            assert all(b["A"].shape[1:] == (3, 32, 32) for out in per_rank for b in out)
        for out_a, out_b in zip(*runs, strict=True):
            for a, b in zip(out_a, out_b, strict=True):
                assert a["key"] == b["key"] and torch.equal(a["A"], b["A"]) and torch.equal(a["B"], b["B"])


# ----------------------------------------------------------------------------------------------------------
# Errors and process boundaries
# ----------------------------------------------------------------------------------------------------------


def test_verify_sha256_names_a_corrupted_shard(single_shard: str, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(single_shard, root)
    shard = root / "shards" / "test" / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # inside the first member's image bytes: the tar itself stays readable
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shards/test/train-000000\.tar is corrupt"):
        batches(make_train_loader(config(str(root), verify_sha256=True, num_workers=0)))


def test_unknown_split_and_too_few_samples_are_clear_errors(single_shard: str) -> None:
    cfg = config(single_shard)
    with pytest.raises(ManifestError, match="'nope' is not in the manifest"):
        make_train_loader(cfg, split="nope")
    with pytest.raises(ManifestError, match="'val' is not in the manifest"):
        make_eval_loader(cfg)
    with pytest.raises(ValueError, match=r"10 samples.*world_size 4.*batch_size 3"):
        steps_per_epoch(read_manifest(single_shard), "train", world_size=4, batch_size=3)
    with pytest.raises(ValueError, match="10 samples"):
        make_train_loader(config(single_shard, batch_size=6), world_size=2)


def test_dataset_pickles_for_spawned_workers(single_shard: str) -> None:
    loader = make_train_loader(config(single_shard, num_workers=0), rank=1, world_size=2, epoch=3)
    clone = pickle.loads(pickle.dumps(loader.dataset))
    assert [s["key"] for s in clone] == [s["key"] for s in loader.dataset]


def test_s3_streams_the_same_batches_as_a_local_folder(labels_data: dict[str, Any], s3_server: Any) -> None:
    """Shards streamed from S3 by forked workers give exactly the local batches; each worker gets its own
    S3 client (sharing the parent's pooled connections corrupted reads)."""
    from pipelines import storage

    local = Path(labels_data["root"])
    remote = f"s3://{s3_server.buckets[0]}/shard-loader"
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        storage.write_bytes_atomic(f"{remote}/{path.relative_to(local).as_posix()}", path.read_bytes())
    for rank in range(2):
        here = batches(make_train_loader(config(str(local)), rank=rank, world_size=2, epoch=1))
        there = batches(
            make_train_loader(config(remote, verify_sha256=rank == 1), rank=rank, world_size=2, epoch=1)
        )
        assert len(here) == len(there) == 6
        for a, b in zip(here, there, strict=True):
            assert a["key"] == b["key"] and torch.equal(a["A"], b["A"]) and torch.equal(a["B"], b["B"])
    keys = [
        k for r in range(2) for b in make_eval_loader(config(remote), rank=r, world_size=2) for k in b["key"]
    ]
    assert sorted(keys) == sorted(k for k, _, _ in labels_data["val"])

    storage.resolve(remote)  # the parent now holds a cached client; a forked child must not reuse it
    import multiprocessing

    def child(queue: Any) -> None:
        queue.put((len(storage._S3_CLIENTS), len(storage._INHERITED_CLIENTS)))

    queue = multiprocessing.get_context("fork").Queue()
    process = multiprocessing.get_context("fork").Process(target=child, args=(queue,))
    process.start()
    process.join(30)
    assert queue.get(timeout=5) == (0, len(storage._S3_CLIENTS) + len(storage._INHERITED_CLIENTS))


def test_a_manifest_read_once_serves_every_epoch_and_eval(single_shard: str, tmp_path: Path) -> None:
    """Loaders take the already-read Manifest: with the file gone they still plan from it (no re-read)."""
    root = tmp_path / "copy"
    shutil.copytree(single_shard, root)
    manifest = read_manifest(str(root))
    (root / "manifest.json").unlink()
    cfg = config(str(root), num_workers=0)
    for epoch in range(2):
        assert len(batches(make_train_loader(cfg, epoch=epoch, manifest=manifest))) == 10 // 2
    assert sum(len(b["key"]) for b in batches(make_eval_loader(cfg, "train", manifest=manifest))) == 10
    with pytest.raises(ManifestError, match="no dataset manifest"):
        make_train_loader(cfg)  # without it, the loader reads the (now missing) file


# ----------------------------------------------------------------------------------------------------------
# One loader per run, crops on the device, worker count
# ----------------------------------------------------------------------------------------------------------


def test_run_loader_keeps_its_workers_and_gives_each_epochs_batches(labels_data: dict[str, Any]) -> None:
    """A RunLoader's epoch e is exactly make_train_loader(epoch=e), from the same worker processes, also
    after an epoch abandoned half way (a max_steps stop) and when a run starts at a later epoch (resume).
    Overlapping epochs (on by default when augmenting on the device) changes none of that, and the next
    epoch's workers have started by the time this epoch is handed out."""
    cfg = config(labels_data["root"])
    for device_augment, overlap in ((False, None), (True, None), (False, True)):
        loader = RunLoader(
            dataclasses.replace(cfg, overlap_epochs=overlap), "train", 1, 2, device_augment=device_augment
        )
        assert len(loader.loaders) == (2 if device_augment or overlap else 1)
        try:
            pids = None
            for epoch in (2, 0, 1, 1, 2):
                fresh = batches(make_train_loader(cfg, "train", 1, 2, epoch, device_augment=device_augment))
                iterator = loader.epoch(epoch)
                assert workers_started(loader)  # both loaders: no fork waits for this epoch's end
                if epoch == 0:  # abandoned after one batch: the next epoch must not see its leftovers
                    first = next(iterator)
                    assert first["key"] == fresh[0]["key"] and torch.equal(first["A"], fresh[0]["A"])
                    continue
                out = list(iterator)
                assert len(out) == len(fresh) == len(loader)
                for a, b in zip(out, fresh, strict=True):
                    assert (
                        a["key"] == b["key"] and torch.equal(a["A"], b["A"]) and torch.equal(a["B"], b["B"])
                    )
                    if device_augment:
                        assert torch.equal(a["crop"], b["crop"])
                workers = [w for one in loader.loaders for w in one._iterator._workers]  # type: ignore[union-attr]
                now = [w.pid for w in workers]
                assert pids is None or now == pids, "the workers were restarted"
                pids = now
        finally:
            loader.close()
        assert all(not w.is_alive() for w in workers)
    # Decoding in the training process (no workers): nothing to overlap with, one loader.
    alone = RunLoader(dataclasses.replace(cfg, num_workers=0, overlap_epochs=True), "train", 1, 2)
    assert len(alone.loaders) == 1 and len(list(alone.epoch(0))) == len(alone)


def test_device_augment_crops_and_flips_input_and_target_alike(tmp_path: Path) -> None:
    """The device path (uint8 at load_size + crop parameters, cut by crop_flip) on coordinate-encoded
    targets, input = 255 - target: the relation holds exactly, crops and flips vary, the values are the
    CPU path's x / 127.5 - 1 of the cropped pixels, and the same seed gives the same crops."""
    root = coordinate_dataset(tmp_path, 36, 36)
    cfg = config(root, batch_size=4, num_workers=0)  # load 36 = the stored size, crop 32
    out = batches(make_train_loader(cfg, device_augment=True))
    again = batches(make_train_loader(cfg, device_augment=True))
    flips, offsets = set(), set()
    for batch, same in zip(out, again, strict=True):
        assert batch["A"].dtype == torch.uint8 and batch["A"].shape == (4, 36, 36, 3)
        assert torch.equal(batch["crop"], same["crop"]) and batch["key"] == same["key"]
        a, b = crop_flip(batch["A"], batch["crop"], 32), crop_flip(batch["B"], batch["crop"], 32)
        assert a.shape == b.shape == (4, 3, 32, 32) and a.dtype == torch.float32
        assert a.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(a, -b, atol=1e-6)
        for raw, (top, left, size, flip), cropped in zip(batch["B"], batch["crop"].tolist(), b, strict=True):
            expected = raw[top : top + size, left : left + size].numpy()
            expected = expected[:, ::-1] if flip else expected
            assert torch.equal(cropped, to_tensor(expected))
            image = to_uint8(cropped).astype(int)
            x, y = image[0, :, 0] // 4, image[:, 0, 1] // 5
            assert np.array_equal(np.abs(np.diff(x)), np.ones(31)) and np.array_equal(np.diff(y), np.ones(31))
            flips.add(bool(flip))
            offsets.add((top, left))
    assert flips == {True, False} and len(offsets) > 4


def test_device_augment_resizes_label_maps_with_nearest(labels_data: dict[str, Any]) -> None:
    cfg = config(labels_data["root"], load_size=80, crop_size=64, num_workers=0)
    for batch in make_train_loader(cfg, device_augment=True):
        assert batch["A"].shape[1:] == (80, 80, 3)
        for key, a in zip(batch["key"], crop_flip(batch["A"], batch["crop"], 64), strict=True):
            assert colours(to_uint8(a)) <= labels_data["labels"][key]
    with pytest.raises(ValueError, match="resize_and_crop"):
        make_train_loader(config(labels_data["root"], preprocess="crop"), device_augment=True)
    assert not augments_on_device(cfg, torch.device("cpu"))
    assert augments_on_device(cfg, torch.device("cuda"))
    assert not augments_on_device(dataclasses.replace(cfg, device_augment=False), torch.device("cuda"))


def test_num_workers_auto_is_the_cpus_but_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader_module, "available_cpus", lambda: 8)
    auto = LoaderConfig()
    assert auto.num_workers == "auto"
    assert (auto.workers(), auto.workers(cpus=4), auto.workers(cpus=1), auto.workers(cpus=32)) == (7, 3, 1, 7)
    assert LoaderConfig(num_workers=0).workers(cpus=4) == 0
    # CPU steps that leave under 2 CPUs free: auto decodes in the training process; a number stays.
    assert (auto.workers(busy_cpus=6), auto.workers(busy_cpus=7), auto.workers(cpus=2, busy_cpus=8)) == (
        7,
        0,
        0,
    )
    assert LoaderConfig(num_workers=2).workers(busy_cpus=8) == 2
    # Overlapped epochs run two DataLoaders: auto shares the CPUs between them; a number is per loader.
    assert (
        auto.workers(loaders=2),
        auto.workers(cpus=2, loaders=2),
        LoaderConfig(num_workers=3).workers(loaders=2),
    ) == (3, 1, 3)
    assert auto.overlaps(device_augment=True) and not auto.overlaps(device_augment=False)
    assert not dataclasses.replace(auto, overlap_epochs=False).overlaps(device_augment=True)
    assert dataclasses.replace(auto, overlap_epochs=True).overlaps(device_augment=False)
    assert from_dict(LoaderConfig, {"num_workers": 3}).num_workers == 3
    assert from_dict(LoaderConfig, {"num_workers": "auto"}).num_workers == "auto"
    with pytest.raises(ConfigError, match=r"num_workers.*'many'"):
        from_dict(LoaderConfig, {"num_workers": "many"})
    with pytest.raises(ValueError, match="num_workers"):
        LoaderConfig(num_workers=-1).validate()
