"""The `p2p` command: one entry point for every job of the pipeline.

Each verb is a job module with one config dataclass; its flags are generated from that dataclass through a
flag table below (flag → field), so a default, a choice list or a help text is written once, on the field.
`--config YAML`, `--set section.option=value` and `--print-config` work the same for every job verb.
`--print-config` prints only a config the job would accept: it runs the job's own checks (`validate()`, a
sweep's plan) first, refusing as the job would. Only the values a job cannot start without (each verb's
`required` paths: the dataset, the model, a name) may be missing, so that `p2p train --print-config` lists
the defaults; they are checked with a stand-in, so a missing one hides no other mistake.

User errors (a wrong option, a missing dataset, unreachable storage, ...) print one line on stderr saying
what to fix and exit with status 2; `--debug` (or P2P_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import ctypes
import functools
import io
import json
import os
import sys
import textwrap
import threading
from collections.abc import Callable, Sequence
from typing import Any

from pipelines.config import ConfigError, FlagTable, add_config_flags, config_from_args, to_yaml

DESCRIPTION = """\
pix2pix at cluster scale: build paired-image datasets with Ray Data, train pix2pix with Ray Train,
track, evaluate and promote models in MLflow, and translate images in batch.
`p2p VERB --help` explains each verb and its options."""

EPILOG = """\
a first run: `p2p demo` (the whole pipeline on bundled photos, on this machine).
The job verbs (dataset build, train, evaluate, promote, translate, sweep, segmenter train) accept
--config YAML, --set SECTION.OPTION=VALUE and --print-config."""

EXIT_USER_ERROR = 2

# ----------------------------------------------------------------------------------------------------------
# Flag tables: which config fields get a flag (everything else is reachable with --set)
# ----------------------------------------------------------------------------------------------------------

BUILD_FLAGS: FlagTable = {
    "--source": "source.uri",
    "--output": "output",
    "--layout": "source.layout",
    "--a-dir": "source.a_dir",
    "--b-dir": "source.b_dir",
    "--photos-dir": "source.photos_dir",
    "--builder": "derive.builder",
    "--palette": "derive.palette",
    "--ignore-id": "derive.ignore_id",
    "--resize": "resize.mode",
    "--size": "resize.size",
    "--samples-per-shard": "shards.samples_per_shard",
    "--wait": "lock.wait",
    "--break-lock": "lock.break_lock",
}
INSPECT_FLAGS: FlagTable = {
    "location": "location",
    "--verify": "verify",
    "--json": "json",
    "--show-quarantine": "show_quarantine",
}
TRAIN_FLAGS: FlagTable = {
    "--manifest": "data.manifest",
    "--storage": "storage",
    "--storage-shared": "storage_shared",
    "--workers": "workers",
    "--global-batch-size": "global_batch_size",
    "--run-name": "run_name",
    "--max-steps": "max_steps",
    "--checkpoint-every": "checkpoint_every",
    "--register-as": "mlflow.register_as",
    "--experiment": "mlflow.experiment",
    "--tracking-uri": "mlflow.tracking_uri",
}
EVALUATE_FLAGS: FlagTable = {
    "model_uri": "model_uri",
    "--manifest": "manifest",
    "--split": "split",
    "--seed": "seed",
    "--experiment": "experiment",
    "--tracking-uri": "tracking_uri",
    "--fid-weights": "fid_weights",
    "--segmenter": "segmenter",
    "--sheet-samples": "sheet_samples",
    "--resolution": "resolution",
    "--tile-size": "tile_size",
    "--tile-overlap": "tile_overlap",
    "--norm-stats": "norm_stats",
}
PROMOTE_FLAGS: FlagTable = {
    "name": "name",
    "--candidate": "candidate",
    "--manifest": "manifest",
    "--split": "split",
    "--metric": "metric",
    "--min-absolute-change": "min_absolute_change",
    "--margin": "min_absolute_change",  # its former name, kept for existing scripts
    "--min-relative-change": "min_relative_change",
    "--seed": "seed",
    "--dry-run": "dry_run",
    "--tracking-uri": "tracking_uri",
    "--fid-weights": "fid_weights",
    "--segmenter": "segmenter",
    "--sheet-samples": "sheet_samples",
    "--resolution": "resolution",
    "--tile-size": "tile_size",
    "--tile-overlap": "tile_overlap",
    "--norm-stats": "norm_stats",
}
SEGMENTER_FLAGS: FlagTable = {
    "--manifest": "data.manifest",
    "--epochs": "epochs",
    "--workers": "workers",
    "--global-batch-size": "global_batch_size",
    "--storage": "storage",
    "--run-name": "run_name",
    "--register-as": "register_as",
    "--experiment": "experiment",
    "--tracking-uri": "tracking_uri",
}
TRANSLATE_FLAGS: FlagTable = {
    "model_uri": "model_uri",
    "input": "input",
    "output": "output",
    "--split": "split",
    "--batch-size": "batch_size",
    "--actors": "actors",
    "--resolution": "resolution",
    "--tile-size": "tile_size",
    "--tile-overlap": "tile_overlap",
    "--output-size": "output_size",
    "--keep-dropout": "keep_dropout",
    "--norm-stats": "norm_stats",
    "--class-ids": "class_ids",
    "--tracking-uri": "tracking_uri",
}
DEMO_FLAGS: FlagTable = {
    "--output-dir": "output_dir",
    "--crops": "crops",
    "--epochs": "epochs",
    "--workers": "workers",
    "--s3": "s3",
    "--smoke": "smoke",
    "--steps": "steps",
}

SWEEP_FLAGS: FlagTable = {
    "--name": "name",
    "--manifest": "train.data.manifest",
    "--samples-per-trial": "samples_per_trial",
    "--concurrent-trials": "concurrent_trials",
    "--trial-retries": "trial_retries",
    "--eval-split": "eval_split",
    "--fid-weights": "fid_weights",
    "--segmenter": "segmenter",
}

# ----------------------------------------------------------------------------------------------------------
# Verbs
# ----------------------------------------------------------------------------------------------------------


# What --print-config checks a required value that is missing with: any text those checks accept.
STAND_IN = "stand-in"


def printed_config(
    args: argparse.Namespace,
    config: Any,
    required: tuple[str, ...] = (),
    check: Callable[[Any], object] | None = None,
) -> bool:
    """--print-config: check the config as the job would (`check`, default its `validate()`), print it, and
    tell the verb to stop there. The `required` paths (section.option) may be empty: they are checked with
    `STAND_IN` in a copy, and printed empty."""
    if not getattr(args, "print_config", False):
        return False
    probe = copy.deepcopy(config)  # a check may also normalise what it checks
    for path in required:
        *sections, name = path.split(".")
        owner = functools.reduce(getattr, sections, probe)
        if getattr(owner, name) in ("", None):
            setattr(owner, name, STAND_IN)
    (check or type(probe).validate)(probe)
    print(to_yaml(config), end="")
    return True


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


DATASET_BUILD_HELP = """\
Builds a pix2pix dataset: lists the source, pairs files by key, derives inputs, resizes, splits
train/val/test, and writes WebDataset shards ({split}-{index:06d}.tar) plus manifest.json to a folder or
s3://bucket/prefix. Bad inputs are quarantined with a reason in the manifest; the build completes.
Re-running the same build is a no-op; an interrupted build's re-run reuses its completed shards and
leaves no partial or orphan shards. One build writes an output at a time (<output>/.p2p-build.lock): a
second one fails at once naming the holder, or waits with --wait. The lock of a build that died on this
host is taken over; --break-lock also removes one gone silent elsewhere (no heartbeat for 2 minutes).

examples:
  p2p dataset build --source ../shared/data/camvid --layout paired --a-dir labels --b-dir images \\
      --builder labels --palette ../shared/data/camvid/classes.json --output runs/datasets/camvid-labels
  p2p dataset build --source s3://raw/shoes --layout photos --builder hed --output s3://datasets/shoes
  p2p dataset build --config examples/camvid_labels_dataset.yaml --set resize.size=128
"""


def cmd_dataset_build(args: argparse.Namespace) -> int:
    from pipelines.dataset.build import DatasetBuildConfig, run_build

    cfg = config_from_args(DatasetBuildConfig, args, BUILD_FLAGS)
    if not printed_config(args, cfg, required=("source.uri", "output")):
        run_build(cfg)
    return 0


def cmd_dataset_inspect(args: argparse.Namespace) -> int:
    from pipelines.dataset.inspect import InspectConfig, run_inspect

    cfg = config_from_args(InspectConfig, args, INSPECT_FLAGS)
    return 0 if printed_config(args, cfg) else run_inspect(cfg)


TRAIN_HELP = """\
Trains pix2pix with Ray Train's TorchTrainer: DDP over --workers workers (GPUs with NCCL when the
cluster has them, CPUs with gloo otherwise), streaming the shards listed in a dataset manifest.
Checkpoints go to --storage (a folder or s3:// prefix shared by all nodes; on a cluster of several nodes
a folder is refused unless --storage-shared says every node mounts it); a failed worker restarts from the
last checkpoint (max_failures). The MLflow run holds params, losses, validation metrics,
sample grids, the dataset and the final generator, registered under --register-as.

Every option without a flag is set with --set (top-level ones and those of the sections data, model and
mlflow), e.g. --set use_gpu=true --set model.ngf=32; `p2p train --print-config` lists them all with their
defaults. The global batch (a multiple of --workers) is split over the workers; the LR schedule is per
epoch and does not depend on the worker count, so a run resumed on another number of workers follows the
same schedule.
--resume RUN continues a stopped run with its recorded settings; only RESUMABLE may change.

examples:
  p2p train --manifest runs/datasets/camvid-labels --register-as camvid-labels2photo
  p2p train --config examples/train_camvid.yaml --workers 8 --global-batch-size 8 --storage s3://bucket/runs
  p2p train --resume p2p-20261122-101500-ab12cd --storage s3://bucket/runs --max-steps 20000
"""


def cmd_train(args: argparse.Namespace) -> int:
    from pipelines.config import flag_overrides, merge, user_values
    from pipelines.training.train import TrainJobConfig, resumed_run, run_training

    if not args.resume:
        cfg = config_from_args(TrainJobConfig, args, TRAIN_FLAGS)
        if printed_config(args, cfg, required=("data.manifest",)):
            return 0
        cfg.validate()
        run_training(cfg)
        return 0
    if args.config:
        raise ConfigError("--resume continues a run with its recorded config: drop --config")
    changes = merge(flag_overrides(args, TRAIN_FLAGS), user_values(None, args.set))
    storage_uri = changes.pop("storage", TrainJobConfig().storage)
    if changes.pop("run_name", args.resume) != args.resume:
        raise ConfigError("--resume names the run: drop --run-name")
    cfg, mlflow_run_id = resumed_run(args.resume, storage_uri, changes)
    if not printed_config(args, cfg):
        run_training(cfg, resume=mlflow_run_id)
    return 0


EVALUATE_HELP = """\
Computes L1, PSNR and SSIM (in [0, 1] units) of MODEL_URI on every sample of a dataset split with the
model's recorded preprocessing; FID and KID with the standard FID Inception when its weights are given
(--fid-weights or $P2P_FID_WEIGHTS); for labels→photo models the FCN-score (pixel accuracy, class
accuracy, class IoU) beside the real photos' ceiling when the dataset's segmenter is registered
(`p2p segmenter train`). Logs them as an MLflow evaluation run tagged with the model version and the
manifest's sha256, with a labelled input | output | target sheet of --sheet-samples fixed samples.
--resolution native scores at the dataset's stored size (each input through the generator at its own
size, compared with its stored target) instead of the model's training geometry.
MODEL_URI: models:/NAME/VERSION, models:/NAME@ALIAS, runs:/ID/generator, or a training checkpoint (file or
folder, local or s3://).
"""


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipelines.registry.evaluate import EvaluateConfig, run_evaluate

    cfg = config_from_args(EvaluateConfig, args, EVALUATE_FLAGS)
    if not printed_config(args, cfg, required=("model_uri", "manifest")):
        print(json.dumps(run_evaluate(cfg), indent=2))
    return 0


PROMOTE_HELP = """\
Evaluates the candidate version and the current champion on the same manifest, split and seed; moves
NAME@champion to the candidate only if it passes MLflow's MetricThreshold rule on --metric
(--min-absolute-change, alias --margin; --min-relative-change; with neither: strictly better). --metric auto
is the FCN class IoU when the dataset's segmenter is registered, else FID when its weights are given, else
L1 (with a warning: L1 favours blur). The decision, every metric of both models and the manifest hash
become model-version tags. The first version becomes champion. A candidate trained on another task
(channels, direction) is refused.
"""


def cmd_promote(args: argparse.Namespace) -> int:
    from pipelines.registry.promote import PromoteConfig, promote

    cfg = config_from_args(PromoteConfig, args, PROMOTE_FLAGS)
    if printed_config(args, cfg, required=("name",)):
        return 0
    decision = promote(cfg)
    print(json.dumps(decision, indent=2))
    verdict = "would move" if cfg.dry_run else "moved"
    if decision["promoted"]:
        print(
            f"{verdict} {cfg.name}@champion → version {decision['candidate_version']}: {decision['reason']}"
        )
    else:
        print(f"champion unchanged: {decision['reason']}")
    return 0


SEGMENTER_TRAIN_HELP = """\
Trains the segmenter behind the FCN-score on a labels→photo dataset: a small U-Net learns the real photos
(stored targets) → class ids (the stored colour-coded label maps, through the manifest's palette) on Ray
Train (DDP over --workers), validated on the val split each epoch, and registered in MLflow as
<dataset>-segmenter, where `p2p evaluate` and `p2p promote` find it.

examples:
  p2p segmenter train --manifest runs/datasets/camvid-labels --set data.crop_size=256
"""


def cmd_segmenter_train(args: argparse.Namespace) -> int:
    from pipelines.quality.train_segmenter import SegmenterTrainConfig, run_segmenter_training

    cfg = config_from_args(SegmenterTrainConfig, args, SEGMENTER_FLAGS)
    if not printed_config(args, cfg, required=("data.manifest",)):
        print(json.dumps(run_segmenter_training(cfg), indent=2, default=str))
    return 0


TRANSLATE_HELP = """\
Ray Data batch inference: every image under INPUT (or every input of a dataset split with --split, INPUT
being the dataset) gets the model's training preprocessing, goes through the generator on an actor pool
(GPUs when present), and is written as OUTPUT/<key>.png. Bad inputs are quarantined with reasons in
OUTPUT/translate_report.json, written last (a killed run leaves none); one translation writes OUTPUT at a
time. --resolution native translates each image at its own size (a 480x360 frame comes back at 480x360);
--tile-size N does it in overlapping, cross-faded N×N tiles to bound memory. Exit status 1 when inputs
were seen and none could be translated.

examples:
  p2p translate models:/camvid-labels2photo@champion frames/ out/ --resolution native
  p2p translate models:/camvid-labels2photo@champion big/ out/ --resolution native --tile-size 512
"""


def cmd_translate(args: argparse.Namespace) -> int:
    from pipelines.inference.translate import TranslateConfig, run_translate

    cfg = config_from_args(TranslateConfig, args, TRANSLATE_FLAGS)
    if printed_config(args, cfg, required=("model_uri", "input", "output")):
        return 0
    report = run_translate(cfg)
    return 0 if report["translated"] or not report["seen"] else 1


DEMO_HELP = """\
Runs the pipeline on embedded defaults (local Ray, a local folder as storage, sqlite MLflow) on crops of
real photos that ship with installed dependencies: an edges→photo dataset with Canny, a small model
trained for a few minutes on CPU, registered, promoted and used to translate the test split. --s3 does
the same against a local SeaweedFS S3 server (the `dev` extra). MLflow is always sqlite at
OUTPUT_DIR/mlflow.db: $MLFLOW_TRACKING_URI is not used.
"""


SWEEP_HELP = """\
Trains a grid of configs as concurrent trials on the Ray cluster (Ray Tune around the ordinary training
job: each trial is a `p2p train` run nested under one parent MLflow run), evaluates every trial on the
same split with the same measures as `p2p evaluate`, and writes results.md, results.csv and results.png
(mean and spread over seeds) under STORAGE/NAME and as artifacts of the parent run.
The config holds `train:` (the base training config), `trials:` (each a name and dotted-path `set:`
values) and `seeds:`; `samples_per_trial` gives every trial the same number of training samples.
A failed trial is retried from its checkpoint; running the same sweep again continues it.
MLflow: --set train.mlflow.tracking_uri=URI (there is no --tracking-uri), else $MLFLOW_TRACKING_URI, else
./runs/mlflow.db.

examples:
  p2p sweep --config examples/sweeps/ablation_camvid.yaml
  p2p sweep --config examples/sweeps/ablation_camvid.yaml --set 'seeds=[0,1,2]' --name ablation-3seeds
"""


def cmd_sweep(args: argparse.Namespace) -> int:
    from pipelines.sweep import SweepConfig, plan_trials, run_sweep

    cfg = config_from_args(SweepConfig, args, SWEEP_FLAGS)
    # Checked as planned: each trial's train config too, as the sweep checks it before Ray starts.
    if not printed_config(args, cfg, required=("name", "train.data.manifest"), check=plan_trials):
        run_sweep(cfg)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.demo import DemoConfig, run_demo

    run_demo(config_from_args(DemoConfig, args, DEMO_FLAGS))
    return 0


# ----------------------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------------------


def add_verb(
    verbs: argparse._SubParsersAction,
    name: str,
    func: Callable[[argparse.Namespace], int],
    summary: str,
    description: str = "",
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = verbs.add_parser(
        name,
        help=summary,
        description=description or summary,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=func, verb_parser=parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    from pipelines.cluster.submit import add_job_verbs
    from pipelines.dataset.build import DatasetBuildConfig
    from pipelines.dataset.inspect import InspectConfig
    from pipelines.demo import DemoConfig
    from pipelines.inference.translate import TranslateConfig
    from pipelines.quality.train_segmenter import SegmenterTrainConfig
    from pipelines.registry.evaluate import EvaluateConfig
    from pipelines.registry.promote import PromoteConfig
    from pipelines.sweep import SweepConfig
    from pipelines.training.train import TrainJobConfig

    parser = argparse.ArgumentParser(
        prog="p2p",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=32),
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also: P2P_DEBUG=1)")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", title="verbs")

    dataset = verbs.add_parser("dataset", help="build WebDataset shards from raw images, and inspect them")
    actions = dataset.add_subparsers(dest="dataset_verb", metavar="ACTION", required=True)
    build = add_verb(
        actions, "build", cmd_dataset_build, "raw images → shards + manifest", DATASET_BUILD_HELP
    )
    add_config_flags(build, DatasetBuildConfig, BUILD_FLAGS)
    inspect = add_verb(actions, "inspect", cmd_dataset_inspect, "summarise (and verify) a built dataset")
    add_config_flags(inspect, InspectConfig, INSPECT_FLAGS, yaml_flags=False)

    resumable = textwrap.fill(", ".join(TrainJobConfig.RESUMABLE), width=104).replace("\n", "\n  ")
    train = add_verb(
        verbs,
        "train",
        cmd_train,
        "train pix2pix with Ray Train (DDP), tracked in MLflow",
        TRAIN_HELP.replace("only RESUMABLE may change", f"only these may change:\n  {resumable}"),
    )
    add_config_flags(train, TrainJobConfig, TRAIN_FLAGS)
    train.add_argument(
        "--resume", metavar="RUN", help="continue the stopped run RUN from its last checkpoint"
    )

    evaluate = add_verb(
        verbs, "evaluate", cmd_evaluate, "score a model on a dataset split, as an MLflow run", EVALUATE_HELP
    )
    add_config_flags(evaluate, EvaluateConfig, EVALUATE_FLAGS)
    promote = add_verb(
        verbs, "promote", cmd_promote, "move the champion alias to a candidate that beats it", PROMOTE_HELP
    )
    add_config_flags(promote, PromoteConfig, PROMOTE_FLAGS)
    segmenter = verbs.add_parser(
        "segmenter", help="the segmenter behind the FCN-score of labels→photo models"
    )
    segmenter_actions = segmenter.add_subparsers(dest="segmenter_verb", metavar="ACTION", required=True)
    segmenter_train = add_verb(
        segmenter_actions,
        "train",
        cmd_segmenter_train,
        "train and register <dataset>-segmenter on Ray Train",
        SEGMENTER_TRAIN_HELP,
    )
    add_config_flags(segmenter_train, SegmenterTrainConfig, SEGMENTER_FLAGS)
    translate = add_verb(
        verbs,
        "translate",
        cmd_translate,
        "batch inference over a folder, s3:// prefix or split",
        TRANSLATE_HELP,
    )
    add_config_flags(translate, TranslateConfig, TRANSLATE_FLAGS)
    sweep = add_verb(
        verbs,
        "sweep",
        cmd_sweep,
        "a grid of training configs as Ray Tune trials, evaluated side by side",
        SWEEP_HELP,
    )
    add_config_flags(sweep, SweepConfig, SWEEP_FLAGS)
    add_job_verbs(verbs)  # submit, jobs
    demo = add_verb(
        verbs, "demo", cmd_demo, "the whole pipeline on bundled photos, on this machine", DEMO_HELP
    )
    add_config_flags(demo, DemoConfig, DEMO_FLAGS, yaml_flags=False)
    add_verb(verbs, "version", cmd_version, "versions of this package and the libraries it runs on")
    return parser


# MLflow's answers to a name, version, alias or run that does not exist, or a value it refuses.
MLFLOW_USER_ERROR_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def is_user_error(exc: BaseException) -> bool:
    """Whether the exception means the user must fix something: it prints one line, not a traceback."""
    from pipelines.manifest import ManifestError
    from pipelines.storage import StorageError

    kinds = (
        ConfigError,
        ManifestError,
        StorageError,
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        ValueError,
        TimeoutError,
        ConnectionError,  # a cluster or server that does not answer: its address, or starting it, is the fix
    )
    if isinstance(exc, kinds):
        return True
    mlflow_exceptions = sys.modules.get("mlflow.exceptions")  # loaded if MLflow ran: no import here
    return (
        mlflow_exceptions is not None
        and isinstance(exc, mlflow_exceptions.MlflowException)
        and exc.error_code in MLFLOW_USER_ERROR_CODES
    )


def one_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return " ".join(lines[:2]) or type(exc).__name__


def fill_positionals(
    args: argparse.Namespace, verb_parser: argparse.ArgumentParser, unknown: list[str]
) -> list[str]:
    """Positionals given after an option (`translate MODEL DATASET --split val OUT`): argparse fills every
    optional positional of a run at once (OUT with nothing, before --split) and leaves the later ones
    unrecognised. The leading ones take the positionals still empty, in order; the rest (from the first
    that looks like an option, whose values they may be) stay unrecognised."""
    leading = next((i for i, token in enumerate(unknown) if token.startswith("-")), len(unknown))
    empty = [
        action.dest
        for action in verb_parser._actions  # argparse's own list: the verb's positionals, in order
        if not action.option_strings and action.nargs == "?" and getattr(args, action.dest, None) is None
    ]
    filled = min(len(empty), leading)
    for dest, token in zip(empty[:filled], unknown[:filled], strict=True):
        setattr(args, dest, token)
    return unknown[filled:]


def run_verb(argv: Sequence[str] | None = None) -> int:
    """Parse the command line (``argv``, default sys.argv[1:]), run its verb, and return the exit code."""
    # File and member names read from hostile sources may hold bytes that are not UTF-8 (kept as surrogate
    # escapes): printed as \udcff rather than ending a report, or an error line, with UnicodeEncodeError.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    # --debug is taken anywhere before a "--" (which starts a submitted job's own command line), not only
    # before the verb: it is what one adds to the end of a command that just failed.
    argv = list(sys.argv[1:] if argv is None else argv)
    own = argv.index("--") if "--" in argv else len(argv)
    debug_anywhere = "--debug" in argv[:own]
    argv = [a for a in argv[:own] if a != "--debug"] + argv[own:]
    args, unknown = parser.parse_known_args(argv)
    verb_parser: argparse.ArgumentParser = getattr(args, "verb_parser", None) or parser
    unknown = fill_positionals(args, verb_parser, unknown)
    if unknown:
        verb_parser.error(f"unrecognized arguments: {' '.join(unknown)}")  # the verb's usage, exit 2
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    debug = debug_anywhere or os.environ.get("P2P_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args))
    except KeyboardInterrupt as exc:
        print(f"{verb_parser.prog}: interrupted" + (f": {exc}" if str(exc) else ""), file=sys.stderr)
        return 130
    except Exception as exc:
        if debug or not is_user_error(exc):
            raise
        print(f"{verb_parser.prog}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """The `p2p` command (the installed script calls it, and so does a job's `p2p` with an uploaded
    checkout's own copy). With ``argv`` (a caller in Python) it returns the verb's exit code.

    Without (the command line itself), once the verb has returned the process exits there, skipping the
    interpreter's teardown: after a job (torch, Ray, MLflow and pyarrow loaded) that took 1.4 s of freeing
    modules, after Ctrl-C as after a finished run. What must happen at exit is registered with atexit (Ray's
    shutdown, MLflow ending its run, logging's flush, temporary folders' removal) and runs first, as at any
    exit; the job's own files are closed by then. A thread that is not a daemon would be waited for at a
    normal exit: then `main` returns, and the exit is the normal one. So is an exception out of the verb
    (--debug, a bug), traceback included."""
    code = run_verb(argv)
    if argv is None and not any(
        not t.daemon for t in threading.enumerate() if t is not threading.main_thread()
    ):
        atexit._run_exitfuncs()  # (run once: the normal exit below would find none left)
        try:
            for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):  # (replaced ones too)
                if stream is not None and not stream.closed:
                    stream.flush()
        except (OSError, ValueError):  # a full disk, a reader gone: Python's exit says so, with status 120
            return code
        with contextlib.suppress(OSError, AttributeError):  # C libraries' own buffered output
            ctypes.CDLL(None).fflush(None)
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
