"""The pipeline around the `pix2pix` library: dataset build, training, tracking, evaluation, operations.

MLflow's usage telemetry is off unless the user turns it on (`MLFLOW_DISABLE_TELEMETRY=false`): a job
reaches only the stores it is given, and the telemetry thread, failing offline, removes its own variable
from os.environ while other threads read the environment (a KeyError at random in `secrets.redact`). Set
here, before any module of this package imports MLflow, in the driver and in every Ray worker alike.
"""

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
