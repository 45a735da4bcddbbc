"""The dataset manifest: the only list of shards that training trusts.

Written last and atomically by `p2p dataset build`, so a shard that is not listed here (a crashed build's
leftovers, another build's files) does not exist for any reader. Shard paths are relative to the folder
that holds the manifest, so a dataset can be copied or synced as a whole.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from typing import Any

from pipelines import storage

MANIFEST_NAME = "manifest.json"
FORMAT = "p2p-dataset/1"


class ManifestError(ValueError):
    pass


def manifest_uri(location: str) -> str:
    """Accept the manifest itself or the dataset folder that holds it."""
    return location if location.endswith(".json") else storage.join(location, MANIFEST_NAME)


def dataset_root(manifest_location: str) -> str:
    uri = manifest_uri(manifest_location)
    return uri.rsplit("/", 1)[0] if "/" in uri else "."


@dataclass(frozen=True)
class ShardEntry:
    split: str
    path: str  # relative to the dataset root
    samples: int
    bytes: int
    sha256: str


def read_manifest(location: str) -> dict[str, Any]:
    uri = manifest_uri(location)
    try:
        manifest = json.loads(storage.read_bytes(uri))
    except FileNotFoundError as exc:
        raise ManifestError(f"no dataset manifest at {uri}: build one with `p2p dataset build`") from exc
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"{uri} is not a {FORMAT} manifest (format={manifest.get('format')!r})")
    return dict(manifest)


def manifest_sha256(location: str) -> str:
    """sha256 of the manifest file: identifies the exact evaluation data a score was computed on."""
    return hashlib.sha256(storage.read_bytes(manifest_uri(location))).hexdigest()


def write_manifest(location: str, manifest: dict[str, Any]) -> str:
    uri = manifest_uri(location)
    storage.write_bytes_atomic(uri, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return uri


def shard_entries(manifest: dict[str, Any], split: str | None = None) -> list[ShardEntry]:
    splits = [split] if split else sorted(manifest["splits"])
    entries = []
    for name in splits:
        if name not in manifest["splits"]:
            raise ManifestError(
                f"split {name!r} is not in the manifest (it has {', '.join(manifest['splits'])})"
            )
        for shard in manifest["splits"][name]["shards"]:
            entries.append(ShardEntry(name, shard["path"], shard["samples"], shard["bytes"], shard["sha256"]))
    return entries


def shard_uris(location: str, manifest: dict[str, Any], split: str) -> list[str]:
    root = dataset_root(location)
    return [storage.join(root, entry.path) for entry in shard_entries(manifest, split)]


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


def verify_shards(location: str, manifest: dict[str, Any]) -> list[str]:
    """Problems found by re-reading every listed shard: missing, size, sha256 or sample count differ."""
    problems = []
    root = dataset_root(location)
    for entry in shard_entries(manifest):
        uri = storage.join(root, entry.path)
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError:
            problems.append(f"{entry.path}: missing")
            continue
        if len(data) != entry.bytes:
            problems.append(f"{entry.path}: {len(data)} bytes, manifest says {entry.bytes}")
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            problems.append(f"{entry.path}: sha256 differs from the manifest")
        if len(tar_sample_keys(data)) != entry.samples:
            problems.append(f"{entry.path}: sample count differs from the manifest ({entry.samples})")
    return problems
