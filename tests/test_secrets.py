"""Secrets never reach params, run records or the console: URI credentials and secret-named variables."""

from __future__ import annotations

from pipelines.registry.tracking import flatten_params
from pipelines.secrets import is_secret_name, redact, secret_values


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


def test_params_logged_to_mlflow_are_redacted() -> None:
    params = flatten_params({"mlflow": {"tracking_uri": "https://bob:hunter22@host/"}, "storage": "s3://b/p"})
    assert params == {"mlflow.tracking_uri": "https://***@host/", "storage": "s3://b/p"}
