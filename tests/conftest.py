"""Shared fixtures: one real local Ray for the in-process integration tests, and a process census."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path

import psutil
import pytest

from workers.config import ExperimentConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "experiments" / "quickstart.yaml"
# Processes a run may start: Ray's daemons and workers, hivemind's p2pd.
RUN_PROCESS_MARKERS = ("p2pd", "raylet", "gcs_server", "ray::", "default_worker.py", "ray/_private", "dashboard")


def quick_config(*overrides: str) -> ExperimentConfig:
    """The quickstart experiment, shortened for tests."""
    return load_config(QUICKSTART, ["optim.epochs=3", "gossip.matchmaking_time=1.5", *overrides])


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture
def private_ray_env():
    """The environment for a CLI run in a subprocess that must get a Ray of its own, whatever this machine's Ray state:
    no RAY_* setting from outside (a RAY_ADDRESS of another cluster), a private Ray temp folder (so no
    `ray_current_cluster` file of an earlier `ray start` is found, and the run's session files stay apart), and a
    token of its own (Ray turns token auth on for a new local cluster and would otherwise write ~/.ray/auth_token)."""
    temp_dir = tempfile.mkdtemp(prefix="glr_", dir="/tmp")  # short: Ray's socket paths below it have a length limit
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(RAY_TMPDIR=temp_dir, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    env.update(RAY_USAGE_STATS_ENABLED="0")
    yield env
    shutil.rmtree(temp_dir, ignore_errors=True)


def run_processes(exclude: set[int] = frozenset()) -> list[str]:
    """Command lines of live Ray/p2pd processes not in `exclude`."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "name"]):
        if proc.info["pid"] in exclude or proc.info["pid"] == os.getpid():
            continue
        cmdline = " ".join(proc.info["cmdline"] or []) or (proc.info["name"] or "")
        if any(marker in cmdline for marker in RUN_PROCESS_MARKERS):
            found.append(f"{proc.info['pid']}: {cmdline[:120]}")
    return found
