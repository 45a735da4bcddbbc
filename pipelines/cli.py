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
  dataset   build WebDataset shards from raw images (Ray Data) and inspect them
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


DATASET_BUILD_HELP = """\
Builds a pix2pix dataset: lists the source, pairs files by key, derives inputs, resizes, splits
train/val/test, and writes WebDataset shards ({split}-{index:06d}.tar) plus manifest.json to a folder or
s3://bucket/prefix. Bad inputs are quarantined with a reason in the manifest; the build completes.
Re-running the same build is a no-op; an interrupted build re-run leaves no partial or orphan shards.

Settings come from --config YAML (every option of pipelines/build_dataset.py:DatasetBuildConfig),
then the flags below, then --set overrides, e.g. --set shards.samples_per_shard=500.

examples:
  p2p dataset build --source ../shared/data/camvid --layout paired --a-dir labels --b-dir images \\
      --builder labels --palette ../shared/data/camvid/classes.json --output runs/camvid-labels
  p2p dataset build --source s3://raw/shoes --layout photos --builder hed --output s3://datasets/shoes
  p2p dataset build --config dataset.yaml --set resize.size=128
"""


def cmd_dataset_build(args: argparse.Namespace) -> int:
    from pipelines.build_dataset import DatasetBuildConfig, run_build
    from pipelines.config_io import load_config

    flag_values = {
        "source.uri": args.source,
        "source.layout": args.layout,
        "source.a_dir": args.a_dir,
        "source.b_dir": args.b_dir,
        "source.photos_dir": args.photos_dir,
        "output": args.output,
        "derive.builder": args.builder,
        "derive.palette": args.palette,
        "resize.mode": args.resize,
        "resize.size": args.size,
        "shards.samples_per_shard": args.samples_per_shard,
    }
    overrides = [f"{k}={v}" for k, v in flag_values.items() if v is not None] + list(args.set)
    cfg = load_config(DatasetBuildConfig, args.config, overrides)
    run_build(cfg)
    return 0


def cmd_dataset_inspect(args: argparse.Namespace) -> int:
    import json

    from pipelines.build_dataset import summarize
    from pipelines.manifest import read_manifest, verify_shards

    manifest = read_manifest(args.location)
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        print(summarize(manifest))
        for q in manifest["quarantine"][: args.show_quarantine]:
            print(f"  - {', '.join(q['paths'])}: {q['reason']}")
    if args.verify:
        problems = verify_shards(args.location, manifest)
        for problem in problems:
            print(f"PROBLEM {problem}")
        verdict = f"{len(problems)} problems" if problems else "OK"
        print(f"verified {manifest['totals']['shards']} shards: {verdict}")
        return 1 if problems else 0
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2p", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")

    version = verbs.add_parser("version", help="print package and library versions")
    version.set_defaults(func=cmd_version)

    dataset = verbs.add_parser("dataset", help="build and inspect datasets of WebDataset shards")
    dataset_verbs = dataset.add_subparsers(dest="dataset_verb", metavar="ACTION", required=True)
    build = dataset_verbs.add_parser(
        "build",
        help="raw images → shards + manifest",
        description=DATASET_BUILD_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    build.add_argument("--config", help="YAML file with DatasetBuildConfig options")
    build.add_argument("--source", help="folder or s3:// prefix of raw images")
    build.add_argument("--output", help="folder or s3:// prefix for shards and manifest.json")
    build.add_argument(
        "--layout",
        choices=["paired", "side_by_side", "photos"],
        help="paired A/B folders (default), side-by-side AB images, or photos alone",
    )
    build.add_argument("--a-dir", help="paired: folder of inputs (default A)")
    build.add_argument("--b-dir", help="paired: folder of targets (default B)")
    build.add_argument("--photos-dir", help="photos / side_by_side: sub-folder of the images (default: all)")
    build.add_argument(
        "--builder",
        choices=["none", "labels", "canny", "hed", "grayscale"],
        help="how the input is made: as found, colour-coded labels, edges, or grayscale",
    )
    build.add_argument("--palette", help="labels: 'cityscapes' or a classes.json / CSV palette file")
    build.add_argument(
        "--resize",
        choices=["resize", "pad", "crop", "native"],
        help="resize policy (default resize: stretch to size×size)",
    )
    build.add_argument("--size", type=int, help="stored image size in px (default 256)")
    build.add_argument("--samples-per-shard", type=int, help="samples per shard (default 1000)")
    build.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.OPTION=VALUE",
        help="override any config option (repeatable)",
    )
    build.set_defaults(func=cmd_dataset_build)

    inspect = dataset_verbs.add_parser("inspect", help="summarise (and verify) a built dataset")
    inspect.add_argument("location", help="dataset folder / s3:// prefix, or its manifest.json")
    inspect.add_argument("--verify", action="store_true", help="re-read every shard: size, sha256, samples")
    inspect.add_argument("--json", action="store_true", help="print the whole manifest")
    inspect.add_argument(
        "--show-quarantine",
        type=int,
        default=20,
        metavar="N",
        help="list the first N quarantined items (default %(default)s)",
    )
    inspect.set_defaults(func=cmd_dataset_inspect)

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
