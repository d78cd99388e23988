"""Connecting the driver to Ray: an explicit address, RAY_ADDRESS, a cluster that `ray start` left up on this
machine, or else a private local Ray for this run alone."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import MutableMapping
from pathlib import Path

import ray

from workers.config import ExperimentConfig

logger = logging.getLogger("launcher")


def connect_ray(cfg: ExperimentConfig, address: str | None = None) -> bool:
    """Connect to the Ray cluster at `address` or RAY_ADDRESS, else to one started with `ray start` on this machine
    and still up, else start a private local one. False when this process had Ray initialized already."""
    if ray.is_initialized():
        return False
    quiet = dict(logging_level=logging.WARNING, log_to_driver=True)
    address = address or os.environ.get("RAY_ADDRESS") or started_cluster_address()
    if address == "local":  # explicitly a private one, whatever `ray start` left on this machine
        address = None
    if address:
        enable_token_auth(os.environ)
        ray.init(address=address, **quiet)
        logger.info("connected to the Ray cluster at %s: %d nodes", address, len(alive_nodes()))
    else:  # "local": a new Ray just for this run, never another process's private one
        needed = math.ceil((cfg.peers + cfg.joins) * cfg.resources.num_cpus)
        ray.init(address="local", num_cpus=max(needed, os.cpu_count() or 1), include_dashboard=False, **quiet)
    return True


def started_cluster_address() -> str | None:
    """The address of the cluster the last `ray start` on this machine joined, if its processes are still up."""
    from ray._private.services import find_gcs_addresses
    from ray._private.utils import read_ray_address

    address = read_ray_address()
    if address and address not in find_gcs_addresses():
        logger.warning("ignoring the stale Ray address %s from the last `ray start` (that cluster is down)", address)
        return None
    return address


TOKEN_SOURCES = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")  # besides ~/.ray/auth_token


def enable_token_auth(env: MutableMapping[str, str]) -> None:
    """RAY_AUTH_MODE=token when a token is at hand and no mode is set. Ray turns token mode on by itself only for
    address "auto"; with RAY_ADDRESS (or an --address) set it does not, and an unauthenticated client retries
    forever against a cluster that requires the token."""
    has_token = any(env.get(name) for name in TOKEN_SOURCES) or (Path.home() / ".ray" / "auth_token").is_file()
    if "RAY_AUTH_MODE" not in env and has_token:
        env["RAY_AUTH_MODE"] = "token"


def alive_nodes() -> list[dict]:
    return [node for node in ray.nodes() if node["Alive"]]
