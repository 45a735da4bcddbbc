"""The Ray cluster as every job sees it: connect once, count its GPUs, pick a worker's device.

Jobs connect to `RAY_ADDRESS` when it is set (a cluster, or `p2p submit`'s job driver), otherwise start or
join a local cluster. Ray's own progress and per-report chatter stays in its logs under
/tmp/ray/session_latest/logs; the jobs print their own one-line progress.
"""

from __future__ import annotations

import logging
import os


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
    if not ray.is_initialized():
        # Ray's own INFO lines (cluster start, executor plans) stay in its logs; warnings still show.
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True, logging_level=logging.WARNING)


def cluster_gpus() -> int:
    """GPUs the cluster has now (an autoscaling cluster's GPU nodes may still be at zero)."""
    import ray

    init_ray()
    return int(ray.cluster_resources().get("GPU", 0))


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
