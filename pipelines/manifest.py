"""The dataset manifest: the only list of shards that training trusts, and the typed contract between the
dataset build and every stage that reads its output.

Written last and atomically by `p2p dataset build`, so a shard that is not listed here (a crashed build's
leftovers, another build's files) does not exist for any reader. Shard paths are relative to the folder
that holds the manifest, so a dataset can be copied or synced as a whole.

Contract:
- `Manifest.read` (and `Manifest.from_json`) validate once, on read, and raise `ManifestError` naming the
  file and the problem: format, required keys and their types, shard paths (relative, inside the dataset
  root: no ``..``, no absolute paths, no backslashes, no drive letters or URI schemes), per-split sample
  and byte sums equal to their shards' sums, totals consistent with the splits and the quarantine, split
  names from train/val/test. Consumers then use attributes, never re-check, never index dicts.
- The JSON is ``p2p-dataset/1`` as written since that format existed (same keys, sorted, indent 2); the
  keys added since (``totals.files_ignored``, ``scanned_folders``) are optional, so older files still read,
  and absent ones stay absent on write: ``Manifest.from_json(text).to_json() == text`` for any file the
  build wrote.
- Records are frozen dataclasses; `config` and `palette` stay plain dicts (they are the build's own
  config and palette as recorded, read by people and by `pipelines.training.train`, not by the loader).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa

from pipelines import storage

MANIFEST_NAME = "manifest.json"
FORMAT = "p2p-dataset/1"
SPLITS = ("train", "val", "test")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DRIVE = re.compile(r"[A-Za-z]:")


class ManifestError(ValueError):
    pass


def manifest_uri(location: str) -> str:
    """Accept the manifest itself or the dataset folder that holds it."""
    return location if location.endswith(".json") else storage.join(location, MANIFEST_NAME)


def dataset_root(manifest_location: str) -> str:
    uri = manifest_uri(manifest_location)
    return uri.rsplit("/", 1)[0] if "/" in uri else "."


SOURCES_NAME = "sources.json.gz"  # in a build's shards folder: what it read (`dataset.build.write_sources`)


def replaced_manifest_uri(location: str, build_id: str) -> str:
    """Where a rebuild keeps the manifest it replaced, for as long as it keeps that build's shards: beside
    the current one (shard paths are relative to the manifest's folder), so `--resume` of a run started on
    the old build can read it (a touched source file alone makes a new build)."""
    return storage.join(dataset_root(location), f"manifest.{build_id}.json")


def manifest_sha256(location: str) -> str:
    """sha256 of the manifest file: identifies the exact evaluation data a score was computed on."""
    return hashlib.sha256(storage.read_bytes(manifest_uri(location))).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardEntry:
    split: str
    path: str  # relative to the dataset root, '/'-separated
    samples: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:  # the split is the key it is listed under, not a field
        return {"path": self.path, "samples": self.samples, "bytes": self.bytes, "sha256": self.sha256}


@dataclass(frozen=True)
class SplitInfo:
    shards: tuple[ShardEntry, ...]
    samples: int
    bytes: int

    @classmethod
    def of(cls, shards: Iterable[ShardEntry]) -> SplitInfo:
        """A split whose sums are its shards' sums (what the build writes)."""
        entries = tuple(shards)
        return cls(entries, sum(e.samples for e in entries), sum(e.bytes for e in entries))

    def to_dict(self) -> dict[str, Any]:
        return {"shards": [s.to_dict() for s in self.shards], "samples": self.samples, "bytes": self.bytes}


@dataclass(frozen=True)
class SampleFormat:
    """How samples are stored in the shards: member suffixes (after the key) and image channels."""

    input: str  # e.g. "input.png"
    target: str  # e.g. "target.jpg"
    input_channels: int
    input_is_label_map: bool
    target_channels: int = 3
    meta: str = "json"

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "target": self.target,
            "meta": self.meta,
            "input_channels": self.input_channels,
            "target_channels": self.target_channels,
            "input_is_label_map": self.input_is_label_map,
        }


@dataclass(frozen=True)
class Totals:
    files_seen: int  # every file listed under the source, ignored ones included
    items_seen: int  # samples planned + items quarantined while listing
    samples_written: int
    quarantined: int
    shards: int
    bytes: int
    build_seconds: float
    files_ignored: int | None = None  # outside the scanned folders; None in manifests written before it

    def to_dict(self) -> dict[str, Any]:
        values: dict[str, Any] = {
            "files_seen": self.files_seen,
            "items_seen": self.items_seen,
            "samples_written": self.samples_written,
            "quarantined": self.quarantined,
            "shards": self.shards,
            "bytes": self.bytes,
            "build_seconds": self.build_seconds,
        }
        if self.files_ignored is not None:
            values["files_ignored"] = self.files_ignored
        return values


@dataclass(frozen=True)
class QuarantineRecord:
    """Source files that could not become a sample, and why."""

    paths: tuple[str, ...]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        # "kind" is what build records carried when the format was fixed; kept for byte compatibility.
        return {"kind": "quarantine", "paths": list(self.paths), "reason": self.reason}


# ----------------------------------------------------------------------------------------------------------
# The manifest
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    build_id: str
    created: str  # UTC, ISO 8601
    config: dict[str, Any]  # the build's DatasetBuildConfig as a dict
    palette: dict[str, Any] | None  # the label palette (labels builder), else None
    sample_format: SampleFormat
    splits: dict[str, SplitInfo]
    totals: Totals
    quarantine: tuple[QuarantineRecord, ...] = ()
    # Source folders the build read, relative to the source; None in manifests written before it.
    scanned_folders: tuple[str, ...] | None = None
    format: str = field(default=FORMAT)

    # --- reading ---------------------------------------------------------------------------------------

    @classmethod
    def read(cls, location: str) -> Manifest:
        """The manifest at a dataset folder or manifest.json (local or s3://), validated."""
        uri = manifest_uri(location)
        try:
            data = storage.read_bytes(uri)
        except (FileNotFoundError, NotADirectoryError) as exc:  # the latter: a file given as the folder
            raise ManifestError(f"no dataset manifest at {uri}: build one with `p2p dataset build`") from exc
        return cls.from_json(data, origin=uri)

    @classmethod
    def from_json(cls, text: str | bytes, origin: str = "manifest") -> Manifest:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # the last: absurd nesting
            raise ManifestError(f"{origin} is not JSON: {exc}") from exc
        return cls.from_dict(data, origin)

    @classmethod
    def from_dict(cls, data: Any, origin: str = "manifest") -> Manifest:
        """Validate and convert; every problem is a ManifestError naming `origin` and the key."""
        read = _Reader(origin)
        if not isinstance(data, dict):
            raise ManifestError(f"{origin}: a manifest is a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ManifestError(f"{origin} is not a {FORMAT} manifest (format={data.get('format')!r})")
        fmt = read.get(data, "sample_format", dict)
        sample_format = SampleFormat(
            input=read.get(fmt, "input", str, "sample_format"),
            target=read.get(fmt, "target", str, "sample_format"),
            meta=read.get(fmt, "meta", str, "sample_format", default="json"),
            input_channels=read.get(fmt, "input_channels", int, "sample_format"),
            target_channels=read.get(fmt, "target_channels", int, "sample_format", default=3),
            input_is_label_map=read.get(fmt, "input_is_label_map", bool, "sample_format"),
        )
        for name in ("input_channels", "target_channels"):
            if getattr(sample_format, name) not in (1, 3):
                raise ManifestError(f"{origin}: sample_format.{name} must be 1 or 3")
        splits = {name: read.split(name, value) for name, value in read.get(data, "splits", dict).items()}
        t = read.get(data, "totals", dict)
        totals = Totals(
            **{k: read.get(t, k, int, "totals") for k in _TOTAL_INTS},
            build_seconds=read.get(t, "build_seconds", (int, float), "totals"),
            files_ignored=read.get(t, "files_ignored", int, "totals", default=None),
        )
        quarantine = tuple(
            QuarantineRecord(
                tuple(read.strings(read.get(q, "paths", list, f"quarantine[{i}]"), f"quarantine[{i}].paths")),
                read.get(q, "reason", str, f"quarantine[{i}]"),
            )
            for i, q in enumerate(read.get(data, "quarantine", list, default=[]))
            if read.is_object(q, f"quarantine[{i}]")
        )
        scanned = read.get(data, "scanned_folders", list, default=None)
        palette = read.get(data, "palette", dict, default=None)
        manifest = cls(
            build_id=read.get(data, "build_id", str),
            created=read.get(data, "created", str),
            config=read.get(data, "config", dict),
            palette=palette,
            sample_format=sample_format,
            splits=splits,
            totals=totals,
            quarantine=quarantine,
            scanned_folders=None if scanned is None else tuple(read.strings(scanned, "scanned_folders")),
        )
        problems = manifest.problems()
        if problems:
            raise ManifestError(f"{origin} is inconsistent: " + "; ".join(problems))
        return manifest

    def problems(self) -> list[str]:
        """What makes this manifest unusable (empty when valid): paths, sums, totals, split names."""
        problems = []
        seen_paths: set[str] = set()
        for name, split in self.splits.items():
            if name not in SPLITS:
                problems.append(f"split {name!r} is not one of {', '.join(SPLITS)}")
            for shard in split.shards:
                why = unsafe_path(shard.path)
                if why:
                    problems.append(f"shard path {shard.path!r} in {name}: {why}")
                if shard.path in seen_paths:
                    problems.append(f"shard path {shard.path!r} is listed twice")
                seen_paths.add(shard.path)
                if shard.samples < 0 or shard.bytes < 0:
                    problems.append(f"shard {shard.path}: negative samples or bytes")
                if not _SHA256.fullmatch(shard.sha256):
                    problems.append(f"shard {shard.path}: sha256 is not 64 lowercase hex digits")
            for what in ("samples", "bytes"):
                listed = sum(getattr(s, what) for s in split.shards)
                if getattr(split, what) != listed:
                    problems.append(
                        f"splits.{name}.{what} is {getattr(split, what)} but its shards add up to {listed}"
                    )
        t = self.totals
        expected = {
            "samples_written": sum(s.samples for s in self.splits.values()),
            "bytes": sum(s.bytes for s in self.splits.values()),
            "shards": sum(len(s.shards) for s in self.splits.values()),
            "quarantined": len(self.quarantine),
            "items_seen": t.samples_written + t.quarantined,
        }
        for key, value in expected.items():
            if getattr(t, key) != value:
                problems.append(f"totals.{key} is {getattr(t, key)}, expected {value}")
        # Files: each sample holds one or two source files; quarantined ones are listed; ignored are counted.
        listed = sum(len(q.paths) for q in self.quarantine) + (t.files_ignored or 0)
        if not listed + t.samples_written <= t.files_seen <= listed + 2 * t.samples_written:
            problems.append(
                f"totals.files_seen ({t.files_seen}) does not fit {t.samples_written} samples, "
                f"{listed} quarantined or ignored files"
            )
        return problems

    # --- writing ---------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        values: dict[str, Any] = {
            "format": self.format,
            "build_id": self.build_id,
            "created": self.created,
            "config": self.config,
            "palette": self.palette,
            "sample_format": self.sample_format.to_dict(),
            "splits": {name: split.to_dict() for name, split in self.splits.items()},
            "totals": self.totals.to_dict(),
            "quarantine": [q.to_dict() for q in self.quarantine],
        }
        if self.scanned_folders is not None:
            values["scanned_folders"] = list(self.scanned_folders)
        return values

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def write(self, location: str) -> str:
        """Write atomically (readers see the old manifest or this one, never a part); returns its URI."""
        problems = self.problems()
        if problems:
            raise ManifestError("refusing to write an inconsistent manifest: " + "; ".join(problems))
        uri = manifest_uri(location)
        storage.write_bytes_atomic(uri, self.to_json().encode())
        return uri

    # --- questions consumers ask -----------------------------------------------------------------------

    def shards(self, split: str | None = None) -> list[ShardEntry]:
        """The shards of `split` (all splits, in name order, if None), in manifest order."""
        if split is None:
            return [s for name in sorted(self.splits) for s in self.splits[name].shards]
        return list(self.split(split).shards)

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise ManifestError(
                f"split {name!r} is not in the manifest (it has {', '.join(sorted(self.splits)) or 'none'})"
            )
        return self.splits[name]

    def channels(self, direction: Literal["AtoB", "BtoA"] = "AtoB") -> tuple[int, int]:
        """``(input_nc, output_nc)`` of a model trained on this dataset in this direction."""
        stored = (self.sample_format.input_channels, self.sample_format.target_channels)
        if direction not in ("AtoB", "BtoA"):
            raise ValueError(f"direction must be AtoB or BtoA, got {direction!r}")
        return stored if direction == "AtoB" else (stored[1], stored[0])

    @property
    def builder(self) -> str:
        """How inputs were made: none, labels, canny, hed or grayscale."""
        return str(self.config.get("derive", {}).get("builder", "none"))


_TOTAL_INTS = ("files_seen", "items_seen", "samples_written", "quarantined", "shards", "bytes")


def printable(name: str) -> str:
    """A name as text any console can print: bytes that were not UTF-8 (kept as surrogate escapes by the
    tar reader and os listings) shown as \\udcXX."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


def unsafe_path(path: str) -> str:
    """Why `path` may not be a shard path ("" if it may): it must stay inside the dataset root on every
    filesystem and object store, so a manifest can never make a reader open another file."""
    if not path:
        return "empty"
    if "\\" in path:
        return "backslashes are not path separators here"
    if path.startswith("/"):
        return "absolute path"
    if "://" in path:
        return "URI scheme"
    if _DRIVE.match(path):
        return "drive letter"
    parts = path.split("/")
    if ".." in parts:
        return "'..' component"
    if any(p in ("", ".") for p in parts):
        return "empty or '.' component"
    if any(ord(c) < 32 for c in path):
        return "control character"
    try:
        path.encode("utf-8")  # a name read with surrogateescape: not printable, not a valid S3 key
    except UnicodeEncodeError:
        return "not valid UTF-8"
    return ""


class _Reader:
    """Typed access to the parsed JSON, with errors that name the file and the key."""

    _MISSING = object()

    def __init__(self, origin: str) -> None:
        self.origin = origin

    def get(self, obj: dict[str, Any], key: str, kind: Any, where: str = "", default: Any = _MISSING) -> Any:
        name = f"{where}.{key}" if where else key
        if key not in obj:
            if default is self._MISSING:
                raise ManifestError(f"{self.origin}: missing {name}")
            return default
        value = obj[key]
        if value is None and default is None:
            return None
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int to isinstance: a count of True is a mistake, not a number.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            expected = " or ".join(k.__name__ for k in kinds)
            raise ManifestError(f"{self.origin}: {name} must be {expected}, got {type(value).__name__}")
        return value

    def is_object(self, value: Any, where: str) -> bool:
        if not isinstance(value, dict):
            raise ManifestError(f"{self.origin}: {where} must be an object, got {type(value).__name__}")
        return True

    def strings(self, values: list[Any], where: str) -> list[str]:
        if not all(isinstance(v, str) for v in values):
            raise ManifestError(f"{self.origin}: {where} must be a list of strings")
        return values

    def split(self, name: str, value: Any) -> SplitInfo:
        where = f"splits.{name}"
        self.is_object(value, where)
        shards = []
        for i, s in enumerate(self.get(value, "shards", list, where)):
            at = f"{where}.shards[{i}]"
            self.is_object(s, at)
            shards.append(
                ShardEntry(
                    name,
                    self.get(s, "path", str, at),
                    self.get(s, "samples", int, at),
                    self.get(s, "bytes", int, at),
                    self.get(s, "sha256", str, at),
                )
            )
        return SplitInfo(
            tuple(shards), self.get(value, "samples", int, where), self.get(value, "bytes", int, where)
        )


# ----------------------------------------------------------------------------------------------------------
# Functions kept for call sites that take a location (and for other stages' imports)
# ----------------------------------------------------------------------------------------------------------


def read_manifest(location: str) -> Manifest:
    """Same as `Manifest.read`."""
    return Manifest.read(location)


def write_manifest(location: str, manifest: Manifest) -> str:
    """Same as `manifest.write(location)`: written last and atomically by the build."""
    return manifest.write(location)


def shard_uris(location: str, manifest: Manifest, split: str) -> list[str]:
    """Full URIs of a split's shards (paths were checked to stay inside the dataset root on read)."""
    root = dataset_root(location)
    return [storage.join(root, entry.path) for entry in manifest.shards(split)]


def tar_sample_keys(data: bytes) -> list[str]:
    """Sample keys in a shard, in order (WebDataset groups members by the name before the first dot)."""
    keys: list[str] = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            directory, _, base = member.name.rpartition("/")
            key = f"{directory}/{base.split('.', 1)[0]}" if directory else base.split(".", 1)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
    return keys


def verify_shards(location: str, manifest: Manifest) -> list[str]:
    """Problems found by re-reading every listed shard: missing, unreadable, size, sha256, sample count,
    and members no reader would accept (links, devices, unsafe names, oversized: `pipelines.shards`).
    Every shard is checked and every problem reported; one broken shard never stops the others."""
    from pipelines.shards import HashingReader, ShardFault, read_members, split_name

    problems = []
    root = dataset_root(location)
    for entry in manifest.shards():
        uri = storage.join(root, entry.path)
        try:
            stream = storage.open_input_stream(uri)
        except FileNotFoundError:
            problems.append(f"{entry.path}: missing")
            continue
        except (storage.StorageError, OSError) as exc:  # e.g. a folder in its place, no permission
            problems.append(f"{entry.path}: cannot be read: {exc}")
            continue
        keys: list[str] = []
        # Buffered as the loader reads: tarfile's small reads would each be one S3 request (~10 KiB).
        with stream, pa.BufferedInputStream(stream, 8 << 20) as buffered:
            # No byte limit: count everything, to report the real size.
            reader = HashingReader(storage.WatchedReads(buffered, uri))
            try:
                for member in read_members(reader):
                    if member.problem:
                        problems.append(f"{entry.path}: member {printable(member.name)}: {member.problem}")
                        continue
                    key = split_name(member.name)[0]
                    if not keys or keys[-1] != key:
                        keys.append(key)
            except ShardFault as exc:
                problems.append(f"{entry.path}: {exc}")
            except OSError as exc:
                problems.append(f"{entry.path}: cannot be read: {exc}")
                continue
            try:
                size, digest = reader.finish()
            except OSError as exc:
                problems.append(f"{entry.path}: cannot be read: {exc}")
                continue
        if size != entry.bytes:
            problems.append(f"{entry.path}: {size} bytes, manifest says {entry.bytes}")
        if digest != entry.sha256:
            problems.append(f"{entry.path}: sha256 differs from the manifest")
        if len(keys) != entry.samples:
            problems.append(f"{entry.path}: {len(keys)} samples read, the manifest says {entry.samples}")
    return problems
