"""What a dataset build read: the record that keeps a touched source from being a new build.

A build's identity is its config and, per source file, path, size and modification time: a file rewritten
in place is a new build. A `touch`, a `cp -r` or a sync that does not keep times changes only the time, and
would rebuild every shard (hours of HED on a large source). So each build records, in its shards folder
(`SOURCES_NAME`), every file it read as [size, time as planned, sha256 of the bytes its shard task read,
time it was listed with]; the next plan re-reads only files with a new time at their old size, and plans
those still holding the recorded bytes with their old time (`same_content_times`).

Contract:
- the shard tasks hash what they read (`read_source`) and hand the hashes back in their records (and
  sidecars, so reused shards keep them); `write_sources` writes the record with the manifest;
- the record is a cache: unreadable, damaged or foreign, it only loses its shortcut (said once), never
  fails a build;
- a file planned with its old time must be read with its recorded bytes (`changed_while_read`), else the
  build fails before its manifest.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import hashlib
import json
from typing import Any

from pipelines import storage
from pipelines.manifest import SOURCES_NAME, printable

SOURCE_GONE = "listed, then removed from the source during the build"


def read_source(uri: str, sources: dict[str, str]) -> bytes:
    """A source file's bytes, their sha256 put into `sources`."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:  # not bad data, nor a storage fault: the source changed under the build
        raise FileNotFoundError(f"{printable(uri)} was {SOURCE_GONE}") from None
    sources[uri] = hashlib.sha256(data).hexdigest()
    return data


def sources_uri(output: str, build_id: str) -> str:
    return storage.join(output, "shards", build_id, SOURCES_NAME)


def previous_sources(output: str, previous: str | None) -> dict[str, list[Any]]:
    """uri → [size, planned time, sha256 or None, listed time] of the files build `previous` of `output`
    read; {} when there is none (a first build, one written before this record existed, or an unreadable
    record)."""
    if previous is None:
        return {}
    try:
        data = storage.read_bytes(sources_uri(output, previous))
    except FileNotFoundError:
        return {}
    try:
        files = json.loads(gzip.decompress(data))["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
        return {uri: entry for uri, entry in files.items() if source_entry(entry)}
    except Exception as exc:  # a cache: truncated gzip (EOFError), zlib.error, bad JSON, ... all fall back
        print(
            f"[build] {sources_uri(output, previous)} is unreadable ({first_line(exc)}): a file with a new "
            "time counts as changed",
            flush=True,
        )
        return {}


def source_entry(entry: Any) -> bool:
    """Whether a recorded file entry has the shape `write_sources` gives it (a hand-edited or foreign record
    loses its bad entries, one by one)."""
    return (
        isinstance(entry, list)
        and len(entry) == 4
        and all(type(entry[i]) in (int, float) for i in (0, 1, 3))  # not bool, which is an int too
        and (entry[2] is None or isinstance(entry[2], str))
    )


def same_content_times(
    infos: list[tuple[str, int, float]], recorded: dict[str, list[Any]], threads: int = 16
) -> tuple[dict[str, float], dict[str, str]]:
    """Each listed file's time as the plan takes it: its own, except for a file the last build read at the
    same size and another time whose bytes still hash to what that build read: that build's time. A
    `touch`, a `cp -r` or a sync that does not keep times is then "up to date", not a rebuild of every
    shard. Only such files are read here (in threads: on S3 each is a request), and each only once: the
    record keeps the time it was last seen with those bytes (`write_sources`, `refresh_sources`). Also
    returns those files' recorded sha256: their shards must hold those bytes (`changed_while_read`)."""
    times = {uri: mtime for uri, _, mtime in infos}
    proven: dict[str, str] = {}
    suspects = []
    for uri, size, mtime in infos:
        entry = recorded.get(uri)
        if entry is None or entry[0] != size or entry[1] == mtime:
            continue
        if entry[3] == mtime and entry[2]:  # seen with these bytes at this very time before
            times[uri], proven[uri] = float(entry[1]), entry[2]
        elif entry[2]:
            suspects.append((uri, entry))
    if not suspects:
        return times, proven
    print(
        f"[build] {len(suspects)} file(s) have new times at their old sizes: comparing their content",
        flush=True,
    )

    def unchanged(item: tuple[str, list[Any]]) -> bool:
        uri, entry = item
        try:
            return hashlib.sha256(storage.read_bytes(uri)).hexdigest() == entry[2]
        except FileNotFoundError:  # gone since the listing: the build fails on it (`read_source`)
            return False

    with concurrent.futures.ThreadPoolExecutor(max(1, min(threads, len(suspects)))) as pool:
        same = [item for item, kept in zip(suspects, pool.map(unchanged, suspects), strict=True) if kept]
    for uri, entry in same:
        times[uri], proven[uri] = float(entry[1]), entry[2]
    print(f"[build] {len(same)} of them hold the same bytes: planned as before", flush=True)
    return times, proven


def write_sources(
    output: str, build_id: str, planned: dict[str, tuple[int, float, float]], records: list[dict[str, Any]]
) -> None:
    """Record what this build read (`previous_sources`): for each file of `planned` (size, time as planned,
    time as listed), [size, time as planned, sha256 of the bytes the shard tasks read (None if not read),
    time as listed]."""
    hashes = read_hashes(records)
    files = {
        uri: [size, plan_time, hashes.get(uri), seen] for uri, (size, plan_time, seen) in planned.items()
    }
    _write_sources(output, build_id, files)


def refresh_sources(
    output: str,
    build_id: str,
    planned: dict[str, tuple[int, float, float]],
    recorded: dict[str, list[Any]],
) -> None:
    """An up-to-date build whose files were seen at new times (same bytes, `same_content_times`): record
    those times, so the next build does not read them again. `recorded`: this build's record, as the plan
    read it."""
    files = {
        uri: [size, plan_time, (recorded.get(uri) or [None] * 4)[2], seen]
        for uri, (size, plan_time, seen) in planned.items()
    }
    if files != recorded:
        _write_sources(output, build_id, files)


def changed_while_read(proven: dict[str, str], records: list[dict[str, Any]]) -> list[str]:
    """The files planned with their old time for their recorded bytes (`proven`) that the shard tasks read
    with other bytes: rewritten between the plan and the read, or read by an interrupted run whose shard is
    reused now."""
    read = read_hashes(records)
    return sorted(uri for uri, sha256 in proven.items() if uri in read and read[uri] != sha256)


def read_hashes(records: list[dict[str, Any]]) -> dict[str, str]:
    """uri → sha256 of the bytes the shard tasks read, from their records (a reused shard's come from its
    sidecar, which an older build may have written without them, or anyone with anything)."""
    hashes: dict[str, str] = {}
    for r in records:
        sources = r.get("sources")
        if isinstance(sources, dict):
            hashes.update((k, v) for k, v in sources.items() if isinstance(k, str) and isinstance(v, str))
    return hashes


def _write_sources(output: str, build_id: str, files: dict[str, list[Any]]) -> None:
    data = gzip.compress(json.dumps({"format": 1, "files": dict(sorted(files.items()))}).encode(), mtime=0)
    storage.write_bytes_atomic(sources_uri(output, build_id), data)


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
