"""The typed manifest on a real build: exact JSON round trip, validation on read (hostile shard paths,
tampered sums), a photos source with labels/ beside images/ (ignored and counted once, not quarantined),
and `p2p dataset inspect` through `inspect_dataset`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from pipelines.config import from_dict
from pipelines.dataset.build import DatasetBuildConfig, run_build
from pipelines.dataset.inspect import inspect_dataset
from pipelines.manifest import Manifest, ManifestError, verify_shards

pytestmark = pytest.mark.usefixtures("ray_session")

PHOTOS_PER_SPLIT = 4


@pytest.fixture(scope="module")
def photos_build(camvid_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real canny build of a few CamVid files laid out as CamVid is: {train,val}/{images,labels}, plus
    the classes.json beside the split folders. Only images/ is configured."""
    source = tmp_path_factory.mktemp("camvid-photos")
    for split in ("train", "val"):
        keys = sorted(p.stem for p in (camvid_dir / split / "images").glob("*.jpg"))[:PHOTOS_PER_SPLIT]
        for folder, ext in (("images", "jpg"), ("labels", "png")):
            (source / split / folder).mkdir(parents=True)
            for key in keys:
                shutil.copy(camvid_dir / split / folder / f"{key}.{ext}", source / split / folder)
    shutil.copy(camvid_dir / "classes.json", source)
    out = tmp_path_factory.mktemp("out") / "dataset"
    cfg = from_dict(
        DatasetBuildConfig,
        {
            "source": {"uri": str(source), "layout": "photos", "photos_dir": "images"},
            "output": str(out),
            "derive": {"builder": "canny"},
            "resize": {"size": 64},
            "shards": {"samples_per_shard": 3},
        },
    )
    return {"manifest": run_build(cfg), "out": out}


def test_photos_beside_labels_build_without_quarantine_and_count_ignored_files(
    photos_build: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    manifest: Manifest = photos_build["manifest"]
    t = manifest.totals
    labels, images = 2 * PHOTOS_PER_SPLIT, 2 * PHOTOS_PER_SPLIT
    assert manifest.quarantine == () and t.quarantined == 0
    assert t.samples_written == t.items_seen == images
    assert t.files_ignored == labels + 1  # the labels and classes.json
    assert t.files_seen == images + t.files_ignored  # every file accounted for, the ignored explicitly
    assert manifest.scanned_folders == ("train/images", "val/images")
    assert {name: s.samples for name, s in manifest.splits.items()} == {"train": 4, "val": 4}

    # The summary mentions the ignored files once, in one line naming the folders read.
    inspect_dataset(str(photos_build["out"]))
    lines = capsys.readouterr().out.splitlines()
    ignored = [line for line in lines if "ignored" in line]
    assert len(ignored) == 1 and "9 file(s)" in ignored[0] and "train/images, val/images" in ignored[0]


def test_build_prints_one_ignored_line_and_driver_progress(
    camvid_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "src"
    for folder, ext in (("images", "jpg"), ("labels", "png")):
        (source / folder).mkdir(parents=True)
        for path in sorted((camvid_dir / "val" / folder).glob(f"*.{ext}"))[:5]:
            shutil.copy(path, source / folder)
    cfg = from_dict(
        DatasetBuildConfig,
        {
            "source": {"uri": str(source), "layout": "photos", "photos_dir": "images"},
            "output": str(tmp_path / "out"),
            "derive": {"builder": "grayscale"},
            "resize": {"size": 32},
            "split": {"train": 1.0, "val": 0.0, "test": 0.0},
            "shards": {"samples_per_shard": 2},
        },
    )
    manifest = run_build(cfg)
    out = capfd.readouterr().out
    assert manifest.totals.files_ignored == 5 and manifest.quarantine == ()
    assert out.count("ignored 5 file(s) outside the scanned folders (images)") == 1
    assert "quarantine" not in out.replace("0 quarantined", "")
    progress = [line for line in out.splitlines() if line.startswith("[build] shards ")]
    assert progress[-1].startswith("[build] shards 3/3, samples 5/5") and "images/s, ETA" in progress[-1]
    assert "(MapBatches" not in out  # no per-shard prints from the workers any more


def test_json_round_trip_is_exact(photos_build: dict[str, Any]) -> None:
    text = (photos_build["out"] / "manifest.json").read_text()
    manifest = Manifest.from_json(text)
    assert manifest == photos_build["manifest"]
    assert manifest.to_json() == text
    assert Manifest.from_dict(json.loads(manifest.to_json())) == manifest
    assert manifest.channels("AtoB") == (1, 3) and manifest.channels("BtoA") == (3, 1)


def tampered(photos_build: dict[str, Any], tmp_path: Path, change: Any) -> Path:
    """A copy of the real manifest with `change(data)` applied, in a folder of its own."""
    data = json.loads((photos_build["out"] / "manifest.json").read_text())
    change(data)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    return tmp_path


@pytest.mark.parametrize(
    "path, why",
    [
        ("../x.tar", "'..' component"),
        ("/etc/hostname", "absolute path"),
        ("a\\b.tar", "backslashes"),
        ("C:/x.tar", "drive letter"),
        ("shards/../../x", "'..' component"),
        ("s3://other-bucket/x.tar", "URI scheme"),
    ],
)
def test_hostile_shard_paths_are_refused_on_read(
    photos_build: dict[str, Any], tmp_path: Path, path: str, why: str
) -> None:
    def change(data: dict[str, Any]) -> None:
        data["splits"]["train"]["shards"][0]["path"] = path

    with pytest.raises(ManifestError, match="shard path .* in train: " + why.replace("\\", "\\\\")):
        Manifest.read(str(tampered(photos_build, tmp_path, change)))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["splits"]["train"].update(samples=3), "splits.train.samples is 3 but its shards add up"),
        (lambda d: d["splits"]["val"].update(bytes=1), "splits.val.bytes is 1 but its shards add up to"),
        (lambda d: d["totals"].update(samples_written=99), "totals.samples_written is 99"),
        (lambda d: d["totals"].update(files_seen=1), "totals.files_seen"),
        (lambda d: d["splits"].update(extra=d["splits"]["val"]), "split 'extra' is not one of"),
        (lambda d: d.pop("totals"), "missing totals"),
        (lambda d: d["sample_format"].update(input_channels="1"), "sample_format.input_channels must be int"),
        (lambda d: d["splits"]["val"]["shards"][0].update(samples=True), r"shards\[0\].samples must be int"),
        (lambda d: d.update(format="p2p-dataset/0"), "is not a p2p-dataset/1 manifest"),
    ],
)
def test_tampered_manifests_are_refused_naming_the_problem(
    photos_build: dict[str, Any], tmp_path: Path, change: Any, message: str
) -> None:
    with pytest.raises(ManifestError, match=message):
        Manifest.read(str(tampered(photos_build, tmp_path, change)))


def test_an_inconsistent_manifest_is_never_written(photos_build: dict[str, Any], tmp_path: Path) -> None:
    import dataclasses

    manifest: Manifest = photos_build["manifest"]
    wrong = dataclasses.replace(manifest, totals=dataclasses.replace(manifest.totals, shards=0))
    with pytest.raises(ManifestError, match=r"totals\.shards is 0"):
        wrong.write(str(tmp_path))
    assert not (tmp_path / "manifest.json").exists()


def test_inspect_prints_the_summary_and_verifies(
    photos_build: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(photos_build["out"], out)
    manifest: Manifest = photos_build["manifest"]

    assert inspect_dataset(str(out), verify=True) == 0
    printed = capsys.readouterr().out
    assert f"dataset {manifest.build_id}: 8 samples in 4 shards" in printed
    assert "train:      4 samples, 2 shards" in printed
    assert printed.rstrip().endswith("verified 4 shards: OK")
    # A relative path: the dataset's own files are not taken for orphans.
    monkeypatch.chdir(tmp_path)
    assert inspect_dataset("copy", verify=True) == 0
    printed = capsys.readouterr().out
    assert "orphan" not in printed and printed.rstrip().endswith("verified 4 shards: OK")

    assert inspect_dataset(str(out), as_json=True) == 0
    assert capsys.readouterr().out == (out / "manifest.json").read_text()

    shard = out / manifest.shards("val")[0].path
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert verify_shards(str(out), manifest) != []
    assert inspect_dataset(str(out / "manifest.json"), verify=True) == 1
    printed = capsys.readouterr().out
    assert f"PROBLEM {manifest.shards('val')[0].path}: sha256 differs" in printed
    assert "verified 4 shards: 1 problems" in printed

    # A shard that cannot be opened (a folder in its place) is one problem; the others are still checked.
    other = out / manifest.shards("train")[0].path
    other.unlink()
    other.mkdir()
    (out / "notes.txt").write_text("a user's file")
    assert inspect_dataset(str(out), verify=True) == 1
    printed = capsys.readouterr().out
    assert f"PROBLEM {manifest.shards('train')[0].path}: cannot be read" in printed
    assert f"PROBLEM {manifest.shards('val')[0].path}: sha256 differs" in printed
    assert "verified 4 shards: 2 problems" in printed
    assert "orphans: 1 file(s)" in printed and "no build removes them: delete them if unwanted" in printed


def test_a_manifest_nested_beyond_reason_is_not_json() -> None:
    with pytest.raises(ManifestError, match="is not JSON"):
        Manifest.from_json("[" * 100_000 + "]" * 100_000)
