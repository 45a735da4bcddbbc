"""The training data path: WebDataset shards listed in a dataset manifest → augmented tensor batches.

Each Ray Train rank builds its own loader and passes its ``rank`` and ``world_size`` explicitly (nothing here
reads ``torch.distributed`` state, so it all runs and is tested without a process group). Only the shards
that the manifest lists are read, each streamed through `pipelines.storage` (a local folder or S3 alike), so
no local copy is ever made.

Batches are dicts ``{"A": float32[N, Ca, H, W], "B": float32[N, Cb, H, W], "key": list[str]}`` in [-1, 1].
``A`` is always the generator's input and ``B`` its target: ``direction="BtoA"`` swaps the stored input and
target (see `channels`).

How a training epoch is split, so that every rank runs the same number of steps (DDP hangs if one rank
runs out of batches before the others, and shards are uneven):

1. ``steps = samples // (world_size * batch_size)`` (`steps_per_epoch`; the remainder is dropped). Every
   rank yields exactly ``steps`` batches of exactly ``batch_size`` samples.
2. The split's shard list is shuffled with ``seed + epoch`` (the same order on every rank) and cut into
   ``world_size`` contiguous runs of samples, one per rank, that differ by at most one sample (whole shards
   dealt to ranks would give them uneven sample counts for the same number of steps: samples unseen on one
   rank, repeated on another). A rank reads at most two shards in part. Each rank's shards (and parts) are
   then dealt round-robin to its DataLoader workers.
3. Where workers outnumber a rank's shards (a worker would get none), every worker reads the whole list
   instead, keeping every n-th sample from a different offset (sample-level striding), so workers still
   see disjoint samples, at the cost of each of them streaming all those shards.
4. The rank's ``steps`` batches are shared among its workers in whole batches, in proportion to the samples
   each worker holds, so every worker's quota is a multiple of ``batch_size`` and no partial batch can come
   out of ``DataLoader(drop_last=False)``; the quotas add up to exactly ``steps * batch_size``.
5. A worker streams its shards pass after pass (shard order reshuffled each pass, samples through a shuffle
   buffer drained at the end of each pass, so one pass is a permutation of its samples) and stops when it
   reaches its quota. A worker holding fewer samples than its quota therefore wraps around and repeats some.

The manifest is read and validated once (`Manifest.read`): callers pass the `Manifest` they already hold
(``manifest=``), and ``LoaderConfig.manifest`` stays its location, which resolves the shard paths.

One loader per run (`RunLoader`): a training run builds its DataLoader once and its worker processes persist
across epochs (starting them costs about a second per epoch, as much as a short epoch of steps on a GPU).
The epoch lives in a shared-memory integer that the training process sets before each ``iter()``; each
worker reads it when its next iteration starts, so every epoch's plan (shard order, quotas, seeds) is
exactly what a fresh per-epoch loader (`make_train_loader`) computes for that epoch: same batches. When
epochs overlap (by default on GPUs), two such DataLoaders take turns, one starting the next epoch while the
other serves this one.

Augmenting on the device (``device_augment``, used when training on CUDA with ``resize_and_crop``): the
CPU workers decode and resize to ``load_size`` only and ship uint8 HxWxC images with each sample's crop
(top, left, size, flip); `crop_flip` cuts and flips them on the device after the host→device copy, and
converts to float there. The crop and flip are drawn in the worker from a seed of ``(seed, epoch, rank,
worker)`` like every other random choice, so the batches stay reproducible and device-independent; the
numbers differ from the CPU path's, whose albumentations draws are its own. This takes the crop, the flip
and the float conversion off the CPU workers and sends 4x fewer bytes (uint8, not float32) through shared
memory, pinned memory and the bus. The CPU path is unchanged.

``num_workers="auto"``: the CPUs this process may use (its affinity, or the Ray worker's CPUs) minus one
for the training process, at least one. The worker count is part of the plan, so set a number where
batches must be reproducible across machines.

Randomness (shard order, shuffle buffer, crops, flips) comes from seeds derived from
``(seed, epoch, rank, worker)``: the same values give the same batches. The worker count is part of the
plan, so changing ``num_workers`` changes the order.

Evaluation (`make_eval_loader`) reads each sample of the split exactly once across all ranks and workers
(same dealing, manifest order, no shuffle), deterministically resized/centre-cropped and never flipped.
Ranks may get different sample counts and batches may be partial: reduce sums across ranks at the end.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import multiprocessing
import os
import random
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import cv2
import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipelines import storage
from pipelines.config import option
from pipelines.images import DEFAULT_MAX_PIXELS, BadInput, header_size
from pipelines.manifest import Manifest, SampleFormat, ShardEntry, dataset_root, printable
from pipelines.preprocessing import eval_geometry, to_tensor
from pipelines.shards import DEFAULT_MAX_MEMBER_BYTES, HashingReader, ShardFault, read_members, split_name

Preprocess = Literal["resize_and_crop", "crop", "scale_width_and_crop", "none"]
Direction = Literal["AtoB", "BtoA"]
# Reflect rather than a constant fill where an image is smaller than the crop: a constant would invent a
# colour that may not be in a label map's palette.
_PAD = {"pad_if_needed": True, "border_mode": cv2.BORDER_REFLECT_101}
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)  # OpenCV >= 4.10 decodes straight to RGB
# tarfile reads 10 KiB at a time and pyarrow's S3 stream makes one ranged GET per read: buffer them.
_READ_BUFFER = 8 << 20
# Resizing: linear for photos, area when shrinking them; nearest for label maps (passed as masks).
_RESIZE = {
    "interpolation": cv2.INTER_LINEAR,
    "mask_interpolation": cv2.INTER_NEAREST,
    "area_for_downscale": "image",
}


# Member suffix → bytes, plus __key__ and __url__. Streams are generators so that they can be closed early.
RawSample = dict[str, Any]


class ShardError(RuntimeError):
    """A shard listed in the manifest is missing, corrupt or does not match the manifest; names the shard."""


@dataclass
class LoaderConfig:
    manifest: str = field(default="", metadata={"help": "dataset folder / s3:// prefix or its manifest.json"})
    batch_size: int = 1  # samples per batch on each rank (the global batch is batch_size * world_size)
    load_size: int = 286  # resize target before the random crop (the paper's jitter: 286 then crop 256)
    crop_size: int = 256  # output height and width
    # resize_and_crop: square resize to load_size, random crop_size crop (eval: resize to crop_size);
    # crop: random crop only (eval: centre crop); scale_width_and_crop: width to load_size keeping the aspect
    # ratio, then crop (eval: width to crop_size, centre crop); none: stored size as is (needs equal sizes
    # for batch_size > 1). Images smaller than the crop are reflect-padded.
    preprocess: Preprocess = "resize_and_crop"
    flip: bool = True  # random horizontal flip (p=0.5) in training, same for input and target
    direction: Direction = "AtoB"  # AtoB: stored input → target; BtoA: learn target → input
    num_workers: int | Literal["auto"] = option(
        "auto",
        "DataLoader worker processes per rank: a number (0 decodes in the training process) or auto, the "
        "CPUs the training worker may use minus one (at least 1)",
    )
    shuffle_buffer: int = option(
        1000,
        "encoded samples a loader process holds for shuffling (<= 1: off); a share this small is fully "
        "permuted every pass",
    )
    seed: int = 0  # base seed; shard order, shuffle and augmentation derive from (seed, epoch, rank, worker)
    # Hash each shard as it streams (no second read) and compare its size and sha256 with the manifest at
    # the shard's end; False skips only the hash (sizes and member checks stay). bench/loader_verify.py
    # measures the cost against decoding.
    verify_sha256: bool = True
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES  # a larger tar member is a ShardError, before reading
    max_pixels: int = DEFAULT_MAX_PIXELS  # images whose header says more are not decoded (as in the build)
    pin_memory: bool | None = None  # None = pin when CUDA is available
    device_augment: bool = option(
        True,
        "training on CUDA with preprocess resize_and_crop: random crop and flip on the GPU after the copy "
        "(the CPU workers only decode and resize)",
    )
    overlap_epochs: bool | None = option(
        None,
        "a second set of loader workers decodes the next epoch's first batches while this epoch trains, so "
        "a GPU does not wait at epoch starts (two sets of num_workers; auto workers are then halved); "
        "unset: on when crop and flip run on the GPU",
    )

    def validate(self) -> None:
        if self.batch_size < 1 or self.crop_size < 1 or self.load_size < 1:
            raise ValueError("batch_size, crop_size and load_size must be >= 1")
        if self.preprocess not in ("resize_and_crop", "crop", "scale_width_and_crop", "none"):
            raise ValueError(f"unknown preprocess {self.preprocess!r}")
        if self.preprocess in ("resize_and_crop", "scale_width_and_crop") and self.load_size < self.crop_size:
            raise ValueError(f"load_size {self.load_size} must be >= crop_size {self.crop_size}")
        if self.direction not in ("AtoB", "BtoA"):
            raise ValueError(f"direction must be AtoB or BtoA, got {self.direction!r}")
        if self.num_workers != "auto" and (not isinstance(self.num_workers, int) or self.num_workers < 0):
            raise ValueError(f"num_workers must be auto or an integer >= 0, got {self.num_workers!r}")

    def workers(self, cpus: float | None = None, loaders: int = 1, busy_cpus: int = 0) -> int:
        """The worker count of each DataLoader: ``num_workers``, or for auto the CPUs available minus one
        (>= 1), shared among ``loaders`` (a `RunLoader` overlapping epochs has two).

        ``cpus``: the CPUs reserved for this training worker (Ray's ``cpus_per_worker``); the affinity of
        this process caps it. None: the affinity alone. ``busy_cpus``: the CPUs that a training step keeps
        busy on this machine (one rank training on CPUs: its torch threads). Where they leave fewer than 2
        free, auto is 0, decoding in the training process: a loader process would take turns with the
        step's threads, and a parallel step waits for its slowest thread (on 2 cores, 2026-11-28, the step
        ran 9% slower beside one loader process; decoding in-process cost 2.5% of the time)."""
        if self.num_workers != "auto":
            return int(self.num_workers)
        cores = available_cpus()
        if busy_cpus and cores - busy_cpus < 2:
            return 0
        if cpus is not None:
            cores = min(cores, max(1, int(cpus)))
        return max(1, (cores - 1) // loaders)

    def overlaps(self, device_augment: bool) -> bool:
        """Whether a `RunLoader` overlaps epochs: ``overlap_epochs``, or when unset, when augmenting on the
        device (a GPU trains: its steps are fast enough that an epoch start's wait shows)."""
        return device_augment if self.overlap_epochs is None else self.overlap_epochs


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------------------------------------
# Public helpers
# ----------------------------------------------------------------------------------------------------------


def steps_per_epoch(manifest: Manifest, split: str, world_size: int, batch_size: int) -> int:
    """Batches every rank yields per training epoch: ``samples // (world_size * batch_size)``."""
    if world_size < 1 or batch_size < 1:
        raise ValueError(f"world_size ({world_size}) and batch_size ({batch_size}) must be >= 1")
    samples = manifest.split(split).samples
    steps = samples // (world_size * batch_size)
    if steps == 0:
        raise ValueError(
            f"split {split!r} has {samples} samples, fewer than world_size {world_size} × batch_size "
            f"{batch_size} = {world_size * batch_size}: not one full step per rank; lower the batch size, "
            "use fewer ranks (Ray Train workers) or add data"
        )
    return steps


def make_train_loader(
    cfg: LoaderConfig,
    split: str = "train",
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    manifest: Manifest | None = None,
    device_augment: bool = False,
) -> DataLoader:
    """This rank's loader for one epoch: exactly `steps_per_epoch` full batches (``len(loader)``).

    ``manifest``: the already-read manifest of ``cfg.manifest`` (None: read it here). ``device_augment``:
    yield uncropped uint8 batches with crop parameters, for `crop_flip` (see the module docstring). A
    training run uses `RunLoader` instead, which keeps its workers across epochs."""
    dataset = ShardDataset(
        cfg, split, rank, world_size, epoch, train=True, manifest=manifest, device_augment=device_augment
    )
    return _loader(dataset, cfg)


def make_eval_loader(
    cfg: LoaderConfig,
    split: str = "val",
    rank: int = 0,
    world_size: int = 1,
    manifest: Manifest | None = None,
    persistent: bool = False,
) -> DataLoader:
    """This rank's share of ``split``: every sample once across ranks, deterministic, partial batches.

    ``persistent``: keep the worker processes between iterations (a loader iterated once per epoch)."""
    dataset = ShardDataset(cfg, split, rank, world_size, 0, train=False, manifest=manifest)
    # Each iteration of a DataLoader draws a seed from its generator; from torch's global one, that would
    # shift the training's dropout masks on CPU by whether (and so when) a run validates.
    return _loader(dataset, cfg, persistent, generator=torch.Generator())


def augments_on_device(cfg: LoaderConfig, device: torch.device) -> bool:
    """Whether training on ``device`` crops and flips there: CUDA, ``device_augment`` on, and the square
    ``resize_and_crop`` (every image the same size before the crop, so uncropped batches stack)."""
    return device.type == "cuda" and cfg.device_augment and cfg.preprocess == "resize_and_crop"


class RunLoader:
    """One rank's training loader for a whole run: built once, its workers persist across epochs.

        loader = RunLoader(cfg, "train", rank, world, manifest=manifest)
        for epoch in ...:
            for batch in loader.epoch(epoch): ...
        loader.close()

    ``loader.epoch(e)`` yields exactly the batches of ``make_train_loader(cfg, ..., epoch=e)``.

    Overlapping epochs (``cfg.overlap_epochs``; by default when augmenting on the device): a persistent
    DataLoader's workers start an epoch only when it is asked for, and its first batch then takes a worker a
    whole batch of decoding (0.2-0.6 s at batch 64-128 on an H200's host, 2026-11-28: 17-26% of the wall
    time of 64-step epochs, with the GPU idle). So two DataLoaders with the same worker count take turns:
    while one serves epoch e, the other has already started epoch e + 1 and holds its first batches when e
    ends. Every epoch is still one DataLoader's ordinary epoch, so its batches and their order are
    unchanged."""

    def __init__(
        self,
        cfg: LoaderConfig,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        manifest: Manifest | None = None,
        device_augment: bool = False,
    ) -> None:
        overlap = cfg.overlaps(device_augment)
        self.datasets: list[ShardDataset] = []
        self.loaders: list[DataLoader] = []
        for _ in range(2 if overlap and cfg.workers() > 0 else 1):
            dataset = ShardDataset(
                cfg, split, rank, world_size, 0, train=True, manifest=manifest, device_augment=device_augment
            )
            dataset.share_epoch()
            self.datasets.append(dataset)
            self.loaders.append(_loader(dataset, cfg, persistent=True))
        # (epoch, loader index, its iterator): the next epoch, started before it was asked for.
        self._ready: tuple[int, int, Iterator[dict[str, Any]]] | None = None

    def __len__(self) -> int:
        return len(self.loaders[0])

    def epoch(self, epoch: int) -> Iterator[dict[str, Any]]:
        """The batches of ``epoch``. Any earlier epoch's iterator must not be used any more."""
        if self._ready is not None and self._ready[0] == epoch:
            _, index, iterator = self._ready
            self._ready = None
        else:  # the first epoch, or not the one expected (a resume, a repeat): the loader not holding it
            index = 0 if self._ready is None else 1 - self._ready[1]
            iterator = self._start(index, epoch)
        if len(self.loaders) > 1 and (self._ready is None or self._ready[0] != epoch + 1):
            self._ready = (epoch + 1, 1 - index, self._start(1 - index, epoch + 1))
        return iterator

    def _start(self, index: int, epoch: int) -> Iterator[dict[str, Any]]:
        self.datasets[index].set_epoch(epoch)
        # With persistent workers iter() resets that loader's one iterator and returns once every worker has
        # acknowledged; each worker has then read the new epoch (ShardDataset.__iter__ reads it eagerly) and
        # starts decoding its first batches (prefetch_factor per worker).
        return iter(self.loaders[index])

    def close(self) -> None:
        for loader in self.loaders:
            close_loader(loader)


def workers_started(loader: DataLoader | RunLoader) -> bool:
    """Whether the loader's next epoch forks no worker processes: a persistent loader that already has its
    workers, or one that decodes in this process (for a `RunLoader`: each of its DataLoaders)."""
    if isinstance(loader, RunLoader):
        return all(workers_started(one) for one in loader.loaders)
    if loader.num_workers == 0:
        return True
    return getattr(loader, "_iterator", None) is not None  # DataLoader keeps its persistent iterator here


def close_loader(loader: DataLoader) -> None:
    """Stop a persistent loader's worker processes now rather than when it is garbage-collected."""
    iterator = getattr(loader, "_iterator", None)
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def _loader(
    dataset: ShardDataset,
    cfg: LoaderConfig,
    persistent: bool = False,
    generator: torch.Generator | None = None,
) -> DataLoader:
    pin = torch.cuda.is_available() if cfg.pin_memory is None else cfg.pin_memory
    workers = cfg.workers()
    if workers > 0:
        _single_threaded_opencv()
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        drop_last=False,  # quotas are whole batches in training; eval keeps its last partial batches
        num_workers=workers,
        pin_memory=pin,
        # Persistent workers re-plan each epoch from the shared epoch (RunLoader); a per-epoch loader's
        # workers end with it.
        persistent_workers=persistent and workers > 0,
        prefetch_factor=2 if workers > 0 else None,
        generator=generator,
    )


def _single_threaded_opencv() -> None:
    """One OpenCV thread per process, set here before the workers fork so that they inherit it: the
    workers are the parallelism, and each one's own OpenCV pool (one thread per core) oversubscribes the
    cores N-fold. Setting it in a forked child instead hangs (see ShardDataset.__iter__)."""
    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)


# ----------------------------------------------------------------------------------------------------------
# Splitting: which samples of which shards each consumer reads
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """The samples of one shard that one consumer reads."""

    shard: int  # index into the split's shard list (manifest order)
    samples: int  # samples in the whole shard
    keep: tuple[int, ...] | None = None  # positions within the shard to read; None = all

    @property
    def count(self) -> int:
        return self.samples if self.keep is None else len(self.keep)

    def positions(self) -> Iterable[int]:
        return range(self.samples) if self.keep is None else self.keep


def deal(pieces: list[Piece], consumers: int, index: int) -> list[Piece]:
    """Consumer ``index``'s share of ``pieces``: round-robin by shard when there are enough shards, else every
    ``consumers``-th sample of the whole list starting at ``index`` (disjoint shares either way)."""
    if len(pieces) >= consumers:
        return pieces[index::consumers]
    out: list[Piece] = []
    seen = 0
    for piece in pieces:
        positions = list(piece.positions())
        kept = tuple(p for j, p in enumerate(positions, start=seen) if j % consumers == index)
        seen += len(positions)
        if kept:
            out.append(Piece(piece.shard, piece.samples, kept))
    return out


def contiguous_share(pieces: list[Piece], consumers: int, index: int) -> list[Piece]:
    """Consumer ``index``'s share of ``pieces`` as one contiguous run of their samples, in order: positions
    ``[index * n // consumers, (index + 1) * n // consumers)`` of the ``n`` samples. Shares differ by at most
    one sample whatever the shard sizes (dealing whole shards, a rank holding 6,000 samples and another
    4,123 would leave 1,877 unseen on one and repeat as many on the other, since both run the same steps),
    and a consumer reads at most two shards in part."""
    total = sum(p.count for p in pieces)
    low, high = index * total // consumers, (index + 1) * total // consumers
    out: list[Piece] = []
    start = 0
    for piece in pieces:
        positions = list(piece.positions())
        kept = positions[max(low - start, 0) : max(high - start, 0)]
        start += len(positions)
        if len(kept) == len(positions):
            out.append(piece)
        elif kept:
            out.append(Piece(piece.shard, piece.samples, tuple(kept)))
    return out


def share_batches(batches: int, weights: list[int]) -> list[int]:
    """Split ``batches`` into integers proportional to ``weights`` (largest remainder; zero weight → 0)."""
    total = sum(weights)
    if total <= 0:
        raise ValueError("no samples to share batches over")
    shares = [batches * w // total for w in weights]
    remainders = [batches * w % total for w in weights]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-remainders[i], i))
    for i in by_remainder[: batches - sum(shares)]:
        shares[i] += 1
    return shares


def _seed(*parts: object) -> int:
    """A stable 63-bit seed from parts (Python's hash() is salted per process; this is not)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _buffer_shuffle(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream through a buffer of ``size`` items; drains at the end, so nothing is lost."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


# ----------------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------------


class ShardDataset(IterableDataset):
    """One rank's stream of samples for one epoch (training) or one pass (eval).

    Holds only plain data (config, shard entries, ints), so it pickles for spawn-started workers; transforms
    are built inside each worker.
    """

    def __init__(
        self,
        cfg: LoaderConfig,
        split: str,
        rank: int,
        world_size: int,
        epoch: int,
        train: bool,
        manifest: Manifest | None = None,
        device_augment: bool = False,
    ) -> None:
        cfg.validate()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in range for world_size {world_size}")
        if device_augment and (not train or cfg.preprocess != "resize_and_crop"):
            raise ValueError("device_augment is for training with preprocess='resize_and_crop'")
        manifest = manifest if manifest is not None else Manifest.read(cfg.manifest)
        self.cfg = cfg
        self.split = split
        self.rank, self.world_size, self.train = rank, world_size, train
        self.device_augment = device_augment
        self._epoch = epoch
        self._shared_epoch: Any = None  # a shared-memory int once share_epoch() is called
        self.root = dataset_root(cfg.manifest)
        self.entries: list[ShardEntry] = manifest.shards(split)  # raises for an unknown split
        self.sample_format: SampleFormat = manifest.sample_format
        self.steps = steps_per_epoch(manifest, split, world_size, cfg.batch_size) if train else 0
        _import_albumentations()  # once here, so forked workers inherit it (importing costs ~3 s)

    def __len__(self) -> int:
        """Training: samples this rank yields per epoch (so ``len(loader) == steps_per_epoch``).
        Eval: samples this rank reads (the loader may yield a partial batch per worker)."""
        if self.train:
            return self.steps * self.cfg.batch_size
        return sum(p.count for p in contiguous_share(self._pieces(), self.world_size, self.rank))

    # --- epoch -----------------------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return int(self._shared_epoch.value) if self._shared_epoch is not None else self._epoch

    def share_epoch(self) -> None:
        """Keep the epoch in shared memory, so that persistent workers (forked or spawned with this
        dataset) see `set_epoch` from the training process."""
        if self._shared_epoch is None:
            self._shared_epoch = multiprocessing.RawValue(ctypes.c_int64, self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        if self._shared_epoch is not None:
            self._shared_epoch.value = epoch

    # --- plan ------------------------------------------------------------------------------------------

    def _pieces(self) -> list[Piece]:
        return [Piece(i, e.samples) for i, e in enumerate(self.entries) if e.samples > 0]

    def worker_plan(self, worker: int, workers: int, epoch: int | None = None) -> tuple[list[Piece], int]:
        """(pieces, sample quota) of one worker of this rank; the quota is 0 for eval (read each once)."""
        epoch = self.epoch if epoch is None else epoch
        pieces = self._pieces()
        if self.train:
            random.Random(_seed("shards", self.cfg.seed, epoch)).shuffle(pieces)
        rank_pieces = contiguous_share(pieces, self.world_size, self.rank)
        shares = [deal(rank_pieces, workers, w) for w in range(workers)]
        if not self.train:
            return shares[worker], 0
        batches = share_batches(self.steps, [sum(p.count for p in share) for share in shares])
        return shares[worker], batches[worker] * self.cfg.batch_size

    # --- iteration -------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Not a generator: the epoch is read now, when the DataLoader starts this worker's iteration, not
        # at the first next(), by which time a persistent loader may already have moved the shared epoch on.
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        # No cv2.setNumThreads(1) here although workers are the parallelism: in a forked child of a process
        # whose OpenCV thread pool has run, it blocks forever (pthread_cond_destroy on the inherited pool).
        # The parent sets it before forking instead (_single_threaded_opencv).
        epoch = self.epoch
        return self._samples(worker, workers, epoch)

    def _samples(self, worker: int, workers: int, epoch: int) -> Iterator[dict[str, Any]]:
        pieces, quota = self.worker_plan(worker, workers, epoch)
        ids = (self.cfg.seed, epoch, self.rank, worker)
        label_map = self.sample_format.input_is_label_map
        if self.device_augment:
            transform = build_resize(self.cfg, label_map)
            crops: random.Random | None = random.Random(_seed("crop", *ids))
        else:
            transform, crops = build_transform(self.cfg, self.train, label_map, _seed("augment", *ids)), None
        if self.train:
            raw = self._train_stream(pieces, quota, random.Random(_seed("shuffle", *ids)))
        else:
            raw = self._read(pieces)
        with contextlib.closing(raw):
            for sample in raw:
                yield self._decode(sample, transform, crops)

    def _train_stream(self, pieces: list[Piece], quota: int, rng: random.Random) -> Generator[RawSample]:
        """Exactly ``quota`` raw samples: pass after pass over ``pieces``, each pass a random permutation."""
        produced = 0
        available = sum(p.count for p in pieces)
        while produced < quota:
            order = list(pieces)
            rng.shuffle(order)
            size = min(self.cfg.shuffle_buffer, available)
            source = self._read(order)
            stream = _buffer_shuffle(source, size, rng) if size > 1 else source
            in_pass = 0
            with contextlib.closing(source):
                for sample in stream:
                    yield sample
                    produced += 1
                    in_pass += 1
                    if produced == quota:
                        return
            if in_pass == 0:
                raise ShardError(f"shards {[self.entries[p.shard].path for p in pieces]} gave no samples")

    def _read(self, pieces: list[Piece]) -> Generator[RawSample]:
        for piece in pieces:
            entry = self.entries[piece.shard]
            keep = None if piece.keep is None else set(piece.keep)
            last = -1 if piece.keep is None else max(piece.keep)
            position = -1
            for position, sample in enumerate(self._shard_samples(entry)):
                if keep is None or position in keep:
                    yield sample
                if position == last:
                    break  # the rest of the shard belongs to other consumers
            else:
                # tarfile's stream mode takes a truncated header for the end of the archive: without this
                # check a short read would silently drop the rest of a shard.
                if position + 1 != entry.samples:
                    raise ShardError(
                        f"shard {entry.path} holds {position + 1} samples, the manifest says {entry.samples}"
                    )

    def _shard_samples(self, entry: ShardEntry) -> Iterator[dict[str, Any]]:
        """Raw samples (member suffix → bytes, plus ``__key__``, ``__url__``, ``__shard__``) of one shard,
        streamed from storage through `pipelines.shards.read_members`: only regular members with safe names
        and sizes under ``max_member_bytes``; the bytes are counted (and hashed unless ``verify_sha256`` is
        off) as they stream and compared with the manifest once the shard has been read to its end. Every
        fault, I/O errors left after the storage layer's retries included, is a ShardError naming the shard
        (and the member where there is one)."""
        uri = storage.join(self.root, entry.path)
        try:
            raw = storage.open_input_stream(uri)
        except FileNotFoundError as exc:
            raise ShardError(f"shard {entry.path} is listed in the manifest but missing at {uri}") from exc
        except (storage.StorageError, OSError) as exc:  # e.g. a folder in its place, no permission
            raise ShardError(f"shard {entry.path} could not be opened: {exc}") from exc
        with raw, pa.BufferedInputStream(raw, _READ_BUFFER) as buffered:
            reader = HashingReader(storage.WatchedReads(buffered, uri), entry.bytes, self.cfg.verify_sha256)
            sample: dict[str, Any] | None = None
            try:
                for member in read_members(reader, self.cfg.max_member_bytes):
                    if member.problem:
                        name = printable(member.name)
                        raise ShardError(f"shard {entry.path} member {name}: {member.problem} ({uri})")
                    assert member.data is not None
                    key, suffix = split_name(member.name)
                    if sample is not None and sample["__key__"] != key:
                        yield sample
                        sample = None
                    if sample is None:
                        sample = {"__key__": key, "__url__": uri, "__shard__": entry.path}
                    if suffix in sample:
                        raise ShardError(f"shard {entry.path} member {member.name}: duplicate {suffix}")
                    sample[suffix] = member.data
                if sample is not None:
                    yield sample
                size, digest = reader.finish()
            except ShardFault as exc:
                raise ShardError(f"shard {entry.path} is corrupt: {exc} ({uri})") from exc
            except OSError as exc:  # the storage layer's retries are spent
                raise ShardError(f"shard {entry.path} is unreadable ({uri}): {exc}") from exc
        # tarfile's stream mode takes a truncated header for the end of the archive: the size check (and
        # _read's sample count) catch a shard that ends early.
        if size != entry.bytes:
            raise ShardError(
                f"shard {entry.path} is corrupt: {size} bytes, the manifest says {entry.bytes} ({uri})"
            )
        if digest is not None and digest != entry.sha256:
            raise ShardError(
                f"shard {entry.path} is corrupt: its sha256 {digest[:16]}… differs from the manifest's "
                f"{entry.sha256[:16]}… ({uri}); rebuild the dataset"
            )

    # --- decode and augment ----------------------------------------------------------------------------

    def _member(self, sample: dict[str, Any], role: Literal["input", "target"]) -> tuple[str, bytes]:
        """(suffix, bytes) of the sample's input or target."""
        name = getattr(self.sample_format, role)
        if name in sample:
            return name, bytes(sample[name])
        for suffix, value in sample.items():  # tolerate another image extension than the manifest's
            if suffix.startswith(f"{role}."):
                return suffix, bytes(value)
        members = sorted(k for k in sample if not k.startswith("__"))
        raise ShardError(f"sample {sample['__key__']} in {sample.get('__url__')} has no {role} ({members})")

    def _decode(
        self, sample: dict[str, Any], transform: Any, crops: random.Random | None = None
    ) -> dict[str, Any]:
        key = str(sample["__key__"])
        # A member our build wrote but that does not decode means the shard was damaged after the build.
        shard = f"shard {sample.get('__shard__') or sample.get('__url__')}"
        where = f"sample {key} in {sample.get('__url__')}"
        fmt = self.sample_format
        images = []
        for role, channels in (("input", fmt.input_channels), ("target", fmt.target_channels)):
            suffix, data = self._member(sample, role)  # type: ignore[arg-type]
            what = f"{shard} is corrupt: member {key}.{suffix}"
            images.append(decode_rgb(data, channels, what, self.cfg.max_pixels))
        inp, tgt = images
        if inp.shape[:2] != tgt.shape[:2]:
            raise ShardError(f"{where}: input {inp.shape[:2]} and target {tgt.shape[:2]} differ in size")
        if crops is not None:  # device_augment: resized uint8 and this sample's crop, cut on the device
            if inp.shape[:2] != (self.cfg.load_size, self.cfg.load_size):
                out = transform(image=tgt, input=inp)
                inp, tgt = out["input"], out["image"]
            a, b = (inp, tgt) if self.cfg.direction == "AtoB" else (tgt, inp)
            size, (height, width) = self.cfg.crop_size, a.shape[:2]
            top, left = crops.randint(0, height - size), crops.randint(0, width - size)
            flip = int(self.cfg.flip and crops.random() < 0.5)
            crop = torch.tensor([top, left, size, flip])
            return {"A": _hwc(a), "B": _hwc(b), "crop": crop, "key": key}
        if transform is not None:
            out = transform(image=tgt, input=inp)
            inp, tgt = out["input"], out["image"]
        a, b = (inp, tgt) if self.cfg.direction == "AtoB" else (tgt, inp)
        return {"A": to_tensor(a), "B": to_tensor(b), "key": key}


def _hwc(image: np.ndarray) -> torch.Tensor:
    """HxWxC (or HxW) uint8 → a HxWxC uint8 tensor (C kept as the last, contiguous dimension)."""
    return torch.from_numpy(np.ascontiguousarray(image.reshape(image.shape[0], image.shape[1], -1)))


def crop_flip(images: torch.Tensor, crops: torch.Tensor, size: int) -> torch.Tensor:
    """Each image's crop, flipped where asked, as the model's input: uint8 [N, H, W, C] and crops [N, 4]
    (top, left, size, flip) on one device → float32 [N, C, size, size] in [-1, 1] (x / 127.5 - 1, the CPU
    path's `to_tensor`), laid out channels-last in memory (NHWC, as the channels_last model wants).

    One gather, with no host synchronisation: the offsets stay on the device."""
    n, height, width, channels = images.shape
    steps = torch.arange(size, device=images.device)
    top, left, flip = crops[:, 0:1], crops[:, 1:2], crops[:, 3:4].bool()
    rows = top + steps  # [N, size]
    cols = left + torch.where(flip, size - 1 - steps, steps)  # [N, size]: reversed where flipped
    base = torch.arange(n, device=images.device)[:, None, None] * (height * width)
    index = base + rows[:, :, None] * width + cols[:, None, :]  # [N, size, size] into N*H*W pixels
    pixels = images.reshape(n * height * width, channels)[index]  # [N, size, size, C]
    # A 256-entry table made on the CPU with `to_tensor`'s own arithmetic: CUDA divides by a scalar as a
    # multiplication by its reciprocal, one ulp off the CPU path for some values; a lookup is exact on both.
    table = _unit_table(images.device)
    return table[pixels.long()].permute(0, 3, 1, 2)


_UINT8_TO_UNIT = torch.arange(256, dtype=torch.float32).div_(127.5).sub_(1.0)


@functools.cache
def _unit_table(device: torch.device) -> torch.Tensor:
    """`_UINT8_TO_UNIT` on ``device``, copied once: a copy from pageable memory each step is one the
    driver may synchronise the stream for."""
    return _UINT8_TO_UNIT.to(device)


def decode_rgb(
    data: bytes, channels: int, where: str = "", max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Encoded image → HxWxC uint8, RGB order for 3 channels (C = ``channels``: 1 or 3).

    The size is read from the header first and nothing is decoded above ``max_pixels`` (a 261 KB PNG of
    16384² px would otherwise allocate 800 MB in a DataLoader worker)."""
    try:
        width, height = header_size(data)
    except BadInput as exc:
        raise ShardError(f"{where}: {exc}") from None
    if width * height > max_pixels:
        raise ShardError(f"{where}: {width}x{height} px exceeds the {max_pixels:,} px limit (max_pixels)")
    buffer = np.frombuffer(data, np.uint8)
    if channels == 1:
        image = cv2.imdecode(buffer, cv2.IMREAD_GRAYSCALE)
    elif _IMREAD_RGB is not None:
        image = cv2.imdecode(buffer, _IMREAD_RGB)
    else:
        image = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
        image = None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if image is None:
        raise ShardError(f"{where}: cannot decode image ({len(data)} bytes)")
    return image[:, :, None] if image.ndim == 2 else image


def _eval_pair(
    image: np.ndarray, input: np.ndarray, preprocess: str, size: int, label_map: bool
) -> dict[str, np.ndarray]:
    return {
        "image": eval_geometry(image, preprocess, size, nearest=False),
        "input": eval_geometry(input, preprocess, size, nearest=label_map),
    }


def _import_albumentations() -> Any:
    # Without this, importing albumentations asks PyPI for a newer version (a 2 s timeout offline).
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations

    return albumentations


def build_resize(cfg: LoaderConfig, input_is_label_map: bool) -> Any:
    """The training transform's resize to ``load_size`` alone (device_augment: the crop and flip are
    done on the device), with the same interpolation rules as `build_transform`."""
    A = _import_albumentations()
    return A.Compose(
        [A.Resize(cfg.load_size, cfg.load_size, **_RESIZE)],
        additional_targets={"input": "mask" if input_is_label_map else "image"},
    )


def build_transform(cfg: LoaderConfig, train: bool, input_is_label_map: bool, seed: int) -> Any:
    """The transform applied to ``image`` (the target) and ``input`` with the same parameters.

    Training: an albumentations pipeline with the random jitter. A label-map input is passed as a mask,
    which every geometric op resizes with nearest neighbour, so no blended (nonexistent) label colour can
    appear; photos use linear interpolation, area when shrinking. Evaluation: the deterministic
    `pipelines.preprocessing.eval_geometry` that `p2p evaluate` and `p2p translate` use too. Returns None
    when there is nothing to do (eval with preprocess "none").
    """
    if not train:
        if cfg.preprocess == "none":
            return None
        return functools.partial(
            _eval_pair, preprocess=cfg.preprocess, size=cfg.crop_size, label_map=input_is_label_map
        )
    A = _import_albumentations()
    resize = _RESIZE
    size = cfg.crop_size
    ops: list[Any] = []
    if cfg.preprocess == "resize_and_crop":
        ops.append(A.Resize(cfg.load_size, cfg.load_size, **resize))
    elif cfg.preprocess == "scale_width_and_crop":
        ops.append(A.LongestMaxSize(max_size_hw=(None, cfg.load_size), **resize))
    if cfg.preprocess != "none":
        ops.append(A.RandomCrop(size, size, **_PAD))
    if cfg.flip:
        ops.append(A.HorizontalFlip(p=0.5))
    if not ops:
        return None
    return A.Compose(ops, additional_targets={"input": "mask" if input_is_label_map else "image"}, seed=seed)
