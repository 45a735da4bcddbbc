"""Training-step throughput of unet_256/unet_128 + 70×70 PatchGAN on synthetic tensors, printed as JSON.

    python -m bench.train_step [--sizes 256 128] [--modes reference channels_last bf16 ...] [--steps N]

`reference` is the authors' setting (fp32, batch 1, eager, contiguous NCHW, plain Adam), always measured in
the same run: every `ratio_to_reference` divides two numbers from this run on this machine (no figures
carried over from elsewhere). The other modes are candidates for the fastest setting of the device; the
JSON names the fastest. Speed targets live here, never in timed tests. `python -m bench.gpu_check` is the
fuller GPU check (FLOPs, MFU, memory, data path, HED).
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
from pix2pix.config import GeneratorName


@dataclass
class Mode:
    name: str
    batch_size: int = 1
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    fused_adam: bool = False


MODES = {
    m.name: m
    for m in [
        Mode("reference"),
        Mode("channels_last", channels_last=True),
        Mode("batch4", batch_size=4),
        Mode("batch4_channels_last", batch_size=4, channels_last=True),
        Mode("bf16_batch4", batch_size=4, precision="bf16", channels_last=True),
        Mode("compile_batch4", batch_size=4, compile=True, channels_last=True),
        Mode("cuda_bf16_batch16", batch_size=16, precision="bf16", channels_last=True, fused_adam=True),
    ]
}


def measure(size: int, mode: Mode, steps: int, warmup: int, device: str) -> dict[str, Any]:
    net_g: GeneratorName = "unet_256" if size >= 256 else "unet_128"
    cfg = Pix2PixConfig(
        netG=net_g,
        netD="basic",
        channels_last=mode.channels_last,
        compile=mode.compile,
        fused_adam=mode.fused_adam,
    )
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
        "fused_adam": mode.fused_adam and device == "cuda",
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
    names = args.modes or [n for n in MODES if not n.startswith("cuda_") or args.device == "cuda"]
    names = ["reference", *(n for n in names if n != "reference")]  # ratios need it, from this run

    results: list[dict[str, Any]] = []
    for size in args.sizes:
        for name in names:
            result = measure(size, MODES[name], args.steps, args.warmup, args.device)
            reference = next(r for r in [*results, result] if r["size"] == size and r["mode"] == "reference")
            result["ratio_to_reference"] = round(result["samples_per_s"] / reference["samples_per_s"], 2)
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
