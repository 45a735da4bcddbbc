"""`p2p dataset inspect LOCATION`: what a built dataset holds, from its manifest alone, optionally verified.

The CLI calls `inspect_dataset` and exits with its return value: 0, or 1 when `--verify` finds a shard that
is missing, unreadable or differs from the manifest (size, sha256, sample count, unsafe members); every
shard is checked and every problem printed, a corrupt or truncated one included. A manifest that does not
validate raises `ManifestError` before anything is printed.

It also lists orphans: files under the dataset that the manifest does not list (shards of other or
interrupted builds, their sidecars, temp files of killed writes), and a build lock if one is held. Orphans
do not change the exit status: the next build of any config removes them under its lock, unless they were
written after the current manifest (an interrupted newer build, kept so that it can resume).

`summarize` is also the last line of `p2p dataset build`, so a build and a later inspect describe a
dataset in the same words.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from pipelines import storage
from pipelines.config import option
from pipelines.listing import reason_counts
from pipelines.manifest import MANIFEST_NAME, SOURCES_NAME, Manifest, dataset_root, printable, verify_shards


@dataclass
class InspectConfig:
    location: str = option("", "dataset folder / s3:// prefix, or its manifest.json")
    verify: bool = option(False, "re-read every shard: size, sha256, samples (exit status 1 on a problem)")
    json: bool = option(False, "print the whole manifest as JSON")
    show_quarantine: int = option(20, "list the first N quarantined items")


def ignored_line(files_ignored: int, scanned_folders: Sequence[str]) -> str:
    """The one line that accounts for files the build did not read (never one line per file)."""
    return (
        f"ignored {files_ignored} file(s) outside the scanned folders ({', '.join(scanned_folders)}): "
        "not inputs of this layout"
    )


def summarize(manifest: Manifest) -> str:
    t = manifest.totals
    lines = [
        f"dataset {manifest.build_id}: {t.samples_written} samples in {t.shards} shards "
        f"({t.bytes / 1e6:.1f} MB); {t.quarantined} quarantined; {t.items_seen} items from "
        f"{t.files_seen} files seen"
    ]
    if t.files_ignored:
        lines.append("  " + ignored_line(t.files_ignored, manifest.scanned_folders or ()))
    for name, split in sorted(manifest.splits.items()):
        lines.append(f"  {name:5s}: {split.samples:6d} samples, {len(split.shards)} shards")
    for reason, count in reason_counts(q.reason for q in manifest.quarantine):
        lines.append(f"  quarantined {count:5d} × {reason}")
    return "\n".join(lines)


def run_inspect(cfg: InspectConfig) -> int:
    """`p2p dataset inspect` with its config; returns the exit status."""
    if not cfg.location:
        raise ValueError("give the dataset: p2p dataset inspect LOCATION")
    if cfg.show_quarantine < 0:
        raise ValueError(f"--show-quarantine must be >= 0, got {cfg.show_quarantine}")
    return inspect_dataset(cfg.location, cfg.verify, cfg.show_quarantine, cfg.json)


def inspect_dataset(
    location: str, verify: bool = False, show_quarantine: int = 0, as_json: bool = False
) -> int:
    """Print the summary (or the whole manifest as JSON) and, with `verify`, re-read every shard.
    Returns the exit status."""
    location = storage.normalize_uri(location)  # listed files come back absolute: orphans compare with them
    manifest = Manifest.read(location)
    if as_json:
        print(manifest.to_json(), end="")
    else:
        print(summarize(manifest))
        for q in manifest.quarantine[:show_quarantine]:
            print(f"  - {', '.join(one_line(path) for path in q.paths)}: {q.reason}")
    report_orphans(location, manifest)
    if verify:
        problems = verify_shards(location, manifest)
        for problem in problems:
            print(f"PROBLEM {problem}")
        verdict = f"{len(problems)} problems" if problems else "OK"
        print(f"verified {manifest.totals.shards} shards: {verdict}")
        return 1 if problems else 0
    return 0


KEPT_MANIFEST = re.compile(r"manifest\.[0-9a-f]+\.json")  # a replaced build's (`replaced_manifest_uri`)


def one_line(name: str) -> str:
    """A user's file name on one console line: control characters (a newline, a tab) escaped, which would
    split or garble the listing; everything else as it is."""
    return "".join(repr(c)[1:-1] if unicodedata.category(c) == "Cc" else c for c in printable(name))


def orphans(location: str, manifest: Manifest) -> list[tuple[str, int]]:
    """(path relative to the dataset, bytes) of every file under it that the manifest does not list."""
    from pipelines.dataset.lock import LOCK_NAME

    root = dataset_root(location)
    own = {MANIFEST_NAME, LOCK_NAME, f"shards/{manifest.build_id}/{SOURCES_NAME}"}
    known = own | {s.path for s in manifest.shards()}
    found = []
    for uri, size in storage.list_file_sizes(root, include_temp=True):
        relative = uri[len(root.rstrip("/")) + 1 :]
        if relative not in known:
            found.append((relative, size))
    return found


def report_orphans(location: str, manifest: Manifest, show: int = 20) -> None:
    from pipelines.dataset.lock import describe, read_lock, stale_reason

    lock = read_lock(dataset_root(location))
    if lock is not None:
        stale = stale_reason(lock, ttl_s=120.0)
        state = f"stale ({stale})" if stale else "held"
        print(f"build lock {state}: {describe(lock)}")
    found = orphans(location, manifest)
    if not found:
        return
    total = sum(size for _, size in found)
    # A build cleans up only its own folder, shards/, and the manifests it kept beside its own
    # (`remove_other_builds`).
    in_shards = sum(
        1 for relative, _ in found if relative.startswith("shards/") or KEPT_MANIFEST.fullmatch(relative)
    )
    later = " (a replaced build's once keep_replaced_hours have passed)"
    if in_shards == len(found):
        fate = f"the next build removes them{later}"
    elif in_shards:
        fate = (
            f"the next build removes the {in_shards} of builds (shards/, manifest.<build>.json){later}; "
            "delete the others if unwanted"
        )
    else:
        fate = "no build removes them: delete them if unwanted"
    print(f"orphans: {len(found)} file(s), {total / 1e6:.1f} MB, listed by no manifest ({fate})")
    for relative, size in found[:show]:
        print(f"  orphan {one_line(relative)} ({size} bytes)")
    if len(found) > show:
        print(f"  … and {len(found) - show} more")
