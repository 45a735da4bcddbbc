"""The Ray cluster as every job sees it: connect once, count its GPUs, pick a worker's device, and a
TorchTrainer whose Ctrl-C the job can tell from a failure.

Jobs connect to `RAY_ADDRESS` when it is set (a cluster, or `p2p submit`'s job driver), otherwise start or
join a local cluster. Ray's own progress and per-report chatter stays in its logs under
/tmp/ray/session_latest/logs; the jobs print their own one-line progress.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import signal
import socket
import threading
from collections.abc import Iterator, Mapping
from typing import Any


def not_the_token_auth_default(record: logging.LogRecord) -> bool:
    """Ray warns at every local start that it turned token authentication on, its safe default: news to
    nobody running a job, and the first line of every command. Its warning that authentication is *off*
    still shows."""
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def init_ray() -> None:
    """Connect to (or start) the Ray cluster, once per process."""
    import ray

    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
        not_the_token_auth_default
    )
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    try:
        if address:
            probe(address)
        from pipelines import reaper

        own = not address or address == "local"  # a cluster of our own, most likely
        if own:  # it must not outlive us
            reaper.watch_this_process()
        # Ray's own INFO lines (cluster start, executor plans) stay in its logs; warnings still show.
        with reaper.tagging(), dashboard_ignores_sigint() if own else contextlib.nullcontext():
            ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
    except ConnectionError as exc:
        if not address:
            raise
        raise ConnectionError(
            f"cannot reach the Ray cluster at RAY_ADDRESS={address} ({exc}): check the address and that the "
            "cluster runs (ray status), or unset RAY_ADDRESS to run on this machine"
        ) from exc


class _SigintInChildren:
    """Whether a child forked now should ignore SIGINT (see `dashboard_ignores_sigint`)."""

    ignore = False

    @staticmethod
    @functools.cache  # once per process: fork hooks cannot be removed
    def register() -> None:
        os.register_at_fork(after_in_child=_SigintInChildren.after_fork)

    @staticmethod
    def after_fork() -> None:  # in the child, before its exec
        if _SigintInChildren.ignore:
            _SigintInChildren.ignore = False  # the child's own forks, should it not exec, are its business
            with contextlib.suppress(Exception):  # a hook's exception would only be printed
                signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def dashboard_ignores_sigint() -> Iterator[None]:
    """Within the block, the Ray dashboard that `ray.init` starts for a local cluster, and the processes
    it starts, ignore SIGINT.

    A terminal's Ctrl-C goes to its whole foreground process group, and a local Ray cluster's processes
    stay in the job's. Ray blocks SIGINT in them, but its dashboard's processes catch it and die: Ctrl-C
    of `p2p train` then took 12.6 s to exit (8 s of it in Ray Train's abort) and printed Ray's "Failed to
    query Ray Train Controller actor state"; with the SIGINT to the driver alone, 5.6 s. An ignored signal
    stays ignored across exec, so the dashboard is started ignoring it (Python starts it with a
    `preexec_fn`, which runs the fork hooks). Only the dashboard: the raylet's workers must keep Python's
    SIGINT handler, through which a non-forced `ray.cancel` (Ray Data's, when a job stops early)
    interrupts their tasks; and this process keeps its own handling, as ignoring SIGINT here would lose a
    Ctrl-C that the kernel hands to one of its other threads. `services.start_api_server` is Ray's private
    function (Ray is pinned): should it be renamed, nothing changes, which the suite would notice."""
    from ray._private import services

    start = getattr(services, "start_api_server", None)
    if start is None:
        yield
        return

    def start_ignoring_sigint(*args: Any, **kwargs: Any) -> Any:
        _SigintInChildren.ignore = True
        try:
            return start(*args, **kwargs)
        finally:
            _SigintInChildren.ignore = False

    _SigintInChildren.register()
    services.start_api_server = start_ignoring_sigint
    try:
        yield
    finally:
        services.start_api_server = start


def probe(address: str, timeout_s: float = 5.0) -> None:
    """A ConnectionError now if nothing listens at a `host:port` (or `ray://host:port`) address: `ray.init`
    would print a minute of its GCS client's retries before saying so. Other forms (auto, local) pass."""
    match = re.fullmatch(r"(?:ray://)?\[?([^\s/\]]+?)\]?:(\d+)", address.strip())
    if not match:
        return
    try:
        socket.create_connection((match[1], int(match[2])), timeout=timeout_s).close()
    except OSError as exc:
        raise ConnectionError(f"nothing answers at {match[1]}:{match[2]}: {exc.strerror or exc}") from None


@functools.cache  # a boot and a pid namespace last as long as the process (a fork keeps both)
def process_space() -> str:
    """Where a pid means one process: this kernel boot and pid namespace. Two containers can share a
    hostname (``--uts=host``) but not their pids; a lock's pid is checked only in its own space."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot_id:
            boot = boot_id.read().strip()
        return f"{boot}:{os.readlink('/proc/self/ns/pid')}"
    except OSError:  # not Linux: the hostname alone, as before
        return ""


def pid_checkable(host: str, space: str | None) -> bool:
    """Whether a pid recorded on ``host`` (in ``space``, if recorded) can be looked up from here."""
    import socket

    return host == socket.gethostname() and (not space or space == process_space())


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cluster_gpus() -> int:
    """GPUs the cluster has now (an autoscaling cluster's GPU nodes may still be at zero)."""
    import ray

    init_ray()
    return int(ray.cluster_resources().get("GPU", 0))


def check_cluster_fits(workers: int, cpus_per_worker: float, use_gpu: bool) -> None:
    """Ray Train waits without end for workers it cannot place (a startup-timeout traceback a minute, and the
    run never starts). So a request larger than the whole cluster is refused before the run is created,
    on a single machine reached without RAY_ADDRESS (a laptop, a dev box: it cannot grow). Through
    RAY_ADDRESS the cluster may have an autoscaler that adds nodes: there it is a note, and the run waits."""
    import ray

    from pipelines.config import ConfigError

    have = ray.cluster_resources()
    need = {"CPU": workers * cpus_per_worker, "GPU": float(workers if use_gpu else 0)}
    short = [
        f"{workers} workers need {need[kind]:g} {kind}s and the cluster has {have.get(kind, 0.0):g}"
        for kind in ("CPU", "GPU")
        if need[kind] > have.get(kind, 0.0) + 1e-9
    ]
    if not short:
        return
    fix = "lower --workers or cpus_per_worker (--set cpus_per_worker=0.5), or add nodes"
    if alive_nodes() == 1 and not os.environ.get("RAY_ADDRESS"):
        raise ConfigError(f"{'; '.join(short)}: {fix}")
    print(f"[train] note: {'; '.join(short)} now: waiting for nodes (an autoscaler?); else {fix}", flush=True)


def alive_nodes() -> int:
    """Nodes of the cluster alive now (a node that joins later is not counted)."""
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def node_id() -> str:
    """Inside a Ray task or actor: the id of the node it runs on ("" outside Ray), so a job can record where
    its work ran."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def actor_device() -> str:
    """Inside a Ray task or actor: "cuda" when Ray assigned it a GPU that torch can use, else "cpu"
    (also outside Ray, where nothing assigned one)."""
    import ray
    import torch

    assigned = ray.is_initialized() and bool(ray.get_gpu_ids())
    return "cuda" if assigned and torch.cuda.is_available() else "cpu"


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run; the message says how to continue it."""


STOP_GRACE_S = 10.0  # after Ctrl-C, how long Ray Train's graceful abort may take before it is forced


def interruptible_trainer(*args: Any, **kwargs: Any) -> Any:
    """A TorchTrainer whose Ctrl-C the driver can tell apart from a failure (its `interrupted` event).

    Ray Train V2's fit() installs its own SIGINT handler, a graceful abort of the run, after which fit()
    ends the process with SystemExit(1) and not a word: the user could not tell an interrupt from a crash,
    nor learn that the run can be resumed. This handler says what happens, notes it, and then lets Ray's
    abort the run. A run still waiting for workers it cannot place never gets to the abort (Ctrl-C seemed
    ignored there, in the QA pass): after STOP_GRACE_S its controller is killed, which ends fit() the same
    way. `_register_sigint_handler` is Ray's private hook: should a later Ray rename it, Ctrl-C keeps Ray's
    own behaviour and the run is marked failed, nothing worse."""
    import ray
    from ray.train.torch import TorchTrainer

    class InterruptibleTrainer(TorchTrainer):
        interrupted: threading.Event
        finished: threading.Event

        def fit(self) -> Any:
            previous = signal.getsignal(signal.SIGINT)
            try:
                return super().fit()
            finally:  # Ray's handler holds the finished run's controller: it does not outlive fit()
                self.finished.set()
                if threading.current_thread() is threading.main_thread():
                    signal.signal(signal.SIGINT, previous)

        def _register_sigint_handler(self, controller: Any) -> None:
            super()._register_sigint_handler(controller)  # type: ignore[misc]
            ray_handler = signal.getsignal(signal.SIGINT)

            def force_stop() -> None:
                if not self.finished.is_set():
                    print(
                        f"the workers did not stop within {STOP_GRACE_S:.0f} s: stopping the run", flush=True
                    )
                    ray.kill(controller)

            def on_sigint(signum: int, frame: Any) -> None:
                if not self.interrupted.is_set():
                    print("Ctrl-C: stopping the training workers", flush=True)
                    timer = threading.Timer(STOP_GRACE_S, force_stop)
                    timer.daemon = True
                    timer.start()
                self.interrupted.set()
                if callable(ray_handler):
                    ray_handler(signum, frame)

            signal.signal(signal.SIGINT, on_sigint)

    trainer = InterruptibleTrainer(*args, **kwargs)
    trainer.interrupted, trainer.finished = threading.Event(), threading.Event()
    return trainer


@contextlib.contextmanager
def environment(values: Mapping[str, str | None]) -> Iterator[None]:
    """These environment variables set (None: unset) for the block, and put back as they were after."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            _set_variable(name, value)
        yield
    finally:
        for name, value in saved.items():
            _set_variable(name, value)


def _set_variable(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
