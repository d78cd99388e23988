"""Connecting the driver to Ray: an explicit address, RAY_ADDRESS, a cluster that `ray start` left up on this
machine, or else a private local Ray for this run alone."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from launcher import DRIVER_ONLY_ENV
from launcher.driver.ray_tokens import dashboard_auth_mode, enable_token_auth, token_auth_warning
from workers.core.config import ExperimentConfig

logger = logging.getLogger("launcher")


def connect_ray(cfg: ExperimentConfig, address: str | None = None, num_cpus: float | None = None) -> bool:
    """Connect to the Ray cluster at `address` or RAY_ADDRESS, else to one started with `ray start` on this machine
    and still up, else start a private local one (with `num_cpus`, by default what `cfg`'s peers take). False when
    this process had Ray initialized already."""
    import ray

    if ray.is_initialized():
        return False
    quiet = dict(logging_level=logging.WARNING, log_to_driver=True)
    for key in DRIVER_ONLY_ENV:  # read when Ray was imported; not for the Ray processes started here
        os.environ.pop(key, None)
    address = cluster_to_join(address)
    if address:
        enable_token_auth(os.environ)
        context = ray.init(address=address, **quiet)
        nodes = len(alive_nodes())
        logger.info("connected to the Ray cluster at %s: %d nodes", address, nodes)
        warn_if_open(nodes, context.dashboard_url)
    else:  # "local": a new Ray just for this run, never another process's private one
        needed = math.ceil(num_cpus or (cfg.peers + cfg.joins) * cfg.resources.num_cpus)
        ray.init(address="local", num_cpus=max(needed, os.cpu_count() or 1), include_dashboard=False, **quiet)
    return True


def cluster_to_join(address: str | None) -> str | None:
    """The one decision of which Ray a run uses: the cluster at `address`, else at RAY_ADDRESS, else the one the last
    `ray start` on this machine joined if it is still up; None: a private local Ray, just for this run, which puts
    every peer on this machine ("local" asks for one whatever `ray start` left up)."""
    address = address or os.environ.get("RAY_ADDRESS") or started_cluster_address()
    return None if address in (None, "", "local") else address


def started_cluster_address() -> str | None:
    """The address of the cluster the last `ray start` on this machine joined, if its processes are still up."""
    from ray._private.services import find_gcs_addresses  # Ray's own record, read only: no Ray process is started
    from ray._private.utils import read_ray_address

    address = read_ray_address()
    if address and address not in find_gcs_addresses():
        logger.warning("ignoring the stale Ray address %s from the last `ray start` (that cluster is down)", address)
        return None
    return address


def warn_if_open(node_count: int, dashboard_url: str | None) -> None:
    """A loud warning when a cluster of several nodes lets anyone in (launcher/driver/ray_tokens.py)."""
    head_says = dashboard_auth_mode(dashboard_url) if dashboard_url and node_count > 1 else None
    token_file = (Path.home() / ".ray" / "auth_token").is_file()
    if warning := token_auth_warning(node_count, os.environ, token_file, head_says):
        logger.warning(warning)


def alive_nodes() -> list[dict]:
    import ray

    return [node for node in ray.nodes() if node["Alive"]]
