"""Training-step throughput of unet_256/unet_128 + 70×70 PatchGAN on synthetic tensors, printed as JSON.

    python -m bench.train_step [--sizes 256 128] [--modes reference channels_last bf16 ...] [--steps N]

`reference` is the authors' setting (fp32, batch 1, eager): its samples/s is what compares with their
implementation on the same machine (0.52 samples/s at 256 px and 1.11 at 128 px measured on the 2-core dev
machine). The other modes are candidates for the fastest setting of the device; the JSON names the fastest.
Speed targets live here, never in timed tests.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass
from typing import Any

import torch

from pix2pix import Pix2PixConfig, TrainingStep

# Published by the issue for the authors' reference implementation on this project's 2-core CPU machine.
REFERENCE_CPU_SAMPLES_PER_S = {256: 0.52, 128: 1.11}


@dataclass
class Mode:
    name: str
    batch_size: int = 1
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False


MODES = {
    m.name: m
    for m in [
        Mode("reference"),
        Mode("channels_last", channels_last=True),
        Mode("batch4", batch_size=4),
        Mode("batch4_channels_last", batch_size=4, channels_last=True),
        Mode("bf16_batch4", batch_size=4, precision="bf16", channels_last=True),
        Mode("compile_batch4", batch_size=4, compile=True, channels_last=True),
        Mode("cuda_bf16_batch16", batch_size=16, precision="bf16", channels_last=True),
    ]
}


def measure(size: int, mode: Mode, steps: int, warmup: int, device: str) -> dict[str, Any]:
    net_g = "unet_256" if size >= 256 else "unet_128"
    cfg = Pix2PixConfig(netG=net_g, netD="basic", channels_last=mode.channels_last, compile=mode.compile)
    cfg.precision = mode.precision  # type: ignore[assignment]
    torch.manual_seed(0)
    step = TrainingStep(cfg, device=device)
    a = torch.rand(mode.batch_size, 3, size, size, device=device) * 2 - 1
    b = torch.rand(mode.batch_size, 3, size, size, device=device) * 2 - 1
    for _ in range(warmup):
        step(a, b)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        losses = step(a, b)
    float(losses["g_total"])  # forces the device to finish
    seconds = time.perf_counter() - start
    rate = steps * mode.batch_size / seconds
    return {
        "size": size,
        "netG": net_g,
        "mode": mode.name,
        "batch_size": mode.batch_size,
        "precision": mode.precision,
        "channels_last": mode.channels_last,
        "compile": mode.compile,
        "steps": steps,
        "seconds": round(seconds, 3),
        "samples_per_s": round(rate, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 128])
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=sorted(MODES),
        default=None,
        help="default: every mode that fits the device (cuda_* only on a GPU)",
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile happens here)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    names = args.modes or [n for n in MODES if n.startswith("cuda_") == (args.device == "cuda")]

    results = []
    for size in args.sizes:
        for name in names:
            result = measure(size, MODES[name], args.steps, args.warmup, args.device)
            if name == "reference" and args.device == "cpu" and size in REFERENCE_CPU_SAMPLES_PER_S:
                result["authors_reference_samples_per_s"] = REFERENCE_CPU_SAMPLES_PER_S[size]
            results.append(result)
            print(json.dumps(result), flush=True)
    summary = {
        "benchmark": "train_step",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "fastest": {
            str(size): max((r for r in results if r["size"] == size), key=lambda r: r["samples_per_s"])[
                "mode"
            ]
            for size in args.sizes
        },
        "results": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
