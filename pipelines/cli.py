"""The `p2p` command: one entry point for every job of the pipeline.

Each verb lives in its own module and registers its flags here; `p2p VERB --help` explains each one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

DESCRIPTION = """\
pix2pix at cluster scale: build paired-image datasets with Ray Data, train pix2pix with Ray Train,
track and promote models in MLflow.

verbs available now:
  version   print the versions of this package and of the libraries it runs on
  demo      set-up smoke test: a small pix2pix model trained for a few steps on photos shipped by a
            dependency, on this machine's CPU (the full build → train → promote demo comes later)
"""


def cmd_version(args: argparse.Namespace) -> int:
    from importlib.metadata import PackageNotFoundError, version

    import pix2pix

    print(f"p2p {pix2pix.__version__}")
    for dist in ("torch", "ray", "mlflow", "webdataset", "albumentations"):
        try:
            print(f"  {dist} {version(dist)}")
        except PackageNotFoundError:
            print(f"  {dist} (not installed)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.demo import DemoConfig, run_demo

    run_demo(DemoConfig(steps=args.steps, output_dir=args.output_dir, size=args.size))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2p", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")

    version = verbs.add_parser("version", help="print package and library versions")
    version.set_defaults(func=cmd_version)

    demo = verbs.add_parser(
        "demo",
        help="train a tiny pix2pix model on bundled photos (set-up smoke test)",
        description="Trains a small U-Net pix2pix (gray → colour) on random crops of photos that ship with "
        "installed dependencies, prints the losses and writes a checkpoint and a sample grid.",
    )
    demo.add_argument("--steps", type=int, default=60, help="training steps (default: %(default)s)")
    demo.add_argument(
        "--size", type=int, default=128, help="crop size in px, a multiple of 128 (default: %(default)s)"
    )
    demo.add_argument(
        "--output-dir", default="runs/demo", help="where the checkpoint and grid go (default: %(default)s)"
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
