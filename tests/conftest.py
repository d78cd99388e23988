"""Shared fixtures: one real local Ray for the in-process integration tests, and a process census."""

from __future__ import annotations

import os
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
def torch_threads():
    """Peer sets torch's thread count for its process; give this process its own back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def dhts():
    """dhts(n): n hivemind DHTs on loopback in this process, the first one the others' bootstrap peer; all shut down
    afterwards. (Not `Peer.stop`, which also kills this process's other children, torch's shared-memory manager
    among them: fine in a peer's own process, fatal to the later tests of a pytest process.)"""
    import hivemind

    started = []

    def start(count: int) -> list:
        for _ in range(count):
            initial = started[0].get_visible_maddrs() if started else []
            started.append(hivemind.DHT(initial_peers=initial, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True))
        return started[-count:]

    yield start
    for dht in started:
        dht.shutdown()


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
