"""Listing raw images: keys, pairing names and the quarantine record, shared by the dataset build and by
batch translation.

A file's key is its path below the listed folder without the extension; it pairs inputs with targets and
names outputs. Files that cannot be used (unreadable names, non-images, a second file with the same key) are
returned as quarantine records with a reason, never dropped silently.
"""

from __future__ import annotations

import posixpath
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp"}


def quarantine_record(paths: list[str], reason: str) -> dict[str, Any]:
    return {"kind": "quarantine", "paths": paths, "reason": reason}


def reason_counts(reasons: Iterable[str]) -> list[tuple[str, int]]:
    """Quarantine reasons grouped by their kind (the text before a ':' that opens its details), most
    frequent first: what a summary line shows."""
    return Counter(reason_kind(reason) for reason in reasons).most_common()


def reason_kind(reason: str) -> str:
    """A reason up to its first ':', or, if that ':' is inside parentheses, up to them: "not an image
    (unrecognised format; looks like text: ...)" is "not an image", not cut mid-parenthesis."""
    opened: list[int] = []
    for i, char in enumerate(reason):
        if char == "(":
            opened.append(i)
        elif char == ")" and opened:
            opened.pop()
        elif char == ":":
            return reason[: opened[0] if opened else i].rstrip()
    return reason


def file_key(relative: str) -> str:
    """The pairing key: the path below the side's folder without its extension, as named."""
    return posixpath.splitext(relative)[0]


def by_unicode_form(keys: dict[str, tuple[str, int]], quarantine: list[dict[str, Any]]) -> dict[str, str]:
    """NFC form → key as named, to pair names across Unicode forms: macOS tools write "café" decomposed
    (NFD), most others composed (NFC); the two print alike and are one name to a user. Keys keep their own
    form (it places a sample in its split). A second name of one form in the same folder is a duplicate."""
    forms: dict[str, str] = {}
    for key in sorted(keys):
        form = unicodedata.normalize("NFC", key)
        if form in forms:
            other = posixpath.basename(keys[forms[form]][0])
            reason = f"duplicate key {form!r}: also {other} (the same name in another Unicode form)"
            quarantine.append(quarantine_record([keys[key][0]], reason))
        else:
            forms[form] = key
    return forms


def shard_key(key: str) -> str:
    # WebDataset splits a member name at the first dot of its base name: keys must not contain dots.
    return key.replace(".", "_")


def relative_to(uri: str, root: str) -> str:
    return uri[len(root.rstrip("/")) + 1 :]


def readable_name(relative: str) -> bool:
    try:
        relative.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return not any(ord(c) < 32 for c in relative)


def sample_key(relative: str) -> str:
    return shard_key(file_key(relative))


def list_images(
    root: str,
    files: list[tuple[str, int]],
    quarantine: list[dict[str, Any]],
    make_key: Callable[[str], str] = sample_key,
    keep_first: bool = True,
) -> dict[str, tuple[str, int]]:
    """key → (uri, size) for the image files under `root`; everything else (unreadable names, non-images,
    a second file with the same key) is quarantined with a reason. ``keep_first=False``: every file of a
    key held by several is quarantined (where neither is the obvious one to use)."""
    by_key: dict[str, tuple[str, int]] = {}
    ambiguous: dict[str, str] = {}  # key → the first file of it, quarantined with the others
    for uri, size in files:
        relative = relative_to(uri, root)
        if not readable_name(relative):
            quarantine.append(
                quarantine_record([uri], "unreadable file name (not valid UTF-8 or control chars)")
            )
        elif posixpath.splitext(relative)[1].lower() not in IMAGE_EXTENSIONS:
            quarantine.append(quarantine_record([uri], f"not an image file ({posixpath.basename(relative)})"))
        elif (key := make_key(relative)) in by_key or key in ambiguous:
            other = by_key[key][0] if key in by_key else ambiguous[key]
            quarantine.append(
                quarantine_record([uri], f"duplicate key {key!r}: also {posixpath.basename(other)}")
            )
            if not keep_first and key in by_key:
                ambiguous[key] = by_key.pop(key)[0]
                reason = f"duplicate key {key!r}: also {posixpath.basename(uri)}"
                quarantine.append(quarantine_record([ambiguous[key]], reason))
        else:
            by_key[key] = (uri, size)
    return by_key
