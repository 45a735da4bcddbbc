"""`p2p translate MODEL_URI INPUT OUTPUT`: batch inference as a Ray Data job.

INPUT is a folder or s3:// prefix of input images, or a dataset manifest with `--split` (its stored
inputs). Each image gets the model's recorded preprocessing (`pipelines.preprocessing`: channels, the
eval geometry of its preprocess mode, nearest for label maps, [-1, 1]) exactly as `p2p evaluate` prepares
it, goes through the generator in batches on an actor pool (one GPU per actor when the cluster has GPUs),
and is written as OUTPUT/<key>.png, keeping the input's key (its
path below INPUT). Bad inputs are quarantined with a reason in OUTPUT/translate_report.json, and the job
checks that translated + quarantined = inputs seen.

Output size: `resolution: model` (the default) translates at the size the model was trained at, and
`output_size: source` then resizes that output back to each input's size (bicubic: an upscaled picture,
no new detail). `resolution: native` translates each image at its own size instead (reflect-padded to a
size the generator takes, cropped back: `pix2pix.inference.translate_native`), so a 480×360 frame comes
back at 480×360 with detail at that resolution; `tile_size` translates large images in overlapping,
cross-faded tiles to bound memory. Images of one size share generator calls of `batch_size` (images, or
tiles when tiling).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import sys
import time
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
import torch

from pipelines import storage
from pipelines.config import ConfigError, option
from pipelines.dataset.lock import LOCK_NAME, BuildLock, LockConfig
from pipelines.images import BadInput, decode_image, decode_label_mask, encode_image
from pipelines.listing import file_key, list_images, quarantine_record, reason_counts
from pipelines.manifest import Manifest, dataset_root, printable, shard_uris
from pipelines.preprocessing import Preprocessing, to_image
from pipelines.progress import Progress, quiet_ray_data
from pipelines.registry import tracking
from pipelines.registry.models import (
    DEFAULT_TILE_OVERLAP,
    NORM_STATS_HELP,
    TILE_OVERLAP_HELP,
    TILE_SIZE_HELP,
    check_inference_options,
    load_model,
    resolve_registry,
)
from pipelines.runtime import actor_device, cluster_gpus
from pipelines.shards import ShardFault, read_members, split_name

REPORT_NAME = "translate_report.json"


@dataclass
class TranslateConfig:
    model_uri: str = option("", "e.g. models:/NAME@champion, runs:/ID/generator, or a checkpoint")
    input: str = option("", "folder or s3:// prefix of images, or a dataset with --split")
    output: str = option("", "folder or s3:// prefix for the translated PNGs")
    split: str = option("", "INPUT is a dataset: translate this split's inputs")
    batch_size: int = option(8, "images (or tiles, when tiling) per generator call")
    actors: int = option(0, "model replicas (0: one per GPU, or 1 on a CPU-only cluster)")
    resolution: Literal["model", "native"] = option(
        "model",
        "model: translate at the size the model was trained at (its preprocess mode and crop size); "
        "native: each image at its own size (channels converted, nothing resized: label maps stay exact), "
        "reflect-padded to a size the generator takes and cropped back",
    )
    tile_size: int = option(0, TILE_SIZE_HELP)
    tile_overlap: int = option(DEFAULT_TILE_OVERLAP, TILE_OVERLAP_HELP)
    output_size: Literal["model", "source"] = option(
        "model",
        "with resolution model: model writes the model's crop size, source resizes that output back to "
        "each input's size (bicubic); with resolution native the output has the input's size already",
    )
    keep_dropout: bool = option(
        False, "sample dropout at test time (the paper's noise): outputs vary per call"
    )
    norm_stats: Literal["running", "per_image"] = option("running", NORM_STATS_HELP)
    class_ids: bool = option(
        False,
        "INPUT holds raw class-id masks (as CamVid and Cityscapes ship them): a labels model colours each "
        "with its dataset's palette, recorded with the model, as the dataset build did",
    )
    tracking_uri: str = option("", tracking.URI_HELP)

    def validate(self) -> None:
        for name in ("model_uri", "input", "output"):
            if not getattr(self, name):
                raise ConfigError(f"give {name.upper()}: p2p translate MODEL_URI INPUT OUTPUT")
        if self.batch_size < 1 or self.actors < 0:
            raise ConfigError("batch_size must be >= 1 and actors >= 0")
        if self.class_ids and self.split:
            raise ConfigError(
                "--class-ids colours a folder of raw masks; a dataset's inputs are coloured already"
            )
        check_inference_options(self.resolution, self.tile_size, self.tile_overlap, self.norm_stats)


def list_inputs(cfg: TranslateConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Work items (one per image file, or one per shard of a manifest split) and early quarantine."""
    if cfg.split:
        manifest = Manifest.read(cfg.input)
        uris = shard_uris(cfg.input, manifest, cfg.split)
        return [
            {"kind": "shard", "uri": uri, "samples": e.samples, "bytes": e.bytes, "sha256": e.sha256}
            for uri, e in zip(uris, manifest.shards(cfg.split), strict=True)
        ], []
    quarantine: list[dict[str, Any]] = []
    root = storage.normalize_uri(cfg.input)
    # Keys keep their dots here (they name output files). Two inputs with one key (img.png, img.jpg) would
    # write one output: neither is translated, rather than one chosen by the order of their names.
    not_listed: list[tuple[str, str]] = []
    files = [
        (u, size) for u, size, _ in storage.list_file_infos(root, follow_links=True, not_listed=not_listed)
    ]
    quarantine += [quarantine_record([path], reason) for path, reason in not_listed]
    images = list_images(root, files, quarantine, make_key=file_key, keep_first=False)
    items = [{"kind": "file", "uri": uri, "key": key} for key, (uri, _) in sorted(images.items())]
    if not items and not quarantine:
        raise FileNotFoundError(f"no files under {cfg.input}")
    return items, quarantine


def pinned_uri(uri: str, tracking_uri: str) -> str:
    """``models:/NAME@ALIAS`` and ``models:/NAME[/latest]`` as the version they name now: each actor loads
    the model itself (and again when Ray restarts it), and a promotion or registration during the job
    would otherwise give one output folder two models' images. Other URIs as given."""
    if uri.startswith(("models:/", "runs:/")):
        tracking.check_store_exists(tracking_uri)
    name, version = resolve_registry(uri, tracking.client(tracking_uri))
    return f"models:/{name}/{version}" if name and version else uri


def colour_class_ids(ids: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    """A raw class-id mask as the label map a labels model was trained on: the recorded remap, then the
    recorded palette (an id the palette lacks is bad input, named)."""
    from pipelines.dataset.derive import Palette, colorize_labels

    assert preprocessing.palette is not None  # checked before any actor starts (`translate`)
    remap = {int(k): int(v) for k, v in (preprocessing.label_remap or {}).items()}
    return colorize_labels(ids, Palette.from_classes_json(preprocessing.palette), remap or None)


class Translator:
    """One per Ray actor: loads the model once, translates whole work items in batches."""

    def __init__(self, config: dict[str, Any]) -> None:

        self.cfg = TranslateConfig(**config)
        self.cfg.tracking_uri = tracking.on_worker(self.cfg.tracking_uri)
        self.device = actor_device()
        self.model = load_model(self.cfg.model_uri, self.cfg.tracking_uri, self.device).with_norm_stats(
            self.cfg.norm_stats
        )
        if self.cfg.keep_dropout and isinstance(self.model.generator, torch.nn.Module):
            from pix2pix.inference import set_dropout

            set_dropout(self.model.generator, True)

    def prepare(self, data: bytes, name: str) -> tuple[torch.Tensor, tuple[int, int]]:
        """Decoded and prepared exactly as evaluation prepares inputs (`Preprocessing.input_tensor`); a
        raw class-id mask (`class_ids`) coloured first, as the dataset build coloured it."""
        if self.cfg.class_ids:
            image = colour_class_ids(decode_label_mask(data, name), self.model.preprocessing)
        else:
            image = decode_image(data, name)
            mismatch = self.model.preprocessing.input_mismatch(image)
            if mismatch:
                raise BadInput(mismatch)
        tensor = self.model.preprocessing.input_tensor(image, self.cfg.resolution)
        return tensor, (int(image.shape[0]), int(image.shape[1]))

    def run(self, inputs: list[torch.Tensor]) -> list[np.ndarray]:
        """Outputs of inputs of one size, at that size (`LoadedModel.translate`)."""
        cfg = self.cfg
        with torch.no_grad():
            batch = torch.stack(inputs).to(self.device)
            out = self.model.translate(batch, cfg.tile_size, cfg.tile_overlap, cfg.batch_size)
        return [to_image(o) for o in out]

    def batches(
        self, pending: list[tuple[str, str, torch.Tensor, tuple[int, int]]]
    ) -> list[list[tuple[str, str, torch.Tensor, tuple[int, int]]]]:
        """`pending` in batches of at most `batch_size` inputs of one size (native inputs differ in size)."""
        by_size: dict[tuple[int, ...], list[tuple[str, str, torch.Tensor, tuple[int, int]]]] = {}
        for entry in pending:
            by_size.setdefault(tuple(entry[2].shape), []).append(entry)
        size = self.cfg.batch_size
        return [group[i : i + size] for group in by_size.values() for i in range(0, len(group), size)]

    def samples(self, item: dict[str, Any]) -> list[tuple[str, str, bytes | None, str, int]]:
        """(key, source path, bytes or None, reason, samples accounted for) for every input of one item.

        A shard is checked against the manifest (size, sha256) before anything in it is used: if it
        differs, all its samples are quarantined in one record. Then its members go through
        `pipelines.shards.read_members`: a link, device, unsafe name or oversized member is quarantined
        alone; an archive that cannot be read on quarantines the samples it still owed."""
        # No try around the read: an I/O error has been retried by the storage layer; it fails the job.
        data = storage.read_bytes(item["uri"])
        if item["kind"] == "file":
            return [(item["key"], item["uri"], data, "", 1)]
        uri, expected = item["uri"], int(item["samples"])
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != item["bytes"] or digest != item["sha256"]:
            reason = (
                f"shard differs from the manifest ({len(data)} bytes, {item['bytes']} listed; "
                f"sha256 {digest[:16]}…)"
            )
            return [("", uri, None, reason, expected)]
        found: list[tuple[str, str, bytes | None, str, int]] = []
        try:
            for member in read_members(io.BytesIO(data)):
                if member.problem:
                    counts = 1 if ".input." in member.name else 0  # a sample is counted by its input
                    found.append(("", f"{uri}#{member.name}", None, member.problem, counts))
                    continue
                key, suffix = split_name(member.name)
                if suffix.startswith("input."):
                    found.append((key, f"{uri}#{member.name}", member.data, "", 1))
        except ShardFault as exc:
            missing = expected - sum(f[4] for f in found)
            if missing > 0:
                found.append(("", uri, None, f"unreadable shard: {exc}", missing))
            return found
        missing = expected - sum(f[4] for f in found)
        if missing:  # only a shard crafted to match a crafted manifest gets here
            found.append(("", uri, None, f"shard holds {-missing:+d} samples against the manifest", missing))
        return found

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        records: list[dict[str, Any]] = []
        pending: list[tuple[str, str, torch.Tensor, tuple[int, int]]] = []
        for raw in batch["item"]:
            for key, source, data, reason, count in self.samples(json.loads(raw)):
                if data is None:
                    records.append({**quarantine_record([source], reason), "samples": count})
                    continue
                try:
                    image, size = self.prepare(data, source)
                except BadInput as exc:
                    records.append(quarantine_record([source], str(exc)))
                    continue
                pending.append((key, source, image, size))
        for chunk in self.batches(pending):
            for (key, source, _, size), output in zip(chunk, self.run([c[2] for c in chunk]), strict=True):
                if self.cfg.output_size == "source" and output.shape[:2] != size:
                    output = cv2.resize(output, (size[1], size[0]), interpolation=cv2.INTER_CUBIC)
                storage.write_bytes_atomic(
                    storage.join(self.cfg.output, f"{key}.png"), encode_image(output, "png")
                )
                records.append({"kind": "translated", "key": key, "source": source})
        return {"record": [json.dumps(r) for r in records]}


def actor_config(cfg: TranslateConfig) -> dict[str, Any]:
    """What every Translator actor receives (constructor arguments, which Ray may log): the config with the
    tracking URI stripped of credentials (see `tracking.for_workers`)."""
    return {**dataclasses.asdict(cfg), "tracking_uri": tracking.for_workers(cfg.tracking_uri)}


def expected_inputs(cfg: TranslateConfig, items: list[Any], quarantine: list[Any]) -> int:
    """Inputs the job must account for: every listed file once, or every sample of the split."""
    if cfg.split:
        return Manifest.read(cfg.input).split(cfg.split).samples
    return len(items) + len(quarantine)


class TranslationLock(BuildLock):
    """One translation per output folder: two at once would interleave their images (some of one model,
    some of the other) under whichever report came last. The build lock's machinery
    (`pipelines.dataset.lock`: exclusive create, heartbeat); a killed translation's lock is stale at once
    on its own host (its pid is gone), elsewhere once its heartbeat is older than the TTL: then taken over."""

    BUSY = (
        "another translation is writing {output}: {holder}; let it finish or stop it, or write to another "
        "folder (a killed one's lock goes stale within two minutes) (lock {uri})"
    )
    LOST = "this translation lost its lock on {output} ({why}): no report written"
    LABEL = "[translate]"


def run_translate(cfg: TranslateConfig) -> dict[str, Any]:
    cfg.validate()
    cfg.output = storage.normalize_uri(cfg.output)
    source = dataset_root(cfg.input) if cfg.split else storage.normalize_uri(cfg.input)
    if storage.overlap(source, cfg.output):
        # OUTPUT/<key>.png of a PNG input is that input: it would be overwritten, or read back next time.
        raise ConfigError(
            f"OUTPUT {cfg.output} and INPUT {source} overlap: write the translations to a folder outside "
            "the input (and not containing it)"
        )
    storage.preflight(source, write=False)  # with --split INPUT may name the manifest file itself
    # A run failing before any output leaves no folder; the lock is taken before anything is written.
    with storage.output_folder(cfg.output), TranslationLock(cfg.output, LockConfig(break_lock=True)) as lock:
        return translate(cfg, lock)


def translate(cfg: TranslateConfig, lock: BuildLock) -> dict[str, Any]:
    import ray
    from ray.data import ActorPoolStrategy

    cfg.tracking_uri = tracking.tracking_uri(cfg.tracking_uri)
    tracking.export_credentials(cfg.tracking_uri)  # before Ray starts: local actors inherit it
    given_uri = cfg.model_uri
    cfg.model_uri = pinned_uri(cfg.model_uri, cfg.tracking_uri)
    if cfg.model_uri != given_uri:
        print(f"[translate] {given_uri} is {cfg.model_uri}: every actor translates with that version")
    # Fail here, not in every actor, if the model or its options are wrong.
    model = load_model(cfg.model_uri, cfg.tracking_uri).with_norm_stats(cfg.norm_stats)
    if cfg.class_ids and not (model.preprocessing.input_is_label_map and model.preprocessing.palette):
        raise ConfigError(
            f"--class-ids: {cfg.model_uri} records no palette to colour class ids with (it is no labels "
            "model, or was trained before models recorded one): colour the masks as its dataset build did"
        )
    note = model.check_tiling(cfg.tile_size, cfg.tile_overlap)
    if note:
        print(f"[translate] {note}", file=sys.stderr, flush=True)
    mode = model.preprocessing.preprocess
    if cfg.resolution == "model" and cfg.output_size == "source" and mode in ("crop", "scale_width_and_crop"):
        raise ConfigError(
            f"{cfg.model_uri} was trained with preprocess {mode}: at its resolution it translates a centre "
            "crop of each input, which resized to the input's size would not line up with it; use "
            "--resolution native (each image at its own size)"
        )
    started = time.perf_counter()
    items, quarantine = list_inputs(cfg)
    gpus = cluster_gpus()
    actors = min(cfg.actors or max(1, gpus), max(1, len(items)))
    print(f"[translate] {len(items)} work items on {actors} {'GPU' if gpus else 'CPU'} actor(s)", flush=True)
    records: list[dict[str, Any]] = []
    # An earlier run's report would vouch for images this run replaces: until this run's report is
    # written, the folder has none (a killed run leaves images and no report, not an old report).
    storage.delete(storage.join(cfg.output, REPORT_NAME))
    if items:
        dataset = ray.data.from_items(
            [{"item": json.dumps(i)} for i in items], override_num_blocks=len(items)
        )
        out = dataset.map_batches(
            Translator,
            fn_constructor_kwargs={"config": actor_config(cfg)},
            batch_size=1,
            compute=ActorPoolStrategy(size=actors),
            num_gpus=1 if gpus else None,
            num_cpus=None if gpus else 1,
        )
        quiet_ray_data()
        progress = Progress("translate", expected_inputs(cfg, items, quarantine), "images")
        try:
            for row in out.iter_rows():
                record = json.loads(row["record"])
                records.append(record)
                progress.update()
        except Exception as exc:
            cause = storage.find_io_error(exc)
            if cause is None:
                raise
            detail = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            raise storage.StorageError(
                f"translation failed on I/O (no report written): {detail}; re-run when storage is back"
            ) from exc
    translated = [r for r in records if r["kind"] == "translated"]
    expected = expected_inputs(cfg, items, quarantine)
    quarantine += [r for r in records if r["kind"] == "quarantine"]
    # A record stands for one input, or for "samples" inputs (a shard that differs from the manifest).
    quarantined = sum(int(q.get("samples", 1)) for q in quarantine)
    seen = len(translated) + quarantined
    if seen != expected:
        raise RuntimeError(
            f"counts do not reconcile: {len(translated)} translated + {quarantined} quarantined != "
            f"{expected} inputs"
        )
    # Outputs of another run (another model, another input) in this folder stay, unrecognisable from ours:
    # said, and counted in the report.
    ours = {storage.join(cfg.output, f"{r['key']}.png") for r in translated}
    others = [
        uri
        for uri in storage.list_files(cfg.output)
        if uri not in ours and uri.rsplit("/", 1)[-1] not in (REPORT_NAME, LOCK_NAME)
    ]
    report = {
        "model_uri": given_uri,
        "model_version_uri": cfg.model_uri,
        "input": cfg.input,
        "split": cfg.split or None,
        "resolution": cfg.resolution,
        "tile_size": cfg.tile_size,
        "tile_overlap": cfg.tile_overlap if cfg.tile_size else None,
        "norm_stats": cfg.norm_stats,
        "seen": seen,
        "translated": len(translated),
        "quarantined": quarantined,
        "other_files": len(others),
        "seconds": round(time.perf_counter() - started, 1),
        "quarantine": sorted(quarantine, key=lambda q: q["paths"]),
    }
    report_uri = storage.join(cfg.output, REPORT_NAME)
    lock.check()  # still ours: no other translation broke it and wrote into the folder meanwhile
    storage.write_bytes_atomic(report_uri, json.dumps(report, indent=2).encode())
    print(f"[translate] {len(translated)} translated, {quarantined} quarantined → {cfg.output}", flush=True)
    if others:
        example = printable(others[0])
        print(
            f"[translate] {cfg.output} also holds {len(others)} file(s) this run did not write (an earlier "
            f"translation's?), e.g. {example}: they stay beside its outputs; translate into an empty folder "
            "to keep runs apart",
            flush=True,
        )
    if quarantine:
        reasons = reason_counts(q["reason"] for q in quarantine)
        more = f"; {len(reasons) - 3} more reason(s)" if len(reasons) > 3 else ""
        print(
            "[translate] quarantined: "
            + "; ".join(f"{count} × {reason}" for reason, count in reasons[:3])
            + f"{more} (each input and its reason: {report_uri})",
            flush=True,
        )
    return report
