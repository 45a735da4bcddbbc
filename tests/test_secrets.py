"""Secrets never reach params, run records or the console: URI credentials and secret-named variables."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from pipelines.config import from_dict
from pipelines.registry import tracking
from pipelines.registry.tracking import flatten_params
from pipelines.secrets import is_secret_name, redact, secret_values, split_uri_credentials


def test_uri_credentials_are_redacted() -> None:
    assert redact("https://alice:s3cr3t-pw@mlflow.example/api") == "https://***@mlflow.example/api"
    assert redact("postgresql://u:p@db:5432/mlflow") == "postgresql://***@db:5432/mlflow"
    assert redact("sqlite:////abs/runs/mlflow.db") == "sqlite:////abs/runs/mlflow.db"  # nothing to hide
    assert redact("s3://bucket/key@v2") == "s3://bucket/key@v2"  # an @ after the host is not a credential


def test_values_of_secret_named_variables_are_redacted_wherever_they_appear() -> None:
    environ = {
        "AWS_SECRET_ACCESS_KEY": "abcdef123456",
        "MLFLOW_TRACKING_TOKEN": "tok-998877",
        "HOME": "/root",
    }
    assert secret_values(environ) == {
        "AWS_SECRET_ACCESS_KEY": "abcdef123456",
        "MLFLOW_TRACKING_TOKEN": "tok-998877",
    }
    assert redact("--set x=abcdef123456 and tok-998877", environ) == "--set x=*** and ***"
    assert is_secret_name("MLFLOW_TRACKING_PASSWORD") and not is_secret_name("AWS_REGION")


def test_a_variable_removed_while_the_environment_is_read_is_no_error() -> None:
    """MLflow's telemetry thread removed its own variable from os.environ while `redact` read it: a
    KeyError at random in `p2p train`. Here a mapping whose name list still has a variable its lookup no
    longer finds, as the other thread leaves it between the two."""

    class Racing(Mapping[str, str]):  # like os.environ: iteration and lookup are separate steps
        names = ("GONE_TOKEN", "AWS_SECRET_ACCESS_KEY")

        def __iter__(self) -> Iterator[str]:
            return iter(self.names)

        def __len__(self) -> int:
            return len(self.names)

        def __getitem__(self, name: str) -> str:
            if name != "AWS_SECRET_ACCESS_KEY":
                raise KeyError(name)
            return "abcdef123456"

    environ = Racing()
    assert secret_values(environ) == {"AWS_SECRET_ACCESS_KEY": "abcdef123456"}
    # And that thread does not start: MLflow's telemetry is off unless the user turns it on.
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"


def test_params_logged_to_mlflow_are_redacted() -> None:
    params = flatten_params({"mlflow": {"tracking_uri": "https://bob:hunter22@host/"}, "storage": "s3://b/p"})
    assert params == {"mlflow.tracking_uri": "https://***@host/", "storage": "s3://b/p"}


SECRET_URI = "https://alice:s3cret@mlflow.example:5000/"
CREDENTIAL_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI")


@pytest.fixture
def clean_tracking_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MLflow credentials in the environment; whatever a test sets there is undone afterwards."""
    for name in CREDENTIAL_VARIABLES:
        monkeypatch.setenv(name, "")  # recorded, so that the teardown restores (or removes) it
        monkeypatch.delenv(name)


def serialised(config: dict[str, Any]) -> str:
    return json.dumps(config) + repr(config)


@pytest.mark.usefixtures("clean_tracking_env")
def test_training_workers_get_the_tracking_uri_without_its_credentials() -> None:
    """Ray may log train_loop_config: the password is not in it, it is in MLflow's own variables, which
    the driver sets before Ray starts (local workers inherit them) and MLflow reads on the workers."""
    from mlflow.utils.credentials import get_default_host_creds

    from pipelines.training.train import TrainJobConfig, worker_config

    cfg = from_dict(TrainJobConfig, {"data": {"manifest": "/ds"}, "mlflow": {"tracking_uri": SECRET_URI}})
    tracking.export_credentials(cfg.mlflow.tracking_uri)  # run_training does this before init_ray()
    config = worker_config(cfg, "run-1", "0123456789abcdef")

    assert "s3cret" not in serialised(config) and "alice" not in serialised(config)
    shipped = config["job"]["mlflow"]["tracking_uri"]
    assert shipped == "https://mlflow.example:5000/" and config["mlflow_run_id"] == "run-1"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == (
        "alice",
        "s3cret",
    )
    assert tracking.on_worker(shipped) == shipped
    creds = get_default_host_creds(shipped)  # what MLflow's REST client authenticates with
    assert (creds.username, creds.password) == ("alice", "s3cret")
    assert cfg.mlflow.tracking_uri == SECRET_URI  # the driver keeps using what it was given


@pytest.mark.usefixtures("clean_tracking_env")
def test_translate_and_segmenter_workers_get_no_credentials_either() -> None:
    from pipelines.inference.translate import TranslateConfig, actor_config
    from pipelines.quality.train_segmenter import SegmenterTrainConfig, worker_config

    tracking.export_credentials(SECRET_URI)
    translate = actor_config(TranslateConfig("models:/m@champion", "in", "out", tracking_uri=SECRET_URI))
    segmenter = worker_config(
        from_dict(SegmenterTrainConfig, {"data": {"manifest": "/ds"}, "tracking_uri": SECRET_URI}), {}, "r"
    )
    for config in (translate, segmenter):
        assert "s3cret" not in serialised(config), config
    assert translate["tracking_uri"] == segmenter["job"]["tracking_uri"] == "https://mlflow.example:5000/"


@pytest.mark.usefixtures("clean_tracking_env")
def test_a_database_uri_with_credentials_reaches_workers_through_the_environment() -> None:
    """MLflow has no password variable for a database store: the workers get the URI redacted and read it
    whole from $MLFLOW_TRACKING_URI, which the driver set; without it they fail saying what to set."""
    uri = "postgresql://bob:pg-s3cret@db:5432/mlflow"
    shipped = tracking.for_workers(uri)
    assert shipped == "postgresql://***@db:5432/mlflow"
    with pytest.raises(RuntimeError, match="set MLFLOW_TRACKING_URI with them"):
        tracking.on_worker(shipped)
    tracking.export_credentials(uri)
    assert os.environ["MLFLOW_TRACKING_URI"] == uri and tracking.on_worker(shipped) == uri
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ
    plain = "sqlite:////abs/runs/mlflow.db"  # nothing to move
    tracking.export_credentials(plain)
    assert tracking.for_workers(plain) == tracking.on_worker(plain) == plain
    assert os.environ["MLFLOW_TRACKING_URI"] == uri


def test_uri_credentials_are_split_off_and_url_decoded() -> None:
    assert split_uri_credentials("https://a:p%40ss@h:1/x?y=1") == ("https://h:1/x?y=1", "a", "p@ss")
    assert split_uri_credentials("postgresql://bob@db/m") == ("postgresql://db/m", "bob", None)
    assert split_uri_credentials("sqlite:////abs/m.db") == ("sqlite:////abs/m.db", "", None)
    assert redact("https://a:p@ss@h/x@y") == "https://***@h/x@y"  # an unescaped @ in the password
