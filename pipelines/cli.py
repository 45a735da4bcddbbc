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
  train     train pix2pix on a dataset with Ray Train (DDP), tracked in MLflow
  evaluate  L1 / PSNR / SSIM of a model on a dataset split, logged as an MLflow evaluation run
  promote   move the registry's `champion` alias to a candidate only if it beats the champion
  translate batch inference: a folder, s3:// prefix or dataset split → translated images (Ray Data)
  version   print the versions of this package and of the libraries it runs on
  submit    run any of these verbs as a job on a Ray cluster; `jobs` lists, follows and stops jobs
  demo      the whole pipeline on photos shipped by dependencies, on this machine, in minutes
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

    run_demo(
        DemoConfig(
            output_dir=args.output_dir,
            crops=args.crops,
            epochs=args.epochs,
            workers=args.workers,
            s3=args.s3,
            smoke=args.smoke,
            steps=args.steps,
        )
    )
    return 0


DATASET_BUILD_HELP = """\
Builds a pix2pix dataset: lists the source, pairs files by key, derives inputs, resizes, splits
train/val/test, and writes WebDataset shards ({split}-{index:06d}.tar) plus manifest.json to a folder or
s3://bucket/prefix. Bad inputs are quarantined with a reason in the manifest; the build completes.
Re-running the same build is a no-op; an interrupted build re-run leaves no partial or orphan shards.

Settings come from --config YAML (every option of pipelines/dataset/build.py:DatasetBuildConfig),
then the flags below, then --set overrides, e.g. --set shards.samples_per_shard=500.

examples:
  p2p dataset build --source ../shared/data/camvid --layout paired --a-dir labels --b-dir images \\
      --builder labels --palette ../shared/data/camvid/classes.json --output runs/camvid-labels
  p2p dataset build --source s3://raw/shoes --layout photos --builder hed --output s3://datasets/shoes
  p2p dataset build --config dataset.yaml --set resize.size=128
"""


def cmd_dataset_build(args: argparse.Namespace) -> int:
    from pipelines.config import load_config
    from pipelines.dataset.build import DatasetBuildConfig, run_build

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

    from pipelines.dataset.build import summarize
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


TRAIN_HELP = """\
Trains pix2pix with Ray Train's TorchTrainer: DDP over --workers workers (GPUs with NCCL when the
cluster has them, CPUs with gloo otherwise), streaming the shards listed in a dataset manifest.
Checkpoints go to --storage (a folder or s3:// prefix shared by all nodes); a failed worker restarts
from the last checkpoint (max_failures). The MLflow run holds params, losses, validation metrics,
sample grids, the dataset manifest and the final generator, registered under --register-as.

Settings: --config YAML (TrainJobConfig in pipelines/training/train.py: sections data, model, mlflow), then the
flags, then --set overrides such as --set model.netG=unet_128 --set data.crop_size=128.
The global batch is split over the workers; the LR schedule is per epoch and does not depend on the
worker count, so a run resumed on another number of workers follows the same schedule.

examples:
  p2p train --manifest runs/camvid-labels --register-as camvid-labels2photo
  p2p train --config train.yaml --workers 8 --storage s3://bucket/runs
  p2p train --resume p2p-20261122-101500-ab12cd --storage s3://bucket/runs
"""


def cmd_train(args: argparse.Namespace) -> int:
    from pipelines.config import load_config
    from pipelines.training.train import TrainJobConfig, run_training

    flag_values = {
        "data.manifest": args.manifest,
        "run_name": args.resume or args.run_name,
        "storage": args.storage,
        "num_workers": args.workers,
        "max_steps": args.max_steps,
        "mlflow.register_as": args.register_as,
        "mlflow.experiment": args.experiment,
    }
    overrides = [f"{k}={v}" for k, v in flag_values.items() if v is not None] + list(args.set)
    cfg = load_config(TrainJobConfig, args.config, overrides)
    run_training(cfg, resume=bool(args.resume))
    return 0


EVALUATE_HELP = """\
Computes L1, PSNR and SSIM (in [0, 1] units) of MODEL_URI on every sample of a dataset split with the
model's recorded preprocessing, and logs them as an MLflow evaluation run tagged with the model version
and the manifest's sha256. MODEL_URI: models:/NAME/VERSION, models:/NAME@ALIAS, runs:/ID/generator, or a
training checkpoint (file or folder, local or s3://).
"""


PROMOTE_HELP = """\
Evaluates the candidate version and the current champion on the same manifest, split and seed; moves
NAME@champion to the candidate only if it wins by more than --margin on --metric. The decision, both
scores and the manifest hash become model-version tags. The first version becomes champion. A candidate
trained on another task (channels, direction) is refused.
"""


TRANSLATE_HELP = """\
Ray Data batch inference: every image under INPUT (or every input of a dataset split with --split, INPUT
being the dataset) gets the model's training preprocessing, goes through the generator on an actor pool
(GPUs when present), and is written as OUTPUT/<key>.png. Bad inputs are quarantined with reasons in
OUTPUT/translate_report.json.
"""


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from pipelines.registry.evaluate import evaluate

    result = evaluate(
        args.model_uri, args.manifest, args.split, args.seed, args.tracking_uri, args.experiment
    )
    print(json.dumps(result, indent=2))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    import json

    from pipelines.registry.promote import PromotionConfig, promote

    decision = promote(
        PromotionConfig(
            name=args.name,
            candidate=args.candidate,
            manifest=args.manifest or "",
            split=args.split,
            metric=args.metric,
            margin=args.margin,
            seed=args.seed,
            dry_run=args.dry_run,
            tracking_uri=args.tracking_uri,
        )
    )
    print(json.dumps(decision, indent=2))
    verdict = "would move" if args.dry_run else "moved"
    if decision["promoted"]:
        print(
            f"{verdict} {args.name}@champion → version {decision['candidate_version']}: {decision['reason']}"
        )
    else:
        print(f"champion unchanged: {decision['reason']}")
    return 0


def cmd_translate(args: argparse.Namespace) -> int:
    from pipelines.inference.translate import TranslateConfig, run_translate

    report = run_translate(
        TranslateConfig(
            model_uri=args.model_uri,
            input=args.input,
            output=args.output,
            split=args.split or "",
            batch_size=args.batch_size,
            output_size=args.output_size,
            keep_dropout=args.keep_dropout,
            tracking_uri=args.tracking_uri,
        )
    )
    return 0 if report["translated"] or not report["seen"] else 1


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

    train = verbs.add_parser(
        "train",
        help="train pix2pix with Ray Train",
        description=TRAIN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--config", help="YAML file with TrainJobConfig options")
    train.add_argument("--manifest", help="dataset folder / s3:// prefix or its manifest.json")
    train.add_argument("--storage", help="checkpoint storage: folder or s3:// prefix (default runs/train)")
    train.add_argument("--workers", type=int, help="training workers (default 2)")
    train.add_argument("--run-name", help="name of a new run (default: generated)")
    train.add_argument(
        "--resume", metavar="RUN", help="continue the stopped run RUN from its last checkpoint"
    )
    train.add_argument("--max-steps", type=int, help="stop after this many steps in total")
    train.add_argument("--register-as", metavar="NAME", help="register the final model under this name")
    train.add_argument("--experiment", help="MLflow experiment (default pix2pix)")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.OPTION=VALUE",
        help="override any config option (repeatable)",
    )
    train.set_defaults(func=cmd_train)

    tracking_help = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI)"
    evaluate = verbs.add_parser(
        "evaluate",
        help="score a model on a dataset split and log an evaluation run",
        description=EVALUATE_HELP,
    )
    evaluate.add_argument("model_uri")
    evaluate.add_argument("--manifest", required=True, help="dataset folder / s3:// prefix or manifest.json")
    evaluate.add_argument("--split", default="test", help="split to score (default %(default)s)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--experiment", default="p2p-evaluations", help="MLflow experiment for the run")
    evaluate.add_argument("--tracking-uri", help=tracking_help)
    evaluate.set_defaults(func=cmd_evaluate)

    promote = verbs.add_parser(
        "promote",
        help="move the champion alias to a better candidate",
        description=PROMOTE_HELP,
    )
    promote.add_argument("name", help="registered model name")
    promote.add_argument("--candidate", default="latest", help="version number or 'latest' (default)")
    promote.add_argument("--manifest", help="evaluation data (default: the candidate's training dataset)")
    promote.add_argument("--split", default="test", help="split to compare on (default %(default)s)")
    promote.add_argument("--metric", default="l1", choices=["l1", "psnr", "ssim"])
    promote.add_argument("--margin", type=float, default=0.0, help="required improvement (default 0)")
    promote.add_argument("--seed", type=int, default=0)
    promote.add_argument("--dry-run", action="store_true", help="show the decision, change nothing")
    promote.add_argument("--tracking-uri", help=tracking_help)
    promote.set_defaults(func=cmd_promote)

    translate = verbs.add_parser(
        "translate",
        help="translate a folder / s3:// prefix / dataset split of images",
        description=TRANSLATE_HELP,
    )
    translate.add_argument("model_uri", help="e.g. models:/NAME@champion, or a checkpoint")
    translate.add_argument("input", help="folder or s3:// prefix of images, or a dataset with --split")
    translate.add_argument("output", help="folder or s3:// prefix for the translated PNGs")
    translate.add_argument("--split", help="INPUT is a dataset: translate this split's inputs")
    translate.add_argument("--batch-size", type=int, default=8)
    translate.add_argument(
        "--output-size",
        choices=["model", "source"],
        default="model",
        help="model: the model's crop size (default); source: each input's size",
    )
    translate.add_argument("--keep-dropout", action="store_true", help="sample dropout (test-time noise)")
    translate.add_argument("--tracking-uri", help=tracking_help)
    translate.set_defaults(func=cmd_translate)

    demo = verbs.add_parser(
        "demo",
        help="the whole pipeline on bundled photos: build → train → register → promote → translate",
        description="Runs the pipeline on embedded defaults (local Ray, a local folder as storage, sqlite "
        "MLflow) on crops of real photos that ship with installed dependencies: an edges→photo dataset "
        "with Canny, a small model trained for a few minutes on CPU, registered, promoted and used to "
        "translate the test split. --s3 does the same against a local SeaweedFS S3 server.",
    )
    demo.add_argument(
        "--output-dir", default="runs/demo", help="where everything goes (default: %(default)s)"
    )
    demo.add_argument("--crops", type=int, default=60, help="raw photos to cut (default: %(default)s)")
    demo.add_argument("--epochs", type=int, default=25, help="training epochs (default: %(default)s)")
    demo.add_argument("--workers", type=int, default=2, help="training workers (default: %(default)s)")
    demo.add_argument("--s3", action="store_true", help="raw data, dataset and checkpoints on local S3")
    demo.add_argument("--smoke", action="store_true", help="only a few library-level training steps, no Ray")
    demo.add_argument("--steps", type=int, default=60, help="--smoke: training steps (default: %(default)s)")
    demo.set_defaults(func=cmd_demo)

    from pipelines.cluster.submit import add_job_verbs  # submit, jobs

    add_job_verbs(verbs)
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
