"""`p2p dataset build`: raw images → derived inputs → WebDataset shards + manifest, on Ray Data.

The job reads top to bottom:
1. `plan_build` (driver): list the source, pair files by key, give every sample a split (kept from
   train/val/test source folders, otherwise by hashing the key) and a shard. Files that cannot become a
   sample (unmatched, duplicate key, not an image, unreadable name) are quarantined here with a reason.
2. `ShardBuilder` (Ray Data `map_batches`, one row per group of whole shards, `task_groups`; an actor pool
   with one shard per row for HED): `load_shard` reads, decodes, validates and resizes, `derive_shard`
   derives the input, `write_shard` encodes and writes one tar atomically, then a small sidecar
   (`<split>-<index>.json`: size, sha256, quarantine records) that lets an interrupted build's re-run
   reuse the shard instead of building it again. A sample whose data is bad is quarantined with its
   reason and the shard is written without it; an I/O error fails the task and the build. With GPUs, HED
   runs those three steps as three stages (`derive.hed_pipeline`): CPU tasks load, the GPU actors
   (`HEDStage`) only run the network and its post-processing, CPU tasks write.
3. `finish_build` (driver): check that every item seen is either written or quarantined, write the
   manifest last and atomically, then delete files of other (older or interrupted) builds.

Why whole shards per task rather than a per-sample pipeline plus a grouping step: shard contents are fixed
by the plan, so a re-run writes byte-identical tars (idempotent), each tar is written once by one task with
no shuffle, and a crash leaves nothing the manifest points to.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import pickle
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import cv2
import numpy as np

from pipelines import storage
from pipelines.config import ConfigError, option
from pipelines.dataset import source_record
from pipelines.dataset.derive import (
    MAX_ID,
    Palette,
    canny_edges,
    canny_thresholds,
    colorize_labels,
    finish_edges,
    grayscale,
)
from pipelines.dataset.inspect import summarize
from pipelines.dataset.lock import BuildLock, LockConfig
from pipelines.images import (
    DEFAULT_MAX_PIXELS,
    BadInput,
    ResizePolicy,
    apply_resize,
    decode_image,
    decode_image_reduced,
    decode_label_mask,
    encode_image,
    split_side_by_side,
)
from pipelines.listing import (
    by_unicode_form,
    file_key,
    list_images,
    quarantine_record,
    reason_counts,
    relative_to,
    shard_key,
)
from pipelines.manifest import (
    SPLITS,
    Manifest,
    ManifestError,
    QuarantineRecord,
    SampleFormat,
    ShardEntry,
    SplitInfo,
    Totals,
    manifest_uri,
    printable,
    replaced_manifest_uri,
    unsafe_path,
    write_manifest,
)
from pipelines.progress import Pace, quiet_ray_data, rate_text
from pipelines.runtime import actor_device, cluster_gpus, init_ray, node_id
from pipelines.shards import DEFAULT_MAX_MEMBER_BYTES

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
    hed_actors: int = 0  # HED actor-pool size; 0 = one per GPU, or one per CPU on CPU-only clusters
    hed_pipeline: Literal["auto", "split", "fused"] = option(
        "auto",
        "hed: split = CPU tasks decode and write, actors run only the network and its post-processing "
        "(auto with GPUs); fused = each actor builds whole shards (auto on CPU-only clusters, where the "
        "network dominates)",
    )
    palette: str = option("", "labels: 'cityscapes' or a classes.json / CSV palette file")
    label_remap: dict[int, int] = field(default_factory=dict)  # applied to ids before colouring
    ignore_id: int | None = option(None, "labels: the void class id, drawn in its palette colour (or black)")


@dataclass
class SplitConfig:
    train: float = 0.9
    val: float = 0.05
    test: float = 0.05
    salt: str = ""  # change to draw a different (still deterministic) split


# Auto shard size: enough shards that every CPU of a small cluster gets a task and the loader can deal
# shards to every training worker, but not so many tiny files that listing and tar overhead dominate.
# A function of the sample count only, never of the cluster, so the same files give the same shards.
AUTO_SHARDS = 32
AUTO_MIN_SAMPLES = 16
AUTO_MAX_SAMPLES = 1000


@dataclass
class ShardConfig:
    samples_per_shard: int = option(
        0,
        f"samples per shard (0: auto, {AUTO_SHARDS} shards per split of {AUTO_MIN_SAMPLES}..1000 samples)",
    )
    shuffle: bool = option(
        True, "store each split in a seeded random order (off: sorted by key, so video frames stay together)"
    )
    shuffle_seed: int = option(0, "seed of that order: the same seed and files give byte-identical shards")
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
    lock: LockConfig = field(default_factory=LockConfig)  # one writer per output (pipelines.dataset.lock)
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are quarantined as decompression bombs
    min_side: int = 32  # smaller images are quarantined
    num_cpus_per_task: float = 1.0
    keep_replaced_hours: float = option(
        24.0,
        "keep the shards of the build this one replaces for this long, so that training runs, evaluations "
        "and translations still reading them finish (0: delete them at once)",
    )

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
        given = [
            name
            for name in ("palette", "label_remap", "ignore_id")
            if getattr(der, name) not in ("", {}, None)
        ]
        if der.builder != "labels" and given:  # else silently unused: a label map built as something else
            raise ValueError(
                f"derive.{', derive.'.join(given)} apply to the labels builder only, and the builder is "
                f"{der.builder}"
            )
        if der.builder == "labels" and not der.palette:
            raise ValueError(
                "the labels builder needs derive.palette: 'cityscapes' or a classes.json/CSV file"
            )
        if der.builder in ("labels", "canny", "hed") and self.shards.input_format != "png":
            raise ValueError(f"{der.builder} inputs must be stored lossless: set shards.input_format=png")
        fractions = {"train": self.split.train, "val": self.split.val, "test": self.split.test}
        if not all(math.isfinite(v) and 0 <= v <= 1 for v in fractions.values()):
            raise ValueError(f"split fractions must be numbers in [0, 1], got {fractions}")
        if abs(self.split_total() - 1) > 1e-6:
            raise ValueError(f"split fractions must sum to 1, got {self.split_total():g} ({fractions})")
        if self.shards.samples_per_shard < 0:
            raise ValueError(
                f"shards.samples_per_shard must be >= 1 (or 0 for auto), got {self.shards.samples_per_shard}"
            )
        positive = {
            "max_pixels": self.max_pixels,
            "min_side": self.min_side,
            "resize.size": self.resize.size,
            "derive.hed_batch_size": der.hed_batch_size,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 1 <= self.shards.jpeg_quality <= 100:
            raise ValueError(f"shards.jpeg_quality must be in 1..100, got {self.shards.jpeg_quality}")
        if self.shards.shard_mb < 0 or self.num_cpus_per_task <= 0 or der.hed_actors < 0:
            raise ValueError("shards.shard_mb must be >= 0, num_cpus_per_task > 0 and derive.hed_actors >= 0")
        if not self.keep_replaced_hours >= 0:  # NaN too
            raise ValueError(f"keep_replaced_hours must be >= 0, got {self.keep_replaced_hours}")
        if not (self.lock.ttl_s > 0 and self.lock.poll_s > 0):  # else the heartbeat or --wait spins
            raise ValueError(
                f"lock.ttl_s and lock.poll_s must be > 0, got {self.lock.ttl_s}, {self.lock.poll_s}"
            )
        if der.builder == "canny":  # else every image would fail the same way, inside the shard tasks
            self._validate_canny()
        if der.builder == "labels":
            self._validate_label_ids()

    def _validate_label_ids(self) -> None:
        der = self.derive

        def class_id(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_ID

        if der.ignore_id is not None and not class_id(der.ignore_id):
            raise ValueError(f"derive.ignore_id must be a class id 0..{MAX_ID}, got {der.ignore_id!r}")
        bad = [f"{k!r}: {v!r}" for k, v in der.label_remap.items() if not (class_id(k) and class_id(v))]
        if bad:
            raise ValueError(
                f"derive.label_remap maps class ids 0..{MAX_ID} to class ids, got {', '.join(bad)}"
            )

    def _validate_canny(self) -> None:
        der = self.derive
        low, high = der.canny_low, der.canny_high
        if (low is None) != (high is None):
            raise ValueError(
                "give both derive.canny_low and derive.canny_high, or neither (automatic per image)"
            )
        if low is not None and high is not None and not (0 <= low <= high):
            raise ValueError(f"Canny thresholds must satisfy 0 <= canny_low <= canny_high, got {low}, {high}")
        if der.canny_blur < 0 or (der.canny_blur and der.canny_blur % 2 == 0):
            raise ValueError(f"derive.canny_blur must be 0 or odd (a kernel size), got {der.canny_blur}")
        if not (math.isfinite(der.canny_sigma) and der.canny_sigma >= 0):
            raise ValueError(f"derive.canny_sigma must be a number >= 0, got {der.canny_sigma}")

    def split_total(self) -> float:
        return self.split.train + self.split.val + self.split.test


@contextlib.contextmanager
def naming_the_file(role: str, uri: str, name_it: bool) -> Iterator[None]:
    """A BadInput raised inside says which file of the pair it is about (after the reason: summaries group
    reasons by the text before their first colon)."""
    try:
        yield
    except BadInput as exc:
        if not name_it:
            raise
        raise BadInput(f"{exc} (the {role}, {uri.rsplit('/', 1)[-1]})") from None


def build_palette(cfg: DeriveConfig) -> Palette:
    """The labels palette of this build: the palette file's, with `ignore_id` replacing its void class when
    given (CSV palettes have none). The manifest records this one, so the FCN-score leaves void out."""
    palette = Palette.load(cfg.palette)
    return palette if cfg.ignore_id is None else dataclasses.replace(palette, ignore_id=cfg.ignore_id)


def hed_weights_path(cfg: DeriveConfig) -> str:
    """The weights file: `hed_weights`, else $P2P_HED_WEIGHTS, else the default; a local folder given for
    it (the README names the folder the weights live in) means the default file name in that folder."""
    path = cfg.hed_weights or os.environ.get("P2P_HED_WEIGHTS", DEFAULT_HED_WEIGHTS)
    if not storage.is_s3(path) and os.path.isdir(path):
        return os.path.join(path, os.path.basename(DEFAULT_HED_WEIGHTS))
    return path


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
    # A sample's file → (size, time as planned, time as listed): `source_record.same_content_times`.
    files: dict[str, tuple[int, float, float]] = field(default_factory=dict)
    proven: dict[str, str] = field(default_factory=dict)  # file → sha256 it was planned with its old time for
    recorded: dict[str, list[Any]] = field(default_factory=dict)  # the current build's source record


def plan_build(cfg: DatasetBuildConfig) -> SourcePlan:
    """List the source, pair files and give each sample a split. Only the layout's folders are scanned:
    other files (a labels/ folder beside photos, a README) are not inputs of this build, so they are
    counted as ignored rather than quarantined one by one."""
    src = cfg.source
    not_listed: list[tuple[str, str]] = []  # broken links, links to a folder above: quarantined below
    infos = storage.list_file_infos(src.uri, follow_links=True, not_listed=not_listed)
    all_files = [(uri, size) for uri, size, _ in infos]
    # Planned with each sample: a file rewritten in place (same path, same size) is then a new build, and
    # its shard is not reused from an interrupted run, rather than "up to date" with the old pixels. A file
    # only touched (or copied without its times) keeps the time the last build planned: same content.
    recorded = source_record.previous_sources(cfg.output, previous_build(cfg.output))
    modified, proven = source_record.same_content_times(infos, recorded)
    if not all_files:
        raise FileNotFoundError(f"no files under {src.uri}: check source.uri")
    samples: list[dict[str, Any]] = []
    quarantine = [quarantine_record([path], reason) for path, reason in not_listed]
    roots = split_roots(cfg, all_files)
    claimed: set[str] = set()
    folders: list[str] = []

    paired_keys: dict[str, str] = {}  # sample key → the file key it came from
    for split, root in roots:
        under = [(u, s) for u, s in all_files if u.startswith(root.rstrip("/") + "/")]
        if src.layout == "paired":
            a_root, b_root = storage.join(root, src.a_dir), storage.join(root, src.b_dir)
            a_files = [(u, s) for u, s in under if u.startswith(a_root + "/")]
            b_files = [(u, s) for u, s in under if u.startswith(b_root + "/")]
            # Paired by their own names: img.v2.png must not pair with img_v2.png (`sample_key`'s dots).
            a_keys = list_images(a_root, a_files, quarantine, make_key=file_key)
            b_keys = list_images(b_root, b_files, quarantine, make_key=file_key)
            claimed.update(u for u, _ in a_files + b_files)
            folders += [relative_to(a_root, src.uri), relative_to(b_root, src.uri)]
            a_forms, b_forms = by_unicode_form(a_keys, quarantine), by_unicode_form(b_keys, quarantine)
            # For the hint, the unmatched names by case: on Linux Img.png and img.jpg are two names; on the
            # machine the files came from they may have been one.
            a_cased = {f.casefold(): a_keys[k][0] for f, k in a_forms.items() if f not in b_forms}
            b_cased = {f.casefold(): b_keys[k][0] for f, k in b_forms.items() if f not in a_forms}
            for form in sorted(a_forms.keys() | b_forms.keys()):
                if form not in b_forms:
                    hint = case_hint(b_cased.get(form.casefold()), b_root)
                    quarantine.append(
                        quarantine_record(
                            [a_keys[a_forms[form]][0]], f"no matching file in {src.b_dir}/{hint}"
                        )
                    )
                    continue
                if form not in a_forms:
                    hint = case_hint(a_cased.get(form.casefold()), a_root)
                    quarantine.append(
                        quarantine_record(
                            [b_keys[b_forms[form]][0]], f"no matching file in {src.a_dir}/{hint}"
                        )
                    )
                    continue
                key = a_forms[form]  # as the input is named
                (a_uri, a_size), (b_uri, b_size) = a_keys[key], b_keys[b_forms[form]]
                if shard_key(key) in paired_keys:
                    other = paired_keys[shard_key(key)]
                    quarantine.append(
                        quarantine_record(
                            [a_uri, b_uri],
                            f"duplicate key {shard_key(key)!r}: also the pair {other!r} (dots become _)",
                        )
                    )
                    continue
                paired_keys[shard_key(key)] = key
                samples.append(
                    {
                        "key": shard_key(key),
                        "split": split,
                        "a": a_uri,
                        "b": b_uri,
                        "bytes": a_size + b_size,
                        "modified": [modified[a_uri], modified[b_uri]],
                    }
                )
        else:
            photo_root = storage.join(root, src.photos_dir)
            photos = [(u, s) for u, s in under if u.startswith(photo_root.rstrip("/") + "/")]
            claimed.update(u for u, _ in photos)
            folders.append(relative_to(photo_root.rstrip("/"), src.uri) or ".")
            for key, (uri, size) in sorted(list_images(photo_root, photos, quarantine).items()):
                samples.append(
                    {
                        "key": key,
                        "split": split,
                        "a": "",
                        "b": uri,
                        "bytes": size,
                        "modified": [modified[uri]],
                    }
                )

    if not claimed:
        raise FileNotFoundError(
            f"none of the {len(all_files)} files under {src.uri} is in the folders this layout reads "
            f"({', '.join(folders)}): check source.layout and its folder names"
        )
    if not samples:  # a manifest of nothing would only fail later, in training
        reasons = reason_counts(q["reason"] for q in quarantine)[:3]
        raise ValueError(
            f"no sample to build: all {len(claimed)} file(s) in {', '.join(folders)} were refused ("
            + "; ".join(f"{count} × {reason}" for reason, count in reasons)
            + "): check the folder names and files"
        )
    ignored = [uri for uri, _ in all_files if uri not in claimed]  # counted, so nothing goes unaccounted
    for sample in samples:
        if sample["split"] is None:
            # The authors' layout, A/{train,val,test}/ and B/{...}: split folders below the side folders.
            folder = sample["key"].split("/", 1)[0] if "/" in sample["key"] else ""
            own = folder in SPLITS and cfg.source.splits_from_folders
            sample["split"] = folder if own else hash_split(sample["key"], cfg.split)
    listed = {uri: (size, mtime) for uri, size, mtime in infos}
    files = {
        uri: (listed[uri][0], modified[uri], listed[uri][1])
        for sample in samples
        for uri in (sample["a"], sample["b"])
        if uri
    }
    seen = len(all_files) + len(not_listed)
    return SourcePlan(samples, quarantine, seen, ignored, folders, files, proven, recorded)


def check_read_as_planned(plan: SourcePlan, records: list[dict[str, Any]], build_dir: str) -> None:
    """A file planned with its old time because its bytes were the recorded ones must have been read with
    those bytes: one rewritten between the plan and its shard's task (or a shard an interrupted run built
    from other bytes, reused now) would otherwise be built, or stay, under the old identity. Such shards
    are removed, so that the re-run this asks for builds them again."""
    changed = source_record.changed_while_read(plan.proven, records)
    if not changed:
        return
    for r in records:
        if r["kind"] in ("shard", "empty") and set(source_record.read_hashes([r])) & set(changed):
            storage.delete(sidecar_uri(storage.join(build_dir, r["name"])))
            storage.delete(storage.join(build_dir, r["name"]))
    raise storage.StorageError(
        f"{len(changed)} source file(s) changed while the build read them ({printable(changed[0])}"
        f"{', ...' if len(changed) > 1 else ''}): re-run the build (the shards holding them are built again)"
    )


def case_hint(other: str | None, root: str) -> str:
    """For an unmatched file: the other side's file whose name differs from its only in case, if any."""
    return f": it has {relative_to(other, root)}, a name that differs only in case" if other else ""


def shard_size(samples: int, cfg: ShardConfig) -> int:
    """Samples per shard of a split holding `samples`: the configured size, or the auto size."""
    if cfg.samples_per_shard:
        return cfg.samples_per_shard
    return min(AUTO_MAX_SAMPLES, max(AUTO_MIN_SAMPLES, math.ceil(samples / AUTO_SHARDS)))


def shard_order(key: str, cfg: ShardConfig) -> tuple[str, str]:
    """Sort key of a sample within its split. Shuffled: by a seeded hash of the key, so shards mix
    sequences (CamVid, Cityscapes and other video-frame datasets are sorted by sequence; a loader's shuffle
    buffer cannot undo whole shards of one scene) and a re-run gives the same order (reusable shards).
    A hash rather than a permutation of the list: adding a file does not move the others."""
    if not cfg.shuffle:
        return (key, key)
    return (hashlib.sha256(f"{cfg.shuffle_seed}:{key}".encode()).hexdigest(), key)


def plan_shards(samples: list[dict[str, Any]], cfg: ShardConfig) -> list[dict[str, Any]]:
    """Deterministic shards per split: samples in `shard_order`, cut by count or by source megabytes."""
    shards: list[dict[str, Any]] = []
    for split in SPLITS:
        members = sorted(
            (s for s in samples if s["split"] == split), key=lambda s: shard_order(s["key"], cfg)
        )
        per_shard = shard_size(len(members), cfg)
        groups: list[list[dict[str, Any]]] = []
        size = 0
        for sample in members:
            if not groups or (
                len(groups[-1]) >= per_shard if cfg.shard_mb <= 0 else size >= cfg.shard_mb * 1e6
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
    for key in ("output", "num_cpus_per_task", "lock", "keep_replaced_hours"):
        values.pop(key)
    for key in ("hed_actors", "hed_batch_size", "hed_pipeline"):
        values["derive"].pop(key)
    if cfg.derive.builder == "labels" and os.path.isfile(cfg.derive.palette):
        # Its colours, not only its path: an edited palette file is a new build, not "up to date".
        with open(cfg.derive.palette, "rb") as palette:
            values["derive"]["palette_sha256"] = hashlib.sha256(palette.read()).hexdigest()
    return values


def build_id_of(cfg: DatasetBuildConfig, shards: list[dict[str, Any]]) -> str:
    digest = hashlib.sha256(json.dumps([content_config(cfg), shards], sort_keys=True).encode())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# 2. Build shards (Ray tasks / actors)
# ----------------------------------------------------------------------------------------------------------


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A tar with fixed metadata, so the same samples always give the same bytes (and sha256).

    POSIX pax format: a name that does not fit USTAR's 100-byte field (40 CJK characters are 120 bytes
    in UTF-8) or is not ASCII gets a pax ``path`` record, which tarfile, stock webdataset and Ray's
    ``read_webdataset`` all read. Its header is as fixed as the member's (mtime, uid, gid, names are
    constants and no other pax field is written), and short ASCII names get no pax header at all, so their
    shards are byte-identical to the USTAR ones written before.
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tar:
        for name, data in members:
            tar.addfile(_member_info(name, len(data)), io.BytesIO(data))
    return buffer.getvalue()


def _member_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def tar_name_problem(name: str) -> str:
    """Why a member name cannot go into a shard ("" if it can): such a sample is quarantined rather than
    aborting the whole shard (and build) in tar_bytes."""
    why = unsafe_path(name)  # what every shard reader refuses (`pipelines.shards.member_problem`)
    if why:
        return f"name cannot be stored in a shard: {why}"
    try:
        _member_info(name, 0).tobuf(tarfile.PAX_FORMAT, "utf-8", "strict")
    except (ValueError, UnicodeError) as exc:
        return f"name cannot be stored in a tar shard: {exc}"
    return ""


# Resuming: a shard task writes `<split>-<index>.json` beside its tar once the tar is complete. Shards are
# deterministic (fixed plan, fixed tar metadata), so a re-run of the same build id reuses a shard whose tar
# still has the size and sha256 its sidecar recorded, with the quarantine records of that shard, and builds
# only the others. The sidecars are files no manifest lists: finish_build removes them with the other
# leftovers once the manifest is written.
SIDECAR_FORMAT = "p2p-shard/1"


def sidecar_uri(tar_uri: str) -> str:
    return tar_uri.removesuffix(".tar") + ".json"


def plan_digest(plan: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def reusable_shard(tar_uri: str, plan: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The records of a shard an earlier run completed, marked ``reused``; None when it must be built."""
    try:
        sidecar = json.loads(storage.read_bytes(sidecar_uri(tar_uri)))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):  # a sidecar that is not ours: rebuild the shard
        return None
    if not isinstance(sidecar, dict) or sidecar.get("format") != SIDECAR_FORMAT:
        return None
    if sidecar.get("plan") != plan_digest(plan):
        return None
    records = sidecar.get("records")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        return None
    for record in records:
        if record.get("kind") == "shard":
            try:
                data = storage.read_bytes(tar_uri)
            except FileNotFoundError:
                return None
            if len(data) != record.get("bytes") or hashlib.sha256(data).hexdigest() != record.get("sha256"):
                return None
        if record.get("kind") in ("shard", "empty"):
            record["reused"] = True
    return records


class ShardBuilder:
    """Builds whole shards. One instance per Ray actor (HED: loads the network once) or per task."""

    max_member_bytes = DEFAULT_MAX_MEMBER_BYTES  # the training reader's default limit (`pipelines.shards`)

    def __init__(self, config: dict[str, Any], build_dir: str, network: bool = True) -> None:
        from pipelines.config import from_dict

        self.cfg = from_dict(DatasetBuildConfig, config)
        self.build_dir = build_dir
        # Ray reserves num_cpus_per_task cores for this task; OpenCV's own thread pool would otherwise use
        # every core of the node and compete with the other tasks.
        cv2.setNumThreads(max(1, int(self.cfg.num_cpus_per_task)))
        derive = self.cfg.derive
        self.palette = build_palette(derive) if derive.builder == "labels" else None
        # Canny edges and thinned HED edges hold only 0 and 255: stored as 1-bit PNGs (encode_image).
        self.binary_inputs = derive.builder == "canny" or (derive.builder == "hed" and not derive.hed_soft)
        self.hed: Any = None
        if derive.builder == "hed" and network:  # the split pipeline's CPU stages load no network
            from pipelines.dataset.hed import HEDEdgeExtractor

            self.hed = HEDEdgeExtractor(
                hed_weights_path(derive),
                device=actor_device(),
                soft=derive.hed_soft,
                batch_size=derive.hed_batch_size,
            )

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        """Each row of `batch` is a JSON list of shard plans (`task_groups`); one record per shard built,
        reused or emptied, and per quarantined sample."""
        records = [
            json.dumps(record)
            for row in batch["plans"]
            for plan in json.loads(row)
            for record in io_guarded(self.build_shard, plan)
        ]
        return {"record": records}

    # --- per sample -------------------------------------------------------------------------------------

    def load_sample(
        self, sample: dict[str, Any], sources: dict[str, str] | None = None
    ) -> tuple[np.ndarray | None, np.ndarray, dict[str, Any]]:
        """(input or None if derived later, target photo, metadata), resized; BadInput on bad data. The
        sha256 of each file read goes into `sources` (`write_sources`), bad data or not."""
        read = functools.partial(source_record.read_source, sources=sources if sources is not None else {})
        cfg, derive = self.cfg, self.cfg.derive
        meta: dict[str, Any] = {"key": sample["key"], "split": sample["split"], "source": {}}
        # A photo that is the only source (edges and grey derive from it after the resize) may decode at a
        # reduced JPEG scale still above the stored size; a paired input must match its target pixel for
        # pixel, so paired and side-by-side sources decode in full.
        at_least = cfg.resize.size if cfg.source.layout == "photos" and cfg.resize.mode != "native" else 0
        paired = cfg.source.layout == "paired"
        # Both files read (and hashed) before either is decoded: a pair quarantined for its target still
        # has its input recorded, so touching it later does not make a new build.
        target_bytes, input_bytes = read(sample["b"]), read(sample["a"]) if paired else b""
        if paired and not target_bytes and not input_bytes:  # else the reason would name the target alone
            raise BadInput("zero-byte file (the input and the target)")
        with naming_the_file("target", sample["b"], paired):  # a pair's record lists both files
            target, full_size = decode_image_reduced(target_bytes, cfg.max_pixels, cfg.min_side, at_least)
        meta["source"]["target"] = sample["b"]
        source_input: np.ndarray | None = None
        if cfg.source.layout == "side_by_side":
            source_input, target = split_side_by_side(target)
        elif paired:
            meta["source"]["input"] = sample["a"]
            with naming_the_file("input", sample["a"], paired):
                if derive.builder == "labels":
                    source_input = decode_label_mask(input_bytes, sample["a"], cfg.max_pixels)
                else:
                    source_input = decode_image(input_bytes, sample["a"], cfg.max_pixels, cfg.min_side)
        meta["source_size"] = [int(full_size[0]), int(full_size[1])]
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
            ignore = self.palette.ignore_id
            ids = apply_resize(
                source_input, cfg.resize, nearest=True, pad_value=ignore if ignore is not None else 0
            )
            with naming_the_file("input", sample["a"], cfg.source.layout == "paired"):
                colored = colorize_labels(ids, self.palette, derive.label_remap or None)
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
            gray = grayscale(target)
            low, high = derive.canny_low, derive.canny_high
            if low is None or high is None:
                low, high = canny_thresholds(gray, derive.canny_sigma)
            meta["canny"] = {"low": float(low), "high": float(high), "blur": derive.canny_blur}
            inputs.append(
                canny_edges(gray, low, high, derive.canny_sigma, derive.canny_blur, derive.invert_edges)
            )
        return inputs

    # --- per shard --------------------------------------------------------------------------------------

    def build_shard(self, plan: dict[str, Any]) -> list[dict[str, Any]]:
        """The shard's records (its tar and the samples it quarantined), reused from an interrupted run when
        its sidecar proves the tar complete, else built and written (tar first, then the sidecar)."""
        loaded = self.load_shard(plan)
        if isinstance(loaded, list):
            return loaded
        self.derive_shard(loaded)
        return self.write_shard(loaded)

    def load_shard(self, plan: dict[str, Any]) -> LoadedShard | list[dict[str, Any]]:
        """The shard's samples read, decoded and resized (bad ones quarantined), or the records of the
        complete shard an interrupted run left."""
        name = f"{plan['split']}-{plan['index']:06d}.tar"
        tar_uri = storage.join(self.build_dir, name)
        reused = reusable_shard(tar_uri, plan)
        if reused is not None:
            return reused
        shard = LoadedShard(plan, name, tar_uri)
        for sample in plan["samples"]:
            paths = [p for p in (sample["a"], sample["b"]) if p]
            # Only bad data is quarantined. An I/O error (S3 or disk) has already been retried by the
            # storage layer: it propagates and fails this task and the build, before any manifest, so
            # a transient fault can never turn into a sample recorded as unreadable.
            try:
                problem = tar_name_problem(f"{sample['key']}.{self.cfg.shards.input_format}")
                if problem:
                    raise BadInput(problem)
                shard.samples.append((sample, *self.load_sample(sample, shard.sources)))
            except BadInput as exc:
                shard.records.append(quarantine_record(paths, str(exc)))
        return shard

    def derive_shard(self, shard: LoadedShard, finish_later: bool = False) -> None:
        """Fill in the inputs computed from the photos (the HED network runs here, in batches).
        ``finish_later``: thinned HED edges are left for `write_shard` to finish (small components and
        inversion, plain CPU work that a GPU actor need not do)."""
        to_derive = [i for i, (_, inp, _, _) in enumerate(shard.samples) if inp is None]
        if to_derive:
            targets = [shard.samples[i][2] for i in to_derive]
            if finish_later and self.hed is not None and not self.hed.soft:
                derived = self.hed.thinned_edges(targets)
                shard.finish_edges = (self.hed.min_size, self.hed.invert)
            else:
                derived = self.derive_inputs(targets, [shard.samples[i][3] for i in to_derive])
            for i, made in zip(to_derive, derived, strict=True):
                sample, _, target, meta = shard.samples[i]
                shard.samples[i] = (sample, made, target, meta)

    def write_shard(self, shard: LoadedShard) -> list[dict[str, Any]]:
        """Encode, write the tar atomically, then the sidecar that marks it complete; the shard's records."""
        shards = self.cfg.shards
        members: list[tuple[str, bytes]] = []
        records = list(shard.records)
        written = []
        for sample, inp, target, meta in shard.samples:
            assert inp is not None
            if shard.finish_edges is not None:
                inp = finish_edges(inp, *shard.finish_edges)
            meta["size"] = [int(target.shape[0]), int(target.shape[1])]
            meta["builder"] = self.cfg.derive.builder
            encoded = [
                (
                    f"{sample['key']}.input.{shards.input_format}",
                    encode_image(inp, shards.input_format, shards.jpeg_quality, self.binary_inputs),
                ),
                (
                    f"{sample['key']}.target.{shards.target_format}",
                    encode_image(target, shards.target_format, shards.jpeg_quality),
                ),
                (f"{sample['key']}.json", json.dumps(meta, sort_keys=True).encode()),
            ]
            # A member the shard reader refuses would stop every training run at this sample.
            too_large = [(name, len(data)) for name, data in encoded if len(data) > self.max_member_bytes]
            if too_large:
                name, size = too_large[0]
                reason = (
                    f"too large to store: {name.split('.', 1)[1]} encodes to {size:,} bytes, over the shard "
                    f"reader's {self.max_member_bytes:,}-byte member limit: store it smaller (resize.mode, "
                    "resize.size) or as JPEG (shards.input_format, shards.target_format)"
                )
                records.append(quarantine_record([p for p in (sample["a"], sample["b"]) if p], reason))
                continue
            members += encoded
            written.append(sample)
        if written:
            data = tar_bytes(members)
            storage.write_bytes_atomic(shard.tar_uri, data)
            records.append(
                {
                    "kind": "shard",
                    "split": shard.plan["split"],
                    "name": shard.name,
                    "samples": len(written),
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "files": sum(1 + bool(s["a"]) for s in written),
                    "sources": shard.sources,
                }
            )
        else:  # every sample quarantined: no tar, but the driver's progress still counts the shard as done
            records.append(
                {"kind": "empty", "split": shard.plan["split"], "name": shard.name, "sources": shard.sources}
            )
        # After the tar, atomically: a sidecar present means its tar is complete (and re-hashed on reuse).
        sidecar = {"format": SIDECAR_FORMAT, "plan": plan_digest(shard.plan), "records": records}
        storage.write_bytes_atomic(sidecar_uri(shard.tar_uri), json.dumps(sidecar, sort_keys=True).encode())
        return records


@dataclass
class LoadedShard:
    """A shard between reading and writing: its samples as (sample plan, input or None until derived,
    target, metadata), resized, and the records of the samples it quarantined. The split HED pipeline hands
    it from stage to stage (pickled: it only ever holds what our own tasks decoded)."""

    plan: dict[str, Any]
    name: str
    tar_uri: str
    samples: list[tuple[dict[str, Any], np.ndarray | None, np.ndarray, dict[str, Any]]] = field(
        default_factory=list
    )
    records: list[dict[str, Any]] = field(default_factory=list)
    finish_edges: tuple[int, bool] | None = None  # the inputs are thinned HED edges: (min_size, invert)
    sources: dict[str, str] = field(default_factory=dict)  # sha256 of each source file read


def io_guarded(fn: Any, *args: Any) -> list[dict[str, Any]]:
    """``fn(*args)``'s records (:func:`tag_node`), or one :func:`io_error_record`."""
    try:
        records: list[dict[str, Any]] = fn(*args)
    except (OSError, storage.StorageError) as exc:
        return [io_error_record(exc)]
    return tag_node(records)


def io_error_record(exc: BaseException) -> dict[str, Any]:
    """A lasting I/O failure (the storage clients already retried), handed to the driver as a record, which
    fails the build: an exception crossing Ray loses its cause chain and could no longer be told apart from
    a bug."""
    return {"kind": "io_error", "reason": one_line(exc)}


def tag_node(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Shard records marked with this node: the driver reports how the work spread over nodes."""
    node = node_id()
    return [{**r, "node": node} if r["kind"] in ("shard", "empty") else r for r in records]


def load_stage(batch: dict[str, Any], config: dict[str, Any], build_dir: str) -> dict[str, list[bytes]]:
    """The split HED pipeline's first CPU task: each shard of the batch loaded (`LoadedShard`), or the
    records of a reused shard or of an I/O error, which pass down the pipeline unchanged."""
    builder = ShardBuilder(config, build_dir, network=False)
    out = []
    for plan in (plan for row in batch["plans"] for plan in json.loads(row)):
        try:
            loaded: LoadedShard | list[dict[str, Any]] = builder.load_shard(plan)
        except (OSError, storage.StorageError) as exc:
            loaded = [io_error_record(exc)]
        out.append(pickle.dumps(loaded, protocol=5))
    return {"shard": out}


def write_stage(batch: dict[str, Any], config: dict[str, Any], build_dir: str) -> dict[str, list[str]]:
    """The split HED pipeline's last CPU task: shards finished, encoded and written; their records."""
    builder = ShardBuilder(config, build_dir, network=False)
    records = []
    for blob in batch["shard"]:
        shard = pickle.loads(blob)
        records += (
            io_guarded(builder.write_shard, shard) if isinstance(shard, LoadedShard) else tag_node(shard)
        )
    return {"record": [json.dumps(r) for r in records]}


class HEDStage:
    """The split HED pipeline's actor: the network and its post-processing on shards that CPU tasks
    decoded (`load_stage`) and will encode and write (`write_stage`)."""

    def __init__(self, config: dict[str, Any], build_dir: str) -> None:
        self.builder = ShardBuilder(config, build_dir)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[bytes]]:
        out = []
        for blob in batch["shard"]:
            shard = pickle.loads(blob)
            if isinstance(shard, LoadedShard):
                self.builder.derive_shard(shard, finish_later=True)
            out.append(pickle.dumps(shard, protocol=5))
        return {"shard": out}


class BuildProgress:
    """One driver-side progress line: shards done/total, samples, images/s, ETA. Printed per shard on small
    builds and at most every `every_s` seconds on large ones, so a log stays readable either way (printing
    in the workers gave one line per shard, interleaved with Ray's own output)."""

    def __init__(self, shards: int, samples: int, every_s: float = 5.0, per_shard_up_to: int = 20) -> None:
        self.shards, self.samples = shards, samples
        self.every_s = 0.0 if shards <= per_shard_up_to else every_s
        self.started = self.printed = time.perf_counter()
        self.shards_done = self.written = self.quarantined = self.reused = 0
        self.built = 0  # samples of shards built by this run (the pace), not found done
        self.nodes: dict[str, int] = {}  # node id -> shards built there
        self.pace = Pace()
        self.rate: float | None = None

    def add(self, record: dict[str, Any]) -> None:
        self.reused += bool(record.get("reused"))
        if "node" in record and not record.get("reused"):  # where shards were built, not found done
            self.nodes[record["node"]] = self.nodes.get(record["node"], 0) + 1
        if record["kind"] == "shard":
            self.shards_done += 1
            self.written += record["samples"]
            self.built += 0 if record.get("reused") else record["samples"]
            self.maybe_print()
        elif record["kind"] == "quarantine":
            self.quarantined += 1
        elif record["kind"] == "empty":  # every sample of the shard was quarantined: no tar
            self.shards_done += 1
            self.maybe_print()

    def maybe_print(self) -> None:
        now = time.perf_counter()
        self.rate = self.pace.update(now, self.built + self.quarantined)
        if self.shards_done == self.shards or now - self.printed >= self.every_s:
            self.printed = now
            print("[build] " + self.line(now), flush=True)

    def nodes_line(self) -> str:
        """Where the shards were built: `shard tasks ran on 2 node(s): 1a2b3c4d x3, 5e6f7a8b x3`."""
        spread = ", ".join(f"{node[:8] or '?'} x{n}" for node, n in sorted(self.nodes.items()))
        return f"shard tasks ran on {len(self.nodes)} node(s): {spread}"

    def line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        processed = self.written + self.quarantined
        # The whole build's rate at the end; the current pace on the way (`Pace`).
        rate = processed / elapsed if self.shards_done == self.shards else self.rate or 0.0
        left = (self.samples - processed) / rate if rate > 0 else float("inf")
        eta = "--:--" if left == float("inf") else f"{int(left) // 60}:{int(left) % 60:02d}"
        quarantined = f" ({self.quarantined} quarantined)" if self.quarantined else ""
        return (
            f"shards {self.shards_done}/{self.shards}, samples {self.written}/{self.samples}{quarantined}, "
            f"{rate_text(rate)} images/s, ETA {eta}"
        )


TASKS_PER_CPU = 4


def task_groups(shards: list[dict[str, Any]], tasks: int) -> list[list[dict[str, Any]]]:
    """The shards dealt into at most `tasks` groups of similar sample counts (largest shard first, onto the
    lightest group). A Ray Data task costs about 30 ms of scheduling and block conversion here, as much as
    building 15 Canny samples, so small shards share a task; a few tasks per CPU still balance the load."""
    groups: list[list[dict[str, Any]]] = [[] for _ in range(max(1, min(tasks, len(shards))))]
    loads = [0] * len(groups)
    for shard in sorted(shards, key=lambda s: -len(s["samples"])):
        lightest = loads.index(min(loads))
        groups[lightest].append(shard)
        loads[lightest] += len(shard["samples"])
    return [group for group in groups if group]


def warm_up_workers(tasks: int, num_cpus: float) -> None:
    """Send up to `tasks` tasks that import what a shard task needs to this node's workers, without waiting
    for them. Ray starts a worker per CPU, but Ray Data's first job on a cluster gives two of them to its
    own actors, and a worker then spends about a second importing Ray Data before its first task: warmed
    now, the workers do that while the driver starts the executor (5,000-image build on 2 CPUs, fresh
    cluster: 654 → 693 images/s, mean of 3). Only this node: a warm-up holds its CPU for that second, and
    on another node it kept that node out of a small build altogether (its CPU busy warming up while this
    node's took every task)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def warm_up() -> None:
        import ray.data  # noqa: F401

        import pipelines.dataset.build  # noqa: F401

    here = ray.get_runtime_context().get_node_id()
    cpus = next((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["NodeID"] == here), 0.0)
    task = ray.remote(warm_up).options(
        num_cpus=num_cpus, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)
    )
    for _ in range(min(tasks, int(cpus // num_cpus))):
        task.remote()


@contextlib.contextmanager
def one_operator_context() -> Iterator[None]:
    """Datasets created inside run without Ray Data's per-operator resource reservation. It keeps a share
    of the cluster for each operator of a pipeline; with one operator it only holds tasks back: on 2 CPUs
    the second task started a second after the first and each next one 0.15 s after a task ended, and a
    5,000-image Canny build ran at 762 images/s with it and 980 without (warm cluster, mean of 3). A Dataset
    copies the context when it is created, so the setting stays with it after the block."""
    import ray.data

    context = ray.data.DataContext.get_current()
    saved = context.op_resource_reservation_enabled
    context.op_resource_reservation_enabled = False
    try:
        yield
    finally:
        context.op_resource_reservation_enabled = saved


def build_shards(
    cfg: DatasetBuildConfig, shards: list[dict[str, Any]], build_dir: str
) -> list[dict[str, Any]]:
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    # Our own progress line replaces Ray Data's bars (one per operator, redrawn in place, which a log file
    # or a CI console shows as noise).
    quiet_ray_data()
    config = dataclasses.asdict(cfg)

    def dataset_of(groups: list[list[dict[str, Any]]]) -> Any:
        rows = [{"plans": json.dumps(group)} for group in groups]
        return ray.data.from_items(rows, override_num_blocks=len(groups))

    # Workers read S3 settings from their own environment (inherited from the driver on a local cluster,
    # node credentials or instance roles on a real one): never through runtime_env, which Ray logs.
    cpu_slots = int(ray.cluster_resources().get("CPU", 1) // cfg.num_cpus_per_task)
    if cfg.derive.builder == "hed":
        gpus = cluster_gpus()
        split = cfg.derive.hed_pipeline == "split" or (cfg.derive.hed_pipeline == "auto" and gpus > 0)
        # One actor per GPU. Without GPUs: fused, one per CPU slot (each HED network on its own core, the
        # network being most of the work there); split, one CPU slot left for the decode and write tasks.
        actors = cfg.derive.hed_actors or (gpus if gpus else max(1, cpu_slots - split))
        if split and not gpus and actors >= cpu_slots:
            # CPU actors holding every slot would starve the decode tasks the actors wait for.
            print(
                f"[build] derive.hed_pipeline=split needs a CPU slot beside its {actors} HED actor(s) and "
                f"this cluster has {cpu_slots}: building fused instead",
                flush=True,
            )
            split = False
        resources = {"num_gpus": 1} if gpus else {"num_cpus": cfg.num_cpus_per_task}
        # One shard per row: the network is loaded once per actor, so a call costs little, and the
        # progress line moves per shard.
        rows = dataset_of([[shard] for shard in shards])
        compute = ActorPoolStrategy(size=min(actors, len(shards)))
        constructor = {"config": config, "build_dir": build_dir}
        if split:
            # A GPU actor that also decoded, post-processed on the CPU and encoded would keep its GPU
            # idle most of the time: CPU tasks on either side do that work.
            cpu_task = {
                "fn_kwargs": constructor,
                "batch_size": 1,
                "compute": TaskPoolStrategy(),
                "num_cpus": cfg.num_cpus_per_task,
            }
            out = (
                # Ray Data would fuse a task into the actor after it when their resources match (CPU-only
                # clusters): a `ray_remote_args_fn` (adding nothing) keeps the decode in its own tasks.
                rows.map_batches(load_stage, ray_remote_args_fn=dict, **cpu_task)
                .map_batches(
                    HEDStage, fn_constructor_kwargs=constructor, batch_size=1, compute=compute, **resources
                )
                .map_batches(write_stage, **cpu_task)
            )
        else:
            out = rows.map_batches(
                ShardBuilder, fn_constructor_kwargs=constructor, batch_size=1, compute=compute, **resources
            )
    else:

        def build(batch: dict[str, Any]) -> dict[str, list[str]]:
            return ShardBuilder(config, build_dir)(batch)

        groups = task_groups(shards, TASKS_PER_CPU * max(1, cpu_slots))
        warm_up_workers(min(cpu_slots, len(groups)), cfg.num_cpus_per_task)
        with one_operator_context():
            out = dataset_of(groups).map_batches(
                build, batch_size=1, compute=TaskPoolStrategy(), num_cpus=cfg.num_cpus_per_task
            )
    progress = BuildProgress(len(shards), sum(len(s["samples"]) for s in shards))
    records = []
    try:
        for row in out.iter_rows():  # streams: each shard's records arrive as soon as its task ends
            record = json.loads(row["record"])
            if record["kind"] == "io_error" and record["reason"].endswith(source_record.SOURCE_GONE):
                raise storage.StorageError(
                    f"{record['reason']}; no manifest was written: re-run the build (completed shards are "
                    "reused)"
                )
            if record["kind"] == "io_error":
                raise storage.StorageError(
                    f"a shard task failed on I/O and no manifest was written: {record['reason']}; re-run "
                    "the build when storage is back (completed shards are reused)"
                )
            progress.add(record)
            records.append(record)  # "empty" ones too: the files they read go into the source record
    except storage.StorageError:
        raise
    except Exception as exc:
        cause = storage.find_io_error(exc)
        if cause is None:
            raise
        raise storage.StorageError(
            f"a shard task failed on I/O and no manifest was written: {one_line(cause)}; re-run the build "
            "when storage is back (completed shards are reused)"
        ) from exc
    print(f"[build] reused {progress.reused}, built {len(shards) - progress.reused} shard(s)", flush=True)
    if progress.nodes:
        print("[build] " + progress.nodes_line(), flush=True)
    return records


def one_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# ----------------------------------------------------------------------------------------------------------
# 3. Finish: reconcile, manifest, clean up
# ----------------------------------------------------------------------------------------------------------


def is_io_reason(reason: str) -> bool:
    """A quarantine reason that older builds wrote for I/O errors (``unreadable: <OSError>``); an
    unreadable file *name* is bad input and stays quarantined."""
    return reason.startswith("unreadable: ")


REPLACED_MARKER = "REPLACED.json"  # in a replaced build's folder: when, and by which build


def mark_replaced(output: str, previous: str | None, build_id: str) -> None:
    """Record in the folder of the build a new manifest replaced when that happened, which starts its
    `keep_replaced_hours` (its shards' own times say when it was built, not until when it was read)."""
    if previous and previous != build_id and storage.exists(storage.join(output, "shards", previous)):
        marker = {"replaced_at": time.time(), "by": build_id}
        storage.write_bytes_atomic(
            storage.join(output, "shards", previous, REPLACED_MARKER), json.dumps(marker).encode()
        )


def keep_replaced_manifest(output: str, previous: str | None, build_id: str) -> None:
    """Copy the manifest about to be replaced to `replaced_manifest_uri`, so that a run started on that build
    can still be resumed while its shards are kept (`keep_replaced_hours`); removed with them."""
    if previous and previous != build_id and storage.exists(storage.join(output, "shards", previous)):
        storage.write_bytes_atomic(
            replaced_manifest_uri(output, previous), storage.read_bytes(manifest_uri(output))
        )


def remove_other_builds(
    output: str, build_id: str, listed: set[str], keep_replaced_s: float = 0.0
) -> tuple[list[str], list[str], list[str]]:
    """Delete the folders of other builds, and any file of this build that the manifest does not list
    (sidecars, temp files of killed tasks). Called under the build lock, after the current manifest.

    Keeps a build that a manifest replaced less than ``keep_replaced_s`` ago (`mark_replaced`): jobs that
    read its manifest before the replacement stream its shards by path, epoch after epoch, and would
    fail on the next one. Never deletes another build's folder holding a file not older than the current
    manifest (by the storage's own clock): with the lock nothing can be written there meanwhile, so such
    a folder is the resumable work of a later, interrupted build (or of a writer that ignored the lock),
    not an orphan. Returns (removed, kept as interrupted, kept as recently replaced)."""
    try:
        current = storage.modified_time(manifest_uri(output))
    except FileNotFoundError:
        return [], [], []
    by_folder: dict[str, list[tuple[str, float]]] = {}
    for uri, _, mtime in storage.list_file_infos(storage.join(output, "shards"), include_temp=True):
        by_folder.setdefault(relative_to(uri, output).split("/")[1], []).append((uri, mtime))
    removed, kept, recent = [], [], []
    # A copy of the current build's manifest kept when it was replaced earlier (A, B, then A again), or
    # left by a build killed between keeping the manifest and replacing it: not a replaced build.
    storage.delete(replaced_manifest_uri(output, build_id))
    for folder, files in sorted(by_folder.items()):
        if folder != build_id:
            marker = storage.join(output, "shards", folder, REPLACED_MARKER)
            if any(uri == marker for uri, _ in files):
                try:
                    replaced_at = float(json.loads(storage.read_bytes(marker))["replaced_at"])
                except (ValueError, KeyError, TypeError):
                    replaced_at = 0.0  # unreadable: as if replaced long ago
                if time.time() - replaced_at < keep_replaced_s:
                    recent.append(f"shards/{folder}/")
                    continue
            elif max(mtime for _, mtime in files) >= current:
                kept.append(f"shards/{folder}/")
                continue
            # The manifest first: one left without its shards would name a build nobody can read.
            storage.delete(replaced_manifest_uri(output, folder))
            storage.delete(storage.join(output, "shards", folder))
            removed.append(f"shards/{folder}/")
            continue
        for uri, _ in files:
            if relative_to(uri, output) not in listed and uri != source_record.sources_uri(output, build_id):
                storage.delete(uri)
                removed.append(relative_to(uri, output))
    return removed, kept, recent


def clean_up(output: str, manifest: Manifest, keep_replaced_hours: float = 0.0) -> None:
    listed = {s.path for s in manifest.shards()}
    removed, kept, recent = remove_other_builds(output, manifest.build_id, listed, keep_replaced_hours * 3600)
    if recent:
        print(
            f"[build] kept {', '.join(recent)}: replaced less than {keep_replaced_hours:g} h ago, for jobs "
            "still reading it and runs to resume on it (keep_replaced_hours)",
            flush=True,
        )
    # This build's own sidecars go every time (the manifest now holds their records): not worth a line.
    others = [path for path in removed if not path.endswith(".json")]
    if others:
        print(f"[build] removed {len(others)} leftover(s) of other or interrupted builds", flush=True)
    if kept:
        print(
            f"[build] kept {', '.join(kept)}: written after the current manifest (an interrupted newer "
            "build: re-run it to resume)",
            flush=True,
        )


def finish_build(
    cfg: DatasetBuildConfig,
    build_id: str,
    records: list[dict[str, Any]],
    plan: SourcePlan,
    seconds: float,
    lock: BuildLock | None = None,
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
    io_reasons = [q for q in quarantine if is_io_reason(q["reason"])]
    if io_reasons:  # build_shard never records these; a manifest must never hold one
        raise RuntimeError(f"I/O errors recorded as quarantine: {io_reasons[:3]}")
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
        palette=build_palette(cfg.derive).to_dict() if cfg.derive.builder == "labels" else None,
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
    if lock is not None:
        lock.check()  # still ours: nobody broke it and started writing meanwhile
    source_record.write_sources(cfg.output, build_id, plan.files, records)
    previous = previous_build(cfg.output)
    # The replaced build is marked before the manifest is: once that is written the build has happened,
    # and a failure after it (the storage going down) must neither fail the command nor leave the old
    # build unprotected from the next clean-up. (A build failing in between leaves a marker on the build
    # still current, which its next clean-up deletes as an unlisted file.)
    keep_replaced_manifest(cfg.output, previous, build_id)
    mark_replaced(cfg.output, previous, build_id)
    write_manifest(cfg.output, manifest)  # last: until now, readers still see the previous build
    try:
        clean_up(cfg.output, manifest, cfg.keep_replaced_hours)
    except (OSError, storage.StorageError) as exc:
        print(
            f"[build] dataset {build_id} is written; cleaning up after it failed ({one_line(exc)}): the next "
            "build of this output does it",
            flush=True,
        )
    return manifest


def previous_build(output: str) -> str | None:
    """The build id of the manifest at ``output``, None if there is none (or none this code can read)."""
    try:
        return Manifest.read(output).build_id
    except ManifestError:
        return None


def up_to_date(cfg: DatasetBuildConfig, build_id: str) -> Manifest | None:
    """The existing manifest if it is this very build and every shard it lists is present."""
    try:
        manifest = Manifest.read(cfg.output)
    except ManifestError:  # none yet, or one this code cannot trust: build
        return None
    if manifest.build_id != build_id:
        return None
    if any(is_io_reason(q.reason) for q in manifest.quarantine):
        # written before I/O errors were retried and failed the build: those samples are not bad data
        print("[build] the manifest quarantined samples for I/O errors: rebuilding them", flush=True)
        return None
    present = dict(storage.list_file_sizes(storage.join(cfg.output, "shards", build_id)))
    for shard in manifest.shards():
        if present.get(storage.join(cfg.output, shard.path)) != shard.bytes:
            return None
    return manifest


def run_build(cfg: DatasetBuildConfig) -> Manifest:
    cfg.validate()
    if cfg.derive.builder == "labels":  # a missing or malformed palette fails here, not in every task
        palette = build_palette(cfg.derive)
        if cfg.resize.mode == "pad" and palette.ignore_id is None and 0 not in palette.colors:
            raise ValueError(
                f"resize mode pad fills label maps with class 0, which the palette {cfg.derive.palette} "
                "lacks: set derive.ignore_id (the void class) or another resize mode"
            )
    cfg.source.uri, cfg.output = storage.normalize_uri(cfg.source.uri), storage.normalize_uri(cfg.output)
    if storage.overlap(cfg.source.uri, cfg.output):
        # Its lock, shards and manifest would be listed as source files and quarantined, more each build.
        raise ConfigError(
            f"OUTPUT {cfg.output} and SOURCE {cfg.source.uri} overlap: write the dataset to a folder outside "
            "the source (and not containing it)"
        )
    storage.preflight(cfg.source.uri, write=False)
    if cfg.derive.builder == "hed" and not storage.exists(hed_weights_path(cfg.derive)):
        from pipelines.dataset.hed import WEIGHTS_HINT

        raise FileNotFoundError(f"HED weights not found at {hed_weights_path(cfg.derive)}. {WEIGHTS_HINT}")
    # One writer per output, from listing to clean-up.
    with storage.output_folder(cfg.output), BuildLock(cfg.output, cfg.lock) as lock:
        return _run_locked_build(cfg, lock)


def _run_locked_build(cfg: DatasetBuildConfig, lock: BuildLock) -> Manifest:
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
        source_record.refresh_sources(cfg.output, build_id, plan.files, plan.recorded)
        clean_up(cfg.output, existing, cfg.keep_replaced_hours)
        return existing
    init_ray()
    build_dir = storage.join(cfg.output, "shards", build_id)
    records = build_shards(cfg, shards, build_dir) if shards else []
    check_read_as_planned(plan, records, build_dir)
    manifest = finish_build(cfg, build_id, records, plan, time.perf_counter() - start, lock)
    print("[build] " + summarize(manifest), flush=True)
    return manifest
