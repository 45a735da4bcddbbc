"""Job configs from YAML, flags and overrides: typos are errors, values are typed, the shipped examples load,
and every verb's flags come from its config dataclass."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipelines.cli import main
from pipelines.config import ConfigError, load_config, load_yaml
from pipelines.dataset.build import DatasetBuildConfig
from pipelines.manifest import ManifestError
from pipelines.registry.promote import PromoteConfig
from pipelines.registry.tracking import recorded_with_credentials
from pipelines.training.train import TrainJobConfig, resumed_run

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
UNET6 = ["--set", "model.netG=unet", "--set", "model.unet_downs=6"]
PHOTOS_CANNY = ["--source", "s", "--output", "o", "--layout", "photos", "--builder", "canny"]


def test_overrides_are_typed_and_nested(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("source: {uri: a, layout: photos}\nderive: {builder: canny}\noutput: o")
    cfg = load_config(
        DatasetBuildConfig,
        tmp_path / "c.yaml",
        ["resize.size=128", "derive.canny_low=10", "derive.canny_high=30.5", "source.uri=s3://b/p"],
    )
    assert cfg.resize.size == 128 and cfg.derive.canny_low == 10.0 and cfg.derive.canny_high == 30.5
    assert cfg.source.uri == "s3://b/p" and cfg.source.layout == "photos"


def test_a_section_given_in_part_keeps_the_jobs_defaults_for_the_rest(tmp_path: Path) -> None:
    """The train job's model section defaults to 5 + 5 epochs (a bare Pix2PixConfig: 100 + 100): setting
    one model option, by --set or in a YAML file, must not bring back the other 198 epochs."""
    default = load_config(TrainJobConfig)
    assert (default.model.n_epochs, default.model.n_epochs_decay) == (5, 5)
    cfg = load_config(TrainJobConfig, overrides=["model.ngf=32"])
    assert cfg.model.ngf == 32 and (cfg.model.n_epochs, cfg.model.n_epochs_decay) == (5, 5)
    (tmp_path / "c.yaml").write_text("model: {netG: unet_128}\ndata: {crop_size: 128}")
    cfg = load_config(TrainJobConfig, tmp_path / "c.yaml")
    assert cfg.model.netG == "unet_128" and (cfg.model.n_epochs, cfg.model.n_epochs_decay) == (5, 5)
    assert cfg.data.crop_size == 128 and cfg.data.manifest == default.data.manifest


def test_values_read_as_yaml_1_2_and_text_options_keep_what_was_typed(tmp_path: Path) -> None:
    # PyYAML's YAML 1.1 read 1e-4 as text (refused as a learning rate), 010 as 8, 2024-06-01 as a date.
    cfg = load_config(TrainJobConfig, overrides=["model.lr=1e-4", "seed=010", "run_name=2024-06-01"])
    assert cfg.model.lr == 1e-4 and cfg.seed == 10 and cfg.run_name == "2024-06-01"
    assert type(cfg.seed) is int and type(cfg.model.lr) is float
    (tmp_path / "c.yaml").write_text(
        "model: {lr: 2E-3, beta1: .5}\nrun_name: 010\nmlflow: {experiment: 1.10}"
    )
    cfg = load_config(TrainJobConfig, tmp_path / "c.yaml")
    assert cfg.model.lr == 0.002 and cfg.model.beta1 == 0.5
    assert cfg.run_name == "010" and cfg.mlflow.experiment == "1.10"
    with pytest.raises(ConfigError, match="expected true/false, got 'yes'"):  # YAML 1.1's booleans: text
        load_config(TrainJobConfig, overrides=["use_gpu=yes"])


def test_a_typo_names_the_known_options() -> None:
    with pytest.raises(ConfigError, match=r"config.derive: unknown option\(s\) buildr; known: builder"):
        load_config(DatasetBuildConfig, overrides=["derive.buildr=canny"])


def test_wrong_types_and_choices_are_errors() -> None:
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(DatasetBuildConfig, overrides=["resize.size=big"])
    with pytest.raises(ConfigError, match="'sobel' is not one of"):
        load_config(DatasetBuildConfig, overrides=["derive.builder=sobel"])


@pytest.mark.parametrize("name", ["camvid_labels_dataset.yaml", "edges_dataset.yaml"])
def test_dataset_examples_load_and_validate(name: str) -> None:
    load_config(DatasetBuildConfig, EXAMPLES / name).validate()


def test_training_example_loads() -> None:
    cfg = load_config(TrainJobConfig, EXAMPLES / "train_camvid.yaml")
    assert cfg.model.netG == "unet_256" and cfg.global_batch_size % cfg.workers == 0


# ----------------------------------------------------------------------------------------------------------
# The CLI's one config path: flags generated from the config dataclasses
# ----------------------------------------------------------------------------------------------------------

VERB_ARGS = {
    "dataset build": ["--source", "raw", "--layout", "photos", "--builder", "canny", "--output", "out"],
    "train": ["--manifest", "data", "--workers", "4", "--global-batch-size", "8", "--set", "model.ngf=32"],
    "evaluate": ["models:/m/1", "--manifest", "data", "--split", "val", "--norm-stats", "per_image"],
    "promote": ["m", "--candidate", "3", "--metric", "psnr", "--dry-run", "--resolution", "native"],
    "translate": ["models:/m@champion", "in", "out", "--output-size", "source"],
    "translate native": ["models:/m@champion", "in", "out", "--resolution", "native", "--tile-size", "512"],
    "sweep": ["--name", "s", "--config", "examples/sweeps/ablation_camvid.yaml", "--manifest", "ds"],
}


@pytest.mark.parametrize("verb", list(VERB_ARGS))
def test_print_config_is_usable_as_config(
    verb: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    command = verb.split()[:2] if verb.startswith("dataset") else verb.split()[:1]
    assert main([*command, *VERB_ARGS[verb], "--print-config"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "resolved.yaml").write_text(printed)
    assert main([*command, "--config", str(tmp_path / "resolved.yaml"), "--print-config"]) == 0
    assert capsys.readouterr().out == printed
    values = yaml.safe_load(printed)
    if verb == "train":
        assert values["workers"] == 4 and values["model"]["ngf"] == 32 and "input_nc" not in values["model"]
    if verb == "evaluate":  # the flags the README documents
        assert values["norm_stats"] == "per_image"
    if verb == "promote":
        assert values["dry_run"] is True and values["metric"] == "psnr" and values["candidate"] == "3"
        assert values["resolution"] == "native"
    if verb == "sweep":
        assert values["train"]["data"]["manifest"] == "ds"
    if verb == "translate":  # a config written before `resolution` existed reads the same
        assert values["output_size"] == "source" and values["resolution"] == "model"
    if verb == "translate native":
        assert (
            values["resolution"] == "native" and values["tile_size"] == 512 and values["tile_overlap"] == 64
        )


def test_flags_take_type_choices_default_and_help_from_the_field(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["promote", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    metric = dataclasses.fields(PromoteConfig)[
        [f.name for f in dataclasses.fields(PromoteConfig)].index("metric")
    ]
    choices = "{auto,l1,psnr,ssim,fid,kid,fcn_iou,fcn_pixel_acc,fcn_class_acc}"
    assert metric.metadata["help"] in text and choices in text and "(default: auto)" in text
    with pytest.raises(SystemExit) as exc:
        main(["promote", "m", "--metric", "lpips"])
    assert exc.value.code == 2 and "invalid choice: 'lpips'" in capsys.readouterr().err


def test_a_typo_in_an_option_shows_the_verbs_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--manifest", "d", "--wrkers", "3"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "usage: p2p train" in err and "unrecognized arguments: --wrkers 3" in err


SWEEP = ["sweep", "--name", "s", "--set", "train.data.manifest=d"]  # a sweep that is valid so far
LABELS_BUILD = [
    "dataset",
    "build",
    "--source",
    "/nonexistent-p2p-src",
    "--output",
    "o",
    "--builder",
    "labels",
]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--set", "model.input_nc=1"], "model.input_nc is not an option: it is derived from"),
        (["train", "--set", "data.batch_size=4"], "derived from global_batch_size / workers"),
        (["train", "--manifest", "d", "--workers", "0"], "workers must be >= 1"),
        (["train", "--manifest", "d", "--workers", "3"], "does not divide over 3 workers"),
        (
            ["train", "--manifest", "d", "--set", "data.crop_size=100"],
            "divisible by 256, got 100x100 (height 100 → nearest valid 256",
        ),
        (["train", "--manifest", "d", "--run-name", "../up"], "run_name '../up'"),
        (["train", "--manifest", str(Path("/nonexistent-p2p")), "--workers", "1"], "no dataset manifest"),
        (["train", "--resume", "nosuch-p2p-run", "--set", "model.lr=1"], "no run 'nosuch-p2p-run'"),
        (["evaluate", "models:/m/1"], "--manifest DATASET"),
        (["dataset", "build", "--set", "resize.size=big"], "expected an integer"),
        (["dataset", "build", "--config", "/nonexistent.yaml"], "no such file"),
        (["promote", "m", "--margin", "-1"], "margin must be >= 0"),
        (["promote", "m", "--margin", "nan"], "margin must be >= 0, got nan"),
        (
            ["promote", "m", "--margin", "0.1", "--min-absolute-change", "0.2"],
            "--min-absolute-change and --margin are one option (one its former name): give one",
        ),
        (["dataset", "build", *PHOTOS_CANNY, "--set", "derive.canny_low=250"], "give both derive.canny_low"),
        (
            [*LABELS_BUILD, "--palette", "cityscapes", "--set", "derive.ignore_id=-1"],
            "derive.ignore_id must be a class id 0..65535, got -1",
        ),
        (
            [*LABELS_BUILD, "--palette", "cityscapes", "--set", "derive.label_remap={1: 70000}"],
            "derive.label_remap maps class ids 0..65535 to class ids, got 1: 70000",
        ),
        (
            ["dataset", "build", *PHOTOS_CANNY, "--set", "derive.canny_blur=4"],
            "canny_blur must be 0 or odd (a kernel size), got 4",
        ),
        (
            [
                "dataset",
                "build",
                *PHOTOS_CANNY,
                "--set",
                "derive.canny_low=20",
                "--set",
                "derive.canny_high=10",
            ],
            "0 <= canny_low <= canny_high, got 20.0, 10.0",
        ),
        (
            ["dataset", "build", "--source", "s", "--output", "o", "--samples-per-shard", "-3"],
            "samples_per_shard",
        ),
        (["dataset", "build", "--source", "s", "--output", "o", "--set", "split.train=1.5"], "in [0, 1]"),
        (["dataset", "build", "--source", "s", "--output", "o", "--set", "split.val=0.5"], "sum to 1"),
        (["dataset", "build", "--source", "s", "--output", "o", "--set", "shards.jpeg_quality=0"], "1..100"),
        (["dataset", "build", "--source", "s", "--output", "o", "--set", "max_pixels=-1"], "max_pixels"),
        (["dataset", "build", "--source", "s", "--output", "o", "--layout", "photos"], "does not apply"),
        (["dataset", "build", "--output", "o"], "set both source.uri and output"),
        (
            [*LABELS_BUILD, "--palette", "cityscapes"],
            "/nonexistent-p2p-src",
        ),
        (["dataset", "inspect"], "give the dataset"),
        (["dataset", "inspect", "/nonexistent-p2p-dataset"], "no dataset manifest"),
        (["dataset", "inspect", __file__], "no dataset manifest at"),  # a file, not a dataset folder
        (
            [*LABELS_BUILD, "--palette", "/nonexistent-p2p-palette.json"],
            "/nonexistent-p2p-palette.json",
        ),
        # Model settings checked before Ray starts (they used to fail in every worker attempt).
        (["train", "--manifest", "d", "--set", "model.ngf=0"], "ngf and ndf must be >= 1"),
        (["train", "--manifest", "d", "--set", "model.lr=-1"], "lr must be a number > 0"),
        (["train", "--manifest", "d", "--set", "model.beta1=1"], "beta1 and beta2 must be in [0, 1)"),
        (["train", "--manifest", "d", *UNET6, "--set", "model.unet_downs=4"], "unet_downs must be >= 5"),
        (
            ["train", "--manifest", "d", "--set", "model.lr_policy=step", "--set", "model.lr_decay_epochs=0"],
            "lr_policy step needs lr_decay_epochs >= 1",
        ),
        (["train", "--manifest", "d", "--set", "model.compile_mode=max_autotune"], "is not one of default"),
        (
            ["train", "--manifest", "d", *UNET6, "--set", "data.crop_size=64", "--set", "model.num_D=3"],
            "sees 16 px per side at its coarsest scale from 64x64 crops, and needs 24",
        ),
        (
            ["train", "--manifest", "d", "--set", "model.n_epochs=0", "--set", "model.n_epochs_decay=0"],
            "n_epochs + model.n_epochs_decay must be >= 1",
        ),
        (["translate", "models:/m@champion"], "give INPUT"),
        (["translate", "models:/m@champion", "in", "out", "--batch-size", "0"], "batch_size must be >= 1"),
        (
            ["translate", "models:/m@champion", "in", "out", "--tile-size", "256", "--tile-overlap", "256"],
            "tile_overlap must be >= 0 and smaller than tile_size (256), got 256",
        ),
        (["evaluate", "models:/m/1", "--manifest", "d", "--tile-size", "-1"], "tile_size must be >= 0"),
        (
            ["translate", "models:/m@champion", "in", "out", "--set", "resolution=full"],
            "'full' is not one of",
        ),
        (["promote"], "give the registered model's NAME"),
        (["train", "--manifest", "d", "--max-steps", "-1"], "max_steps must be >= 0"),
        (["train", "--manifest", "d", "--set", "mlflow.log_every=0"], "log_every must be >= 1"),
        (["train", "--manifest", "d", "--set", "model.netG=unet_512"], "is not one of"),
        (["train", "--config", "/nonexistent-p2p.yaml"], "no such file"),
        (["train", "--manifest", "d", "--set", "model"], "must look like section.option=value"),
        (["sweep", "--set", "train.data.manifest=d"], "give --name"),
        ([*SWEEP, "--set", "trials=[{name: a}, {name: a}]"], "trial names must be unique"),
        ([*SWEEP, "--set", "trials=[{name: a, set: {workers: 0}}]"], "trial a: workers must be >= 1"),
        ([*SWEEP, "--set", "seeds=[]"], "seeds must be"),
    ],
)
def test_user_errors_are_one_line_with_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("where", ["before the verb", "after the verb"])
def test_debug_shows_the_traceback_wherever_it_is_given(where: str) -> None:
    args = ["train", "--manifest", "d", "--workers", "0"]
    args = ["--debug", *args] if where == "before the verb" else [*args, "--debug"]
    with pytest.raises(ConfigError, match="workers must be >= 1"):  # raised, not printed as one line
        main(args)


def test_resume_refuses_changes_that_would_alter_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorded = dataclasses.asdict(TrainJobConfig())
    recorded["data"]["manifest"] = str(tmp_path / "no-dataset")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "p2p_run.json").write_text(json.dumps({"config": recorded, "mlflow_run_id": "x"}))
    changes = {"model": {"netG": "unet_128"}, "data": {"crop_size": 128}}
    with pytest.raises(ConfigError, match=r"cannot change: data.crop_size, model.netG.*allowed: max_steps"):
        resumed_run("r", str(tmp_path), changes)
    # The same command again (its recorded values repeated) passes that check: here it then finds no dataset.
    same = {"mlflow": {"tracking_uri": recorded["mlflow"]["tracking_uri"]}, "model": {"netG": "unet_256"}}
    with pytest.raises(ManifestError, match="no-dataset"):
        resumed_run("r", str(tmp_path), same)
    # Also with the dataset given as a relative path, as it was typed the first time.
    monkeypatch.chdir(tmp_path)
    same["data"] = {"manifest": "no-dataset"}
    with pytest.raises(ManifestError, match="no-dataset"):
        resumed_run("r", str(tmp_path), same)
    with pytest.raises(FileNotFoundError, match="no run 'other'"):  # before anything about its settings
        resumed_run("other", str(tmp_path), changes)
    # More workers for the rest of the run: only a count its kept global batch divides over.
    with pytest.raises(ConfigError, match=r"global batch of 2, which --resume keeps: .* \(1, 2\), not 4$"):
        resumed_run("r", str(tmp_path), {"workers": 4})


def test_values_that_would_spin_or_mislead_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    build = ["dataset", "build", "--source", "a", "--output", "b", "--layout", "photos", "--builder", "canny"]
    for setting, refusal in (
        ("lock.ttl_s=0", "lock.ttl_s and lock.poll_s must be > 0"),
        ("lock.poll_s=-1", "lock.ttl_s and lock.poll_s must be > 0"),
        ("keep_replaced_hours=-5", "keep_replaced_hours must be >= 0, got -5"),
    ):
        assert main([*build, "--set", setting]) == 2
        assert refusal in capsys.readouterr().err
    assert main(["dataset", "inspect", "x", "--show-quarantine", "-5"]) == 2
    assert "--show-quarantine must be >= 0, got -5" in capsys.readouterr().err
    for flag in ("--crops", "--steps"):
        assert main(["demo", "--smoke", flag, "-3"]) == 2
        assert f"{flag} must be >= 1, got -3" in capsys.readouterr().err


def test_resume_finds_the_tracking_credentials_the_run_record_leaves_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorded = dataclasses.asdict(TrainJobConfig())
    recorded["data"]["manifest"] = str(tmp_path / "no-dataset")
    recorded["mlflow"]["tracking_uri"] = "https://***@mlflow.example:5000"  # as open_run records it
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "p2p_run.json").write_text(json.dumps({"config": recorded, "mlflow_run_id": "x"}))
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME"):
        monkeypatch.delenv(name, raising=False)
    # Another store would not have this run: not the default sqlite file, an error saying what to give.
    with pytest.raises(ConfigError, match="whose credentials are not recorded: give that URI again"):
        resumed_run("r", str(tmp_path), {})
    full = "https://alice:s3cret@mlflow.example:5000"
    with pytest.raises(ManifestError, match="no-dataset"):  # the same URI given again is no change
        resumed_run("r", str(tmp_path), {"mlflow": {"tracking_uri": full}})
    with pytest.raises(ConfigError, match=r"cannot change: mlflow\.tracking_uri"):
        resumed_run("r", str(tmp_path), {"mlflow": {"tracking_uri": "https://bob:pw@elsewhere:5000"}})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", full)
    assert recorded_with_credentials(recorded["mlflow"]["tracking_uri"]) == full
    with pytest.raises(ManifestError, match="no-dataset"):
        resumed_run("r", str(tmp_path), {})
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")  # MLflow authenticates with its variables
    assert recorded_with_credentials(recorded["mlflow"]["tracking_uri"]) == "https://mlflow.example:5000"


def test_a_model_mlflow_does_not_know_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mlflow import MlflowClient

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    model = "models:/nosuch-p2p/1"
    folders = [str(tmp_path / "in"), str(tmp_path / "out")]
    (tmp_path / "in").mkdir()
    # A store that does not exist is a wrong path, not an empty registry: said so, and not created.
    assert main(["translate", model, *folders, "--tracking-uri", tracking]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"p2p translate: error: no MLflow tracking store at {tmp_path / 'mlflow.db'}: give the one the model "
        "was logged to with --tracking-uri sqlite:////abs/path/mlflow.db, or set MLFLOW_TRACKING_URI (the "
        "default is runs/mlflow.db under the current folder)\n"
    )
    assert not (tmp_path / "mlflow.db").exists()
    MlflowClient(tracking).search_experiments()  # the store exists now, without that model
    assert main(["translate", model, *folders, "--tracking-uri", tracking]) == 2
    err = capsys.readouterr().err  # before it: MLflow's INFO lines creating the new database
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last == "p2p translate: error: Registered Model with name=nosuch-p2p not found"
    # Tracking URIs MLflow would misread: a traceback from SQLAlchemy, or a message about its file store.
    for uri, form in (
        ("sqlite:/abs/m.db", "write sqlite:////abs/m.db for an absolute path (four slashes)"),
        ("runs/mlflow.db", "a database file is given as sqlite:///runs/mlflow.db"),
    ):
        assert main(["evaluate", model, "--manifest", "x", "--split", "val", "--tracking-uri", uri]) == 2
        assert form in capsys.readouterr().err


def test_a_tracking_server_that_does_not_answer_is_refused_before_any_work(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """MLflow retries a dead server's every request for minutes; the probe says so at once, in one line,
    without the URI's password. Any HTTP answer counts: a proxy's 401 is a server that is there."""
    import http.server
    import socket
    import threading

    from pipelines.registry.tracking import tracking_uri

    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    dead = f"http://alice:s3cret@127.0.0.1:{port}"
    started = time.monotonic()
    assert main(["evaluate", "models:/m/1", "--manifest", "x", "--tracking-uri", dead]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"p2p evaluate: error: cannot reach the MLflow tracking server http://***@127.0.0.1:{port} (from "
        "--tracking-uri: connection failed): start it, or fix the address\n"
    )
    assert time.monotonic() - started < 10

    class Unauthorised(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unauthorised)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        there = f"http://127.0.0.1:{server.server_address[1]}/prefix"
        assert tracking_uri(there) == there
    finally:
        server.shutdown()


def test_a_tracking_server_behind_tls_is_probed_with_mlflows_own_tls_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A self-signed server that MLflow reaches (MLFLOW_TRACKING_SERVER_CERT_PATH) is reachable to the
    probe too; without the setting the refusal says which setting to make."""
    import datetime
    import http.server
    import ipaddress
    import ssl
    import threading

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from pipelines.registry.tracking import tracking_uri

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )

    class Healthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"https://127.0.0.1:{server.server_address[1]}"
    try:
        monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH", raising=False)
        monkeypatch.delenv("MLFLOW_TRACKING_INSECURE_TLS", raising=False)
        with pytest.raises(ConnectionError, match="TLS failed: set MLFLOW_TRACKING_SERVER_CERT_PATH"):
            tracking_uri(uri)
        monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(tmp_path / "cert.pem"))
        assert tracking_uri(uri) == uri
    finally:
        server.shutdown()


def test_a_run_whose_logging_fails_is_ended_not_left_running(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from pipelines.registry.tracking import ended_if_raised

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("e")
    for error, status in ((OSError("the artifact store is full"), "FAILED"), (KeyboardInterrupt(), "KILLED")):
        run_id = client.create_run(experiment).info.run_id
        with pytest.raises(type(error)), ended_if_raised(client, run_id):
            raise error
        assert client.get_run(run_id).info.status == status


# ----------------------------------------------------------------------------------------------------------
# A config file that cannot be read as meant: one line naming it, never a silent choice or a traceback
# ----------------------------------------------------------------------------------------------------------


def test_a_key_given_twice_is_refused_not_silently_dropped(tmp_path: Path) -> None:
    # YAML alone keeps the last: a second `model:` block appended to a config dropped the whole first one.
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  ngf: 32\ndata: {crop_size: 128}\nmodel:\n  lr: 0.001\n")
    with pytest.raises(ConfigError) as exc:
        load_config(TrainJobConfig, config)
    assert str(exc.value) == (
        f"--config {config}: key 'model' appears twice (lines 1 and 4): merge them into one"
    )
    config.write_text("model:\n  ngf: 32\n  lr: 0.001\n  ngf: 64\n")  # in a nested section too
    with pytest.raises(ConfigError, match=r"key 'ngf' appears twice \(lines 2 and 4\)"):
        load_config(TrainJobConfig, config)
    with pytest.raises(ConfigError, match=r"^override 'model=\{ngf: 1, ngf: 2\}': key 'ngf' appears twice"):
        load_config(TrainJobConfig, overrides=["model={ngf: 1, ngf: 2}"])
    # A YAML merge key's values may be overridden: that is what it is for.
    assert load_yaml("a: &x {k: 1, j: 2}\nb: {<<: *x, k: 3}")["b"] == {"k": 3, "j": 2}


def test_a_config_that_is_not_a_readable_text_file_is_one_line_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--config", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"p2p train: error: --config {tmp_path}: is a folder, not a YAML file\n", err
    (tmp_path / "model.pt").write_bytes(b"PK\x03\x04\x89\xff\x00")
    with pytest.raises(ConfigError, match=r"^--config .*model\.pt: not a text file \(byte 0x89 at offset 4"):
        load_config(TrainJobConfig, tmp_path / "model.pt")
    (tmp_path / "c.yaml").write_text("workers: 2\n")

    def refused(self: Path, *args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refused)  # chmod does not stop root, who may run the tests
    with pytest.raises(ConfigError, match=r"^--config .*c\.yaml: not readable \(permission denied\)"):
        load_config(TrainJobConfig, tmp_path / "c.yaml")


def test_a_yaml_syntax_error_says_what_is_wrong_and_where(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("data: {crop_size: 256\n        load_size: 286}\n")  # a comma forgotten
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"p2p train: error: --config {config}: not valid YAML: expected ',' or '}}', but got ':' at line 2, "
        "column 18 (while parsing a flow mapping from line 1, column 7)\n"
    ), err
    with pytest.raises(ConfigError, match=r"^override 'data=\[1': the value is not valid YAML: expected"):
        load_config(TrainJobConfig, overrides=["data=[1"])


PRINTED_VERBS = ["dataset build", "train", "evaluate", "promote", "segmenter train", "translate", "sweep"]


@pytest.mark.parametrize("verb", PRINTED_VERBS)
def test_print_config_alone_lists_the_defaults(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Without the values a job cannot start without (a dataset, a model, a name): what --print-config is for.
    assert main([*verb.split(), "--print-config"]) == 0
    assert isinstance(yaml.safe_load(capsys.readouterr().out), dict)


@pytest.mark.parametrize(
    "args",
    [
        ["translate", "M", "D", "O", "--split", "val"],
        ["translate", "M", "D", "--split", "val", "O"],
        ["translate", "M", "--split", "val", "D", "O"],
        ["translate", "--split", "val", "M", "D", "O"],
    ],
)
def test_positionals_may_follow_options(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*args, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["model_uri"], printed["input"], printed["output"], printed["split"]) == (
        "M",
        "D",
        "O",
        "val",
    )


def test_a_positional_beyond_the_verbs_is_still_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["translate", "M", "D", "--split", "val", "O", "extra"])
    assert exit_.value.code == 2 and "unrecognized arguments: extra" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # only what is wrong is named
        main(["translate", "M", "--split", "val", "D", "O", "--bogus", "x"])
    assert "unrecognized arguments: --bogus x" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--min-absolute-change", "--margin"])
def test_a_former_flag_name_sets_its_option_and_is_not_listed_twice(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["promote", "m", flag, "0.25", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["min_absolute_change"] == 0.25
    with pytest.raises(SystemExit):
        main(["promote", "--help"])
    shown = capsys.readouterr().out
    assert "--margin MARGIN" not in shown and shown.count("former name") == 1  # named in the option's help


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--manifest", "x", "--workers", "-3"], "workers must be >= 1, got -3"),
        (
            ["train", "--workers", "-3"],
            "workers must be >= 1, got -3",
        ),  # the missing --manifest hides nothing
        (["train", "--run-name", "../up"], "run_name '../up'"),
        (["dataset", "build", "--set", "split.val=0.5"], "sum to 1"),
        (["dataset", "build", "--layout", "photos"], "does not apply to the photos layout"),
        (["evaluate", "--tile-size", "-1"], "tile_size must be >= 0"),
        (["promote", "--margin", "-1"], "margin must be >= 0"),
        (["segmenter", "train", "--workers", "0"], "workers must be >= 1"),
        (["translate", "--batch-size", "0"], "batch_size must be >= 1"),
        (["sweep", "--name", "../s"], "sweep name '../s'"),
        (["sweep", "--set", "seeds=[]"], "seeds must be"),
        (["sweep", "--set", "trials=[{name: a, set: {workers: 0}}]"], "trial a: workers must be >= 1"),
        (["sweep", "--set", "train.global_batch_size=3"], "does not divide over 2 workers"),
    ],
)
def test_print_config_refuses_what_the_job_would_refuse(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*args, "--print-config"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and message in err and len(err.strip().splitlines()) == 1, err


def test_model_uris_names_and_files_that_cannot_work_are_refused_naming_them(tmp_path: Path) -> None:
    from pipelines.quality.train_segmenter import SegmenterTrainConfig
    from pipelines.registry.models import load_model
    from pix2pix.inception import load_fid_inception

    for uri in ("model:/tiny/1", "models:tiny/1", "gs://bucket/ckpt.pt"):  # else a folder named so
        with pytest.raises(ConfigError, match=r"use models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID/"):
            load_model(uri)
    with pytest.raises(ConfigError, match=r"names a run, not its model: use runs:/0123abcd/generator"):
        load_model("runs:/0123abcd")
    # A file that is no checkpoint, or a truncated one, is named, not a KeyError traceback or a bare seek.
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    buffer = io.BytesIO()
    torch.save({"format_version": 1, "weights": torch.zeros(1000)}, buffer)
    (tmp_path / "cut.pt").write_bytes(buffer.getvalue()[:-400])
    for name in ("notes.pt", "cut.pt"):
        path = str(tmp_path / name)
        with pytest.raises(
            ValueError, match=rf"^{re.escape(path)}: not a pix2pix checkpoint, or a damaged one"
        ):
            load_model(path)
        with pytest.raises(
            ValueError, match=rf"^{re.escape(path)} is not a torch weights file, or a damaged"
        ):
            load_fid_inception(path)
    # Registered after training: a name MLflow (or models:/NAME@ALIAS) cannot take is refused before it.
    for name in ("team/edges2photo", "a:b", "x@champion", "it's"):
        cfg = load_config(TrainJobConfig, overrides=["data.manifest=x", f"mlflow.register_as={name}"])
        with pytest.raises(ConfigError, match=r"^mlflow.register_as .*: a registered model name cannot hold"):
            cfg.validate()
        segmenter = load_config(SegmenterTrainConfig, overrides=["data.manifest=x", f"register_as={name}"])
        with pytest.raises(ConfigError, match=r"^register_as .*: a registered model name cannot hold"):
            segmenter.validate()
    with pytest.raises(ConfigError, match=r"--candidate 'lastest': give a version number or 'latest'"):
        PromoteConfig("edges2photo", "lastest").validate()


def test_options_of_another_builder_are_refused_not_ignored() -> None:
    cfg = load_config(
        DatasetBuildConfig,
        overrides=["source.uri=a", "output=b", "source.layout=photos", "derive.builder=canny"],
    )
    cfg.validate()
    cfg.derive.palette, cfg.derive.ignore_id = "cityscapes", 0
    with pytest.raises(
        ValueError, match=r"derive.palette, derive.ignore_id apply to the labels builder only"
    ):
        cfg.validate()


def test_a_ray_address_where_nothing_listens_fails_before_ray_starts() -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as closed:  # a port nothing listens on once this socket is closed
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    # In its own process: this one may hold the test session's Ray cluster already.
    code = "from pipelines.runtime import init_ray; init_ray()"
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"ConnectionError: cannot reach the Ray cluster at RAY_ADDRESS=127.0.0.1:{port} (nothing"
    )
