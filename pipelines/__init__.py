"""The pipeline around the `pix2pix` library: dataset build, training, tracking, evaluation, operations.

Set here, before any module of this package imports MLflow or Ray, in the driver and in every Ray worker
alike (a user's own setting wins):
- MLflow's usage telemetry is off unless the user turns it on (`MLFLOW_DISABLE_TELEMETRY=false`): a job
  reaches only the stores it is given, and the telemetry thread, failing offline, removes its own variable
  from os.environ while other threads read the environment (a KeyError at random in `secrets.redact`).
- Ray's driver never merges the storage's stall lines (`storage.slow_notice`) of several workers: it
  takes lines that differ only in their numbers for repeats and holds them back, so a second worker's
  "still running" line came after the job's summary.
- Ray's note that an actor "has constructor arguments in the object store and max_restarts > 0" is not
  forwarded to the console from workers: Ray Train's own PreemptionWatcher printed it at the start of every
  `p2p train` (ray-project/ray#53727), about nothing the job can change. It stays in Ray's logs.
"""

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", r"\[s3\] ")
os.environ.setdefault(
    "RAY_DEDUP_LOGS_SKIP_REGEX", r"has constructor arguments in the object store and max_restarts > 0"
)
