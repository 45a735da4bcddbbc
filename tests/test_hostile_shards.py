"""Hostile shards through every reader: the training/eval loader (a ShardError naming shard and member),
`p2p dataset inspect --verify` (every problem reported, no traceback) and `p2p translate` (each fault
quarantined, the good samples translated). Shards are crafted here byte by byte with real tar headers:
links, devices, huge and sparse members, unsafe names, a pixel bomb, a sha256 mismatch, a truncated shard
and a 40-character CJK name that must read fine. Manifest-level traversal paths are tests/test_manifest.py's.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from pipelines.dataset.build import tar_bytes
from pipelines.dataset.inspect import inspect_dataset
from pipelines.manifest import Manifest, SampleFormat, ShardEntry, SplitInfo, Totals
from pipelines.training.loader import LoaderConfig, ShardError, make_eval_loader

FORMAT = SampleFormat("input.png", "target.png", input_channels=3, input_is_label_map=False)
LONG_KEY = "長い名前のファイル" * 4 + "写真です"  # 40 characters, 120 bytes of UTF-8


def png(seed: int, size: int = 32) -> bytes:
    image = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return cv2.imencode(".png", image)[1].tobytes()


def pixel_bomb() -> bytes:
    """A 261-byte-scale PNG whose header claims 16384 x 16384 px (800 MB once decoded)."""
    data = bytearray(png(0, 8))
    data[16:24] = struct.pack(">II", 16384, 16384)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def sample(key: str, seed: int, input_bytes: bytes | None = None) -> list[tuple[str, bytes]]:
    return [
        (f"{key}.input.png", input_bytes if input_bytes is not None else png(seed)),
        (f"{key}.target.png", png(seed + 100)),
        (f"{key}.json", json.dumps({"key": key}).encode()),
    ]


def header(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, linkname: str = "") -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname, info.mtime = kind, size, linkname, 0
    fmt = tarfile.GNU_FORMAT if kind == tarfile.GNUTYPE_SPARSE else tarfile.PAX_FORMAT
    return info.tobuf(fmt, "utf-8", "strict")


def raw_tar(*blocks: bytes) -> bytes:
    """Header and data blocks as given, padded to 512, then a real target member beside the bad input
    (like a real shard) and the end-of-archive blocks."""
    target = png(7)
    blocks += (header("t.target.png", size=len(target)), target)
    return b"".join(b + b"\0" * (-len(b) % 512) for b in blocks) + b"\0" * 1024


def hostile_shards() -> dict[str, tuple[bytes, str]]:
    """name → (shard bytes, what each reader must say about it); every shard lists one sample."""
    shards = {
        "symlink": (raw_tar(header("s.input.png", tarfile.SYMTYPE, linkname="/etc/passwd")), "symbolic link"),
        "hardlink": (
            raw_tar(header("h.input.png", tarfile.LNKTYPE, linkname="x.target.png")),
            "hard link",
        ),
        "device": (raw_tar(header("d.input.png", tarfile.CHRTYPE)), "character device"),
        # declares 200 MB and carries nothing: refused from the header, before any read
        "huge": (raw_tar(header("g.input.png", size=200 << 20)), "member limit"),
        "sparse": (raw_tar(header("p.input.png", tarfile.GNUTYPE_SPARSE, size=4096)), "sparse"),
        "traversal": (raw_tar(header("../evil.input.png", size=3), b"abc"), "'..' component"),
        "absolute": (raw_tar(header("/abs.input.png", size=3), b"abc"), "absolute path"),
        "bomb": (tar_bytes(sample("b", 3, pixel_bomb())), "16384x16384"),
        # a name whose bytes are not UTF-8 (read with surrogate escapes): no reader can print or key it
        "not_utf8": (raw_tar(not_utf8_header(), b"abc"), "not valid UTF-8"),
    }
    return shards


def not_utf8_header() -> bytes:
    info = tarfile.TarInfo("n\udcff.input.png")  # the byte 0xff where a name should be text
    info.size, info.mtime = 3, 0
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


def write(
    root: Path, shards: dict[str, tuple[bytes, int]], listed: dict[str, tuple[int, str]] | None = None
) -> str:
    """Shards (name → (bytes, samples)) in the test split and a manifest; `listed` overrides what the
    manifest says of a shard (bytes, sha256): a shard damaged after its build."""
    entries = []
    for name, (data, samples) in shards.items():
        path = f"shards/h/{name}.tar"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
        size, sha = (listed or {}).get(name, (len(data), hashlib.sha256(data).hexdigest()))
        entries.append(ShardEntry("test", path, samples, size, sha))
    split = SplitInfo.of(entries)
    n = split.samples
    totals = Totals(2 * n, n, n, 0, len(entries), split.bytes, 0.0, 0)
    Manifest("hostile", "2024-01-01T00:00:00Z", {}, None, FORMAT, {"test": split}, totals).write(str(root))
    return str(root)


def good_shard() -> bytes:
    return tar_bytes(sorted(sample("good", 1) + sample(LONG_KEY, 2)))


def damaged() -> dict[str, tuple[bytes, tuple[int, str], str]]:
    """Shards whose bytes changed after the build: (bytes, what the manifest lists, expected message)."""
    original = tar_bytes(sample("c", 5))
    listed = (len(original), hashlib.sha256(original).hexdigest())
    flipped = bytearray(original)
    flipped[-1024 - 520] ^= 0xFF  # inside the last member (the json): the images still decode
    return {
        "sha_mismatch": (bytes(flipped), listed, "sha256"),
        "truncated": (original[: len(original) // 2], listed, "corrupt"),
    }


def loader_error(root: str) -> str:
    cfg = LoaderConfig(manifest=root, batch_size=1, num_workers=0, load_size=32, crop_size=32)
    with pytest.raises(ShardError) as err:
        list(make_eval_loader(cfg, split="test"))
    return str(err.value)


@pytest.mark.parametrize("case", sorted(hostile_shards()))
def test_the_loader_names_shard_and_member_of_each_fault(case: str, tmp_path: Path) -> None:
    data, expected = hostile_shards()[case]
    root = write(tmp_path, {case: (data, 1)})
    message = loader_error(root)
    assert f"shards/h/{case}.tar" in message and expected in message, message
    member = {"traversal": "../evil", "absolute": "/abs", "bomb": "b.input.png"}.get(case, ".input.png")
    message.encode("utf-8")  # printable text, whatever bytes the name held
    assert member in message, message


@pytest.mark.parametrize("case", sorted(damaged()))
def test_the_loader_refuses_a_shard_that_differs_from_the_manifest(case: str, tmp_path: Path) -> None:
    data, listed, expected = damaged()[case]
    root = write(tmp_path, {case: (data, 1)}, {case: listed})
    message = loader_error(root)
    assert f"shards/h/{case}.tar is corrupt" in message and expected in message, message


def test_the_loader_reads_long_names_and_checks_hashes_while_streaming(tmp_path: Path) -> None:
    root = write(tmp_path, {"good": (good_shard(), 2)})
    cfg = LoaderConfig(manifest=root, batch_size=1, num_workers=0, load_size=32, crop_size=32)
    keys = [k for batch in make_eval_loader(cfg, split="test") for k in batch["key"]]
    assert sorted(keys) == sorted(["good", LONG_KEY])


def test_a_folder_in_a_shards_place_is_a_shard_error(tmp_path: Path) -> None:
    root = write(tmp_path, {"good": (good_shard(), 2)})
    shard = tmp_path / "shards/h/good.tar"
    shard.unlink()
    shard.mkdir()  # an OSError other than "missing" when opened
    assert "shard shards/h/good.tar could not be opened" in loader_error(root)


def all_cases(root: Path) -> str:
    shards = {name: (data, 1) for name, (data, _) in hostile_shards().items()}
    shards.update({name: (data, 1) for name, (data, _, _) in damaged().items()})
    shards["good"] = (good_shard(), 2)
    return write(root, shards, {name: listed for name, (_, listed, _) in damaged().items()})


def test_inspect_verify_reports_every_problem_and_keeps_going(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = all_cases(tmp_path / "ds")
    assert inspect_dataset(root, verify=True) == 1
    out = capsys.readouterr().out
    problems = [line for line in out.splitlines() if line.startswith("PROBLEM")]
    for case, (_, expected) in hostile_shards().items():
        if case == "bomb":  # a well-formed tar; its image is the decoders' business, not verify's
            continue
        assert any(f"{case}.tar" in p and expected in p for p in problems), (case, out)
    assert any("sha_mismatch.tar: sha256 differs" in p for p in problems), out
    assert any("truncated.tar" in p and "bytes, manifest says" in p for p in problems), out
    assert not any("good.tar" in p for p in problems), out
    assert re.search(r"verified 12 shards: \d+ problems", out), out
    assert "Traceback" not in out


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_translate_quarantines_each_fault_and_translates_the_rest(tmp_path: Path) -> None:
    from pipelines.inference.translate import TranslateConfig, run_translate
    from pipelines.preprocessing import Preprocessing
    from pix2pix import Pix2PixConfig, TrainingStep, save_checkpoint

    root = all_cases(tmp_path / "ds")
    prep = Preprocessing(3, 3, "AtoB", 32, 32, "resize_and_crop", False)
    checkpoint = tmp_path / "checkpoint.pt"
    step = TrainingStep(Pix2PixConfig(netG="unet", unet_downs=5, ngf=8, ndf=8))
    save_checkpoint(checkpoint, step, extra={"preprocessing": prep.to_dict()})
    out = tmp_path / "out"
    report: dict[str, Any] = run_translate(
        TranslateConfig(
            str(checkpoint), root, str(out), split="test", tracking_uri=f"sqlite:///{tmp_path}/m.db"
        )
    )
    assert report["translated"] == 2 and report["seen"] == 13
    assert sorted(p.name for p in out.glob("*.png")) == sorted(["good.png", f"{LONG_KEY}.png"])
    reasons = {q["paths"][0]: q["reason"] for q in report["quarantine"]}
    for case, (_, expected) in hostile_shards().items():
        shard_reasons = [r for p, r in reasons.items() if f"{case}.tar" in p]
        expected = "decompression bomb" if case == "bomb" else expected
        assert any(expected in r for r in shard_reasons), (case, reasons)
    for case in damaged():
        assert any(f"{case}.tar" in p and "differs from the manifest" in r for p, r in reasons.items())
    assert report["quarantined"] == 11
    assert json.loads((out / "translate_report.json").read_text())["quarantined"] == 11


def test_tar_headers_here_are_what_they_claim() -> None:
    """The crafted shards really hold the member kinds the cases name (guards the test itself)."""
    kinds = {}
    for case, (data, _) in hostile_shards().items():
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
            first = next(iter(tar))
            kinds[case] = (first.type, first.size)
    assert kinds["symlink"][0] == tarfile.SYMTYPE and kinds["hardlink"][0] == tarfile.LNKTYPE
    assert kinds["sparse"][0] == tarfile.GNUTYPE_SPARSE and kinds["huge"][1] == 200 << 20


def test_inspect_lists_orphans_and_the_cli_verifies_without_a_traceback(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = all_cases(tmp_path / "ds")
    orphan_files = {
        "shards/other-build/train-000000.tar": b"x" * 10,  # another build's shard
        "shards/h/train-000009.json": b"{}",  # a sidecar left by an interrupted build
        "shards/h/.tmp.train-000009.tar.0123": b"partial",  # a killed atomic write
        "manifest.0123456789abcdef.json": b"{}",  # a replaced build's manifest, kept with its shards
        "notes.txt": b"a user's own file",
    }
    for relative, data in orphan_files.items():
        (Path(root) / relative).parent.mkdir(parents=True, exist_ok=True)
        (Path(root) / relative).write_bytes(data)
    result = subprocess.run(
        [str(Path(sys.executable).parent / "p2p"), "dataset", "inspect", root, "--verify"],
        capture_output=True,
        text=True,
        timeout=120,
        # a strict UTF-8 console: the non-UTF-8 member name must print escaped, not end the report
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "orphans: 5 file(s)" in result.stdout, result.stdout
    assert "the next build removes the 4 of builds" in result.stdout, result.stdout
    for relative in orphan_files:
        assert f"orphan {relative} " in result.stdout, result.stdout
    assert "truncated.tar" in result.stdout and "verified 12 shards" in result.stdout
    assert "n\\udcff.input.png: unsafe name (not valid UTF-8)" in result.stdout, result.stdout
