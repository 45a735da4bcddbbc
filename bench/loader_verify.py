"""What streaming sha256 verification costs the training loader, next to decoding the same samples.

Writes a small dataset of shards as the build writes them (256×256 noise-textured photos: PNG inputs, JPEG
targets), then reads every shard through the loader's own reader (`ShardDataset._shard_samples`: tar member
checks, byte count, and sha256 unless ``verify_sha256=False``) and decodes every sample's two images with
the loader's ``decode_rgb``. Best of ``--repeat`` runs each. Prints JSON:

    python -m bench.loader_verify [--shards 4] [--samples 32] [--size 256] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipelines.dataset.build import tar_bytes
from pipelines.manifest import Manifest, SampleFormat, ShardEntry, SplitInfo, Totals
from pipelines.training.loader import LoaderConfig, ShardDataset, decode_rgb

FORMAT = SampleFormat("input.png", "target.jpg", input_channels=3, input_is_label_map=False)


def write_dataset(root: Path, shards: int, samples: int, size: int) -> str:
    rng = np.random.default_rng(0)
    entries = []
    for index in range(shards):
        members: list[tuple[str, bytes]] = []
        for i in range(samples):
            photo = cv2.GaussianBlur(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), (7, 7), 0)
            key = f"s{index:03d}_{i:04d}"
            members += [
                (f"{key}.input.png", cv2.imencode(".png", 255 - photo)[1].tobytes()),
                (
                    f"{key}.target.jpg",
                    cv2.imencode(".jpg", photo, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes(),
                ),
                (f"{key}.json", json.dumps({"key": key}).encode()),
            ]
        data = tar_bytes(members)
        path = f"shards/bench/train-{index:06d}.tar"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
        entries.append(ShardEntry("train", path, samples, len(data), hashlib.sha256(data).hexdigest()))
    split = SplitInfo.of(entries)
    n = split.samples
    totals = Totals(2 * n, n, n, 0, shards, split.bytes, 0.0, 0)
    Manifest("bench", "2024-01-01T00:00:00Z", {}, None, FORMAT, {"train": split}, totals).write(str(root))
    return str(root)


def stream(dataset: ShardDataset) -> list[dict[str, Any]]:
    return [s for entry in dataset.entries for s in dataset._shard_samples(entry)]


def best(fn: Any, repeat: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="p2p-bench-") as tmp:
        root = write_dataset(Path(tmp), args.shards, args.samples, args.size)
        manifest = Manifest.read(root)
        datasets = {
            verify: ShardDataset(
                LoaderConfig(manifest=root, verify_sha256=verify),
                "train",
                0,
                1,
                0,
                train=False,
                manifest=manifest,
            )
            for verify in (True, False)
        }
        stream(datasets[True])  # warm the page cache
        with_sha, samples = best(lambda: stream(datasets[True]), args.repeat)
        without_sha, _ = best(lambda: stream(datasets[False]), args.repeat)
        decode, _ = best(
            lambda: [(decode_rgb(s["input.png"], 3), decode_rgb(s["target.jpg"], 3)) for s in samples],
            args.repeat,
        )
    megabytes = manifest.totals.bytes / 1e6
    sha_cost = max(with_sha - without_sha, 0.0)
    result = {
        "bench": "loader_verify",
        "samples": len(samples),
        "shards": args.shards,
        "image_size": args.size,
        "dataset_mb": round(megabytes, 2),
        "stream_s_verify_sha256": round(with_sha, 4),
        "stream_s_no_sha256": round(without_sha, 4),
        "sha256_cost_s": round(sha_cost, 4),
        "sha256_mb_per_s": round(megabytes / sha_cost, 1) if sha_cost > 0 else None,
        "decode_s": round(decode, 4),
        "sha256_cost_vs_decode": round(sha_cost / decode, 4),
        "stream_with_sha256_vs_decode": round(with_sha / decode, 4),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
