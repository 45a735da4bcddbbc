"""Reading shards without trusting them: the one tar reader behind training, evaluation, `p2p translate` and
`p2p dataset inspect --verify`.

Shards come from our own build, but a reader must survive one that was damaged, truncated or crafted. The
contract of `read_members`:

- Members must be regular files. Symbolic and hard links, devices, FIFOs, directories and sparse files are
  faults: a link would make one name read another member's bytes, a sparse map can announce gigabytes.
- Names must be relative paths that stay inside the shard (`manifest.unsafe_path`: no absolute path, no
  ``..``, no empty or ``.`` component, no backslash or control character) and have an extension (WebDataset
  groups ``<key>.<suffix>``). A ``/`` inside a name is allowed: keys keep the source's sub-folders.
- A member's declared size is checked against ``max_member_bytes`` (64 MiB by default) from its header,
  before any of its data is read; pax and GNU long-name records are bounded by the byte limit below.
- `HashingReader` counts and hashes the bytes as they stream through (no second read, no whole-shard
  buffer) and refuses to read past the manifest's byte count, so no header can make a reader buffer more
  than the manifest promised; `finish()` reads the end-of-archive padding and returns size and sha256 for
  the caller to compare with the manifest at the end of the shard.

A fault in one member yields it with a reason (`Member.problem`): training fails on it (`ShardError`),
translation quarantines it and goes on. A fault in the archive itself (truncated, not a tar, too long)
raises `ShardFault`: nothing after it can be read.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipelines.manifest import unsafe_path

DEFAULT_MAX_MEMBER_BYTES = 64 << 20
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE)
_KINDS = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
    tarfile.DIRTYPE: "a directory",
    tarfile.CONTTYPE: "a contiguous file",
    tarfile.GNUTYPE_SPARSE: "a sparse file",
}
_KEY_SUFFIX = re.compile(r"^((?:.*/)?[^./]+)\.([^/]+)$")  # <key>.<suffix>: the key ends at its first dot


class ShardFault(Exception):
    """The archive itself cannot be read on (truncated, not a tar, longer than the manifest says)."""

    def __init__(self, reason: str, member: str | None = None) -> None:
        super().__init__(f"member {member}: {reason}" if member else reason)
        self.reason, self.member = reason, member


@dataclass(frozen=True)
class Member:
    name: str
    data: bytes | None  # None when the member has a problem
    problem: str = ""


class HashingReader:
    """A file-like ``read`` that counts, optionally hashes, and stops at ``limit`` bytes (the manifest's)."""

    def __init__(self, raw: Any, limit: int | None = None, sha256: bool = True) -> None:
        self.raw, self.limit = raw, limit
        self.count = 0
        self._hash = hashlib.sha256() if sha256 else None

    def read(self, size: int | None = -1) -> bytes:
        data = bytes(self.raw.read() if size is None or size < 0 else self.raw.read(size))
        self.count += len(data)
        if self.limit is not None and self.count > self.limit:
            raise ShardFault(f"longer than the {self.limit} bytes the manifest lists")
        if self._hash is not None:
            self._hash.update(data)
        return data

    def finish(self) -> tuple[int, str | None]:
        """Read what is left (the end-of-archive blocks); (bytes read in all, sha256 or None)."""
        while self.read(1 << 20):
            pass
        return self.count, self._hash.hexdigest() if self._hash is not None else None


def member_problem(info: tarfile.TarInfo, max_member_bytes: int) -> str:
    """Why a member may not be read ("" if it may), from its header alone."""
    if info.type not in _REGULAR or info.sparse is not None:
        kind = "a sparse file" if info.sparse is not None else _KINDS.get(info.type, f"type {info.type!r}")
        return f"not a regular file ({kind})"
    why = unsafe_path(info.name)
    if why:
        return f"unsafe name ({why})"
    if not _KEY_SUFFIX.match(info.name):
        return "name is not <key>.<suffix>"
    if info.size > max_member_bytes:
        return f"{info.size:,} bytes, over the {max_member_bytes:,}-byte member limit"
    return ""


def read_members(stream: Any, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[Member]:
    """Members of a tar read sequentially from ``stream`` (anything with ``read``), validated as the module
    docstring says. Raises ShardFault when the archive cannot be read on."""
    name: str | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|", encoding="utf-8", errors="surrogateescape") as tar:
            for info in tar:
                name = info.name
                problem = member_problem(info, max_member_bytes)
                if problem:
                    yield Member(name, None, problem)
                    continue
                extracted = tar.extractfile(info)
                data = extracted.read() if extracted is not None else b""
                if len(data) != info.size:
                    raise ShardFault(f"truncated: {len(data)} of {info.size} bytes", name)
                yield Member(name, data)
    except ShardFault:
        raise
    except (tarfile.TarError, EOFError, ValueError, UnicodeError) as exc:
        after = f" after member {name}" if name else ""
        raise ShardFault(f"not a readable tar{after}: {exc}") from exc


def split_name(name: str) -> tuple[str, str]:
    """``"a/b/key.input.png"`` → ``("a/b/key", "input.png")``: WebDataset's grouping rule."""
    match = _KEY_SUFFIX.match(name)
    if match is None:
        raise ValueError(f"{name!r} is not <key>.<suffix>")
    return match.group(1), match.group(2)
