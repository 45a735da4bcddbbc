"""MLflow in one place: where the tracking store is, experiments, params and metrics, with secrets removed.

Every job that talks to MLflow goes through here, so the default store, the experiment set-up and the
redaction of credentials are the same for `train`, `evaluate` and `promote`:
- tracking URI: the job's explicit setting, else `$MLFLOW_TRACKING_URI`, else one local default for every
  verb, sqlite at an absolute path (`sqlite:////abs/runs/mlflow.db`), artifacts in `mlartifacts/` next to
  it; so a model that `p2p train` registered is found by `p2p evaluate`, `promote` and `translate`;
- experiments are created as model-training experiments, so the MLflow UI opens them on their runs and
  models (not on the GenAI traces view);
- params, tags and logged text pass through `pipelines.secrets.redact`;
- credentials never travel to Ray workers inside a job's config (Ray may log task arguments): the driver
  moves a URI's `user:password@` into MLflow's own `MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD`
  before Ray starts (`export_credentials`; local workers inherit the driver's environment, cluster nodes
  set their own), and workers get the URI without them (`for_workers`, read back with `on_worker`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import ConfigError
from pipelines.runtime import TrainingInterrupted
from pipelines.secrets import redact, split_uri_credentials

DEFAULT_STORE = "runs/mlflow.db"  # relative to the working directory
URI_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./runs/mlflow.db)"
# The MLflow UI shows an experiment as a model-training one (runs, models) rather than a GenAI one (traces)
# when it carries this tag.
EXPERIMENT_TYPE_TAG = ("mlflow.experimentKind", "custom_model_development")
# On a run a job keeps a record of on storage (a training run, a sweep's parent): that record's URI.
RECORD_TAG = "p2p.run_record"


def tracking_uri(explicit: str | None = "") -> str:
    """The tracking store: `explicit`, else $MLFLOW_TRACKING_URI, else sqlite at ./runs/mlflow.db. A
    relative sqlite path is made absolute (`absolute_sqlite`); a malformed one is refused (`check_uri`)."""
    if explicit:
        return check_reachable(absolute_sqlite(check_uri(explicit, "--tracking-uri")), "--tracking-uri")
    if os.environ.get("MLFLOW_TRACKING_URI"):
        uri = absolute_sqlite(check_uri(os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI"))
        return check_reachable(uri, "MLFLOW_TRACKING_URI")
    path = Path(DEFAULT_STORE).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"  # an absolute path: sqlite:////abs/...


def check_uri(uri: str, given_as: str) -> str:
    """A tracking URI that MLflow would misread, refused in one line with the intended form: `sqlite:/x.db`
    (one slash: SQLAlchemy's parse error, a traceback) and a bare `x.db` path (MLflow takes a plain path for
    its deprecated file store, and then says so about something else)."""
    shown = redact(uri)
    if uri.startswith("sqlite:") and not uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:").lstrip("/")
        raise ConfigError(
            f"{given_as} {shown}: write sqlite:////{path} for an absolute path (four slashes), or "
            f"sqlite:///{path} for one relative to this folder"
        )
    if "://" not in uri and uri.endswith((".db", ".sqlite", ".sqlite3")):
        raise ConfigError(f"{given_as} {shown}: a database file is given as sqlite:///{uri}")
    return uri


PROBE_TIMEOUT_S = 5.0


@functools.lru_cache(maxsize=16)
def check_reachable(uri: str, given_as: str) -> str:
    """An HTTP(S) tracking server that does not answer, refused in one line before any work: MLflow itself
    would retry each request with backoff for minutes, after Ray has started. One request to its health
    endpoint through MLflow's own client (its TLS and proxy settings apply; the URI's credentials are left
    out, MLflow's variables are not), once per process; any HTTP answer (even 401, or 404 behind a proxy)
    counts as reachable."""
    if not uri.startswith(("http://", "https://")):
        return uri
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    clean = split_uri_credentials(uri)[0].rstrip("/")
    try:
        http_request(
            get_default_host_creds(clean),
            "/health",
            "GET",
            max_retries=0,
            timeout=PROBE_TIMEOUT_S,
            raise_on_status=False,
            allow_redirects=False,
        )
    except Exception as exc:
        text = str(exc)
        if "SSL" in text or "certificate" in text:
            kind = (
                "TLS failed: set MLFLOW_TRACKING_SERVER_CERT_PATH to its CA bundle, or "
                "MLFLOW_TRACKING_INSECURE_TLS=true for a self-signed certificate"
            )
        elif "timed out" in text.lower() or "timeout" in text.lower():
            kind = f"no answer in {PROBE_TIMEOUT_S:g} s"
        else:
            kind = "connection failed"
        raise ConnectionError(
            f"cannot reach the MLflow tracking server {redact(uri)} (from {given_as}: {kind}): start it, or "
            "fix the address"
        ) from None
    return uri


def check_store_exists(uri: str) -> None:
    """For a job that reads a model from the registry or a run: a sqlite store that does not exist is a
    wrong path (another folder's ./runs/mlflow.db, a typo), not an empty registry; MLflow would create it
    and then say the model does not exist."""
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.exists():
            raise FileNotFoundError(
                f"no MLflow tracking store at {path}: give the one the model was logged to with "
                "--tracking-uri sqlite:////abs/path/mlflow.db, or set MLFLOW_TRACKING_URI (the default is "
                f"{DEFAULT_STORE} under the current folder)"
            )


def absolute_sqlite(uri: str) -> str:
    """``sqlite:///relative.db`` as ``sqlite:////abs/relative.db``: Ray Train and Tune run workers and
    trials in their own folders, where a relative database path names another, empty store."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and uri != prefix + ":memory:":
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


USERNAME_VARIABLE = "MLFLOW_TRACKING_USERNAME"
PASSWORD_VARIABLE = "MLFLOW_TRACKING_PASSWORD"


def _by_variables(uri: str) -> bool:
    """Whether MLflow can take this URI's credentials from its username/password variables: an HTTP(S)
    server with a user and a password. Others (a database's `user:password@`, a user alone) cannot."""
    _, user, password = split_uri_credentials(uri)
    return uri.startswith(("http://", "https://")) and bool(user) and bool(password)


def recorded_with_credentials(recorded: str, environ: Mapping[str, str] = os.environ) -> str:
    """The tracking URI to use again for one recorded redacted (`user:password@` as `***@`): itself if it
    had no credentials (through `tracking_uri`); $MLFLOW_TRACKING_URI when that is it with its credentials;
    for an HTTP(S) server, the URI without them when MLflow's username variable is set (it authenticates
    with its variables); else "" (the credentials must be given again)."""
    if "***@" not in recorded:
        return tracking_uri(recorded)
    from_environment = environ.get("MLFLOW_TRACKING_URI", "")
    if from_environment and redact(from_environment, environ={}) == recorded:
        return from_environment
    clean = recorded.replace("://***@", "://", 1)
    if clean.startswith(("http://", "https://")) and environ.get(USERNAME_VARIABLE):
        return clean
    return ""


def export_credentials(uri: str, environ: MutableMapping[str, str] = os.environ) -> None:
    """On the driver, before Ray starts: make the credentials of tracking URI `uri` available to workers
    through the environment rather than through their config. An HTTP(S) URI's user and password go into
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (the URI's win over values already there: it was
    the explicit setting); any other URI with credentials becomes $MLFLOW_TRACKING_URI. Local Ray workers
    inherit the driver's environment; on a cluster, the nodes need these variables themselves."""
    clean, user, password = split_uri_credentials(uri)
    if clean == uri:
        return
    if _by_variables(uri):
        environ[USERNAME_VARIABLE], environ[PASSWORD_VARIABLE] = user, password or ""
    else:
        environ["MLFLOW_TRACKING_URI"] = uri


def for_workers(uri: str) -> str:
    """The tracking URI to hand to Ray workers (train_loop_config, actor or task arguments): never with
    credentials. An HTTP(S) URI loses its `user:password@` (MLflow takes them from its variables, see
    `export_credentials`); another URI with credentials is sent redacted and `on_worker` reads it back from
    $MLFLOW_TRACKING_URI."""
    if _by_variables(uri):
        return split_uri_credentials(uri)[0]
    return redact(uri, environ={})


def on_worker(uri: str, environ: Mapping[str, str] = os.environ) -> str:
    """In a Ray worker: the tracking URI to use for what `for_workers` sent."""
    if "***@" not in uri:
        return uri
    full = environ.get("MLFLOW_TRACKING_URI", "")
    if full and redact(full, environ={}) == uri:
        return full
    raise RuntimeError(
        f"the tracking URI {uri} carries credentials, which are not sent to Ray workers: set "
        "MLFLOW_TRACKING_URI with them in the environment of every node (or use an HTTP(S) server with "
        "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)"
    )


def client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(uri)


def experiment_id(mlflow_client: Any, name: str, uri: str) -> str:
    """The id of experiment `name`, created (as a model-training experiment) if it does not exist."""
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    location = None
    if uri.startswith("sqlite:///"):  # artifacts beside the database, not in the cwd
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    key, value = EXPERIMENT_TYPE_TAG
    return str(mlflow_client.create_experiment(name, artifact_location=location, tags={key: value}))


def flatten_params(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → {"section.option": "value"}, redacted and cut to MLflow's value limit."""
    out: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_params(value, f"{name}."))
        else:
            out[name] = redact(str(value))[:6000]
    return out


def log_params(mlflow_client: Any, run_id: str, values: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in sorted(flatten_params(values).items())]
    for i in range(0, len(items), 100):  # MLflow's batch limit
        mlflow_client.log_batch(run_id, params=items[i : i + 100])


def log_bytes(mlflow_client: Any, run_id: str, folder: str, name: str, data: bytes) -> None:
    """`data` as the artifact `folder/name` of the run (MLflow logs files, so through a temporary one)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        mlflow_client.log_artifact(run_id, str(path), artifact_path=folder)


def metric_list(values: dict[str, float], step: int) -> list[Any]:
    """MLflow metrics at `step`; non-finite values are left out (MLflow rejects NaN in some stores)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in values.items() if np.isfinite(v)]


def last_logged_steps(mlflow_client: Any, run_id: str) -> dict[str, int]:
    """The highest step logged so far for each metric of the run: a restarted training attempt logs only
    later steps, so every (metric, step) is logged once even when an attempt repeats the steps between its
    checkpoint and the failure."""
    keys = mlflow_client.get_run(run_id).data.metrics
    return {k: max(m.step for m in mlflow_client.get_metric_history(run_id, k)) for k in keys}


def log_dataset_input(
    mlflow_client: Any, run_id: str, uri: str, name: str, digest: str, context: str = "training"
) -> None:
    """Record the dataset as the run's MLflow dataset input (the UI's "Datasets" column): where it is
    (redacted), its build id as digest, and what the run used it for."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    with warnings.catch_warnings():  # MLflow warns that the source type was guessed from the URI
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(redact(uri))
    dataset = MetaDataset(source, name=name, digest=digest)  # type: ignore[abstract]  # stubs lag the class
    tags = [InputTag("mlflow.data.context", context)]
    mlflow_client.log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(), tags=tags)])


@contextlib.contextmanager
def ended_if_raised(client: Any, run_id: str) -> Iterator[None]:
    """Around the logging into a run just created: an error (a lost connection, a full artifact store) or
    Ctrl-C ends it FAILED or KILLED instead of leaving it RUNNING for ever; the error propagates."""
    try:
        yield
    except BaseException as exc:
        with contextlib.suppress(Exception):  # the store may be what failed: the first error is the news
            client.set_terminated(run_id, status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise


@contextlib.contextmanager
def failed_or_killed(client: Any, run_id: str, interrupted: threading.Event, stopped: str) -> Iterator[None]:
    """Around a training job's fit and model logging: on an exception the MLflow run is marked KILLED when
    Ctrl-C stopped it (`interrupted`, set by `pipelines.runtime.interruptible_trainer`), and
    TrainingInterrupted(`stopped`) replaces Ray's bare SystemExit; FAILED otherwise, the error kept."""
    try:
        yield
    except BaseException:
        if not interrupted.is_set():
            client.set_terminated(run_id, status="FAILED")
            raise
        client.set_terminated(run_id, status="KILLED")
        raise TrainingInterrupted(stopped) from None


def end_orphans(client: Any, exp_id: str, run_name: str, record_uri: str, run_id: str, label: str) -> None:
    """End, as KILLED, the MLflow runs named `run_name` still RUNNING that were created for the record at
    `record_uri` (tag `RECORD_TAG`) but are not the run it names (`run_id`): starts killed between creating
    their run and writing the record, or a run whose folder was removed by hand. None of them can ever be
    resumed, and left RUNNING they would look alive in the MLflow UI for ever. Called once the record names
    `run_id`, so a start still racing for the name (it will lose) cannot be mistaken for a live run.
    Housekeeping: a failure is reported, and the job goes on."""
    try:
        runs = client.search_runs(
            [exp_id],  # run names are letters, digits, '.', '_' and '-': safe inside the quotes
            filter_string=f"attributes.run_name = '{run_name}' and attributes.status = 'RUNNING'",
            max_results=1000,
        )
        for orphan in runs:
            if orphan.info.run_id == run_id or orphan.data.tags.get(RECORD_TAG) != record_uri:
                continue
            client.set_tag(
                orphan.info.run_id, "p2p.orphaned", f"record {record_uri} names MLflow run {run_id}"
            )
            client.set_terminated(orphan.info.run_id, status="KILLED")
            print(
                f"{label} MLflow run {orphan.info.run_id} was left RUNNING by an earlier start of "
                f"{run_name!r} that never wrote its record: ended as KILLED",
                flush=True,
            )
    except Exception as exc:
        print(f"{label} could not look for orphaned MLflow runs of {run_name!r}: {exc}", file=sys.stderr)
