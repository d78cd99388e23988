"""Shared fixtures: one real local Ray for the in-process integration tests, and a process census."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path

import psutil
import pytest

from workers.core.config import ExperimentConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "experiments" / "quickstart.yaml"
# Processes a run may start: Ray's daemons and workers, hivemind's p2pd.
RUN_PROCESS_MARKERS = ("p2pd", "raylet", "gcs_server", "ray::", "default_worker.py", "ray/_private", "dashboard")


def quick_config(*overrides: str) -> ExperimentConfig:
    """The quickstart experiment, shortened for tests."""
    return load_config(QUICKSTART, ["optim.epochs=3", "gossip.matchmaking_time=1.5", *overrides])


def slowed(peers: int, factor: float) -> str:
    """Scenario events that make each of peers 0..peers-1 take `factor` times as long per step: a run that must last
    long enough for something (a restart, a kill, an upload, progress lines) to land before it ends."""
    return ", ".join(f"{{peer: {peer}, event: slow, factor: {factor}}}" for peer in range(peers))


@pytest.fixture(scope="session")
def ray_local():
    mode = os.environ.get("RAY_AUTH_MODE")
    with pytest.MonkeyPatch.context() as patch:  # the environment as it was for whatever runs after this Ray
        patch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
        ray = start_private_ray(num_cpus=4)
        yield ray
        ray.shutdown()
    if mode is None:
        os.environ.pop("RAY_AUTH_MODE", None)  # Ray set it to "token" for the cluster it started


@pytest.fixture(scope="session")
def none_ten_epochs(ray_local, tmp_path_factory):
    """The metrics of the quickstart as shipped (10 epochs) without communication: the baseline that the methods'
    consensus is held against (one run for every module that needs it)."""
    from launcher.driver.controller import run_experiment
    from launcher.results.summary import read_metrics

    result = run_experiment(quick_config("optim.epochs=10", "gossip.method=none"), tmp_path_factory.mktemp("none"))
    assert result.exit_code == 0
    return read_metrics(result.run_dir)


def start_private_ray(num_cpus: int):
    """A new local Ray for this process alone, whatever this machine's Ray state: address "local" joins no cluster
    (not RAY_ADDRESS's, not the one an earlier `ray start` recorded in ray_current_cluster, live or stale).
    With RAY_AUTH_MODE unset Ray 2.60 turns token auth on for it, with the token in RAY_AUTH_TOKEN if there is one,
    else with one it writes to ~/.ray/auth_token (which later `ray start`s on this machine would pick up)."""
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING")
    return ray


def private_token() -> dict[str, str]:
    """Token auth with a token of its own, for the environment of a subprocess that starts a new Ray (see
    `start_private_ray`; set before the process starts, RAY_AUTH_MODE=token also spares Ray's warning about it)."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


@pytest.fixture
def private_ray_env():
    """The environment for a CLI run in a subprocess that must get a Ray of its own, whatever this machine's Ray state:
    no RAY_* setting from outside (a RAY_ADDRESS of another cluster), a private Ray temp folder (so no
    `ray_current_cluster` file of an earlier `ray start` is found, and the run's session files stay apart), and a
    token of its own (Ray turns token auth on for a new local cluster and would otherwise write ~/.ray/auth_token)."""
    temp_dir = tempfile.mkdtemp(prefix="glr_", dir="/tmp")  # short: Ray's socket paths below it have a length limit
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(RAY_TMPDIR=temp_dir, RAY_USAGE_STATS_ENABLED="0", **private_token())
    yield env
    shutil.rmtree(temp_dir, ignore_errors=True)


def ray_started(env: dict[str, str]) -> list[str]:
    """What a CLI run under `env` (a `private_ray_env`) started of Ray: its session folders, and the live processes
    that inherited its private temp folder. Unlike a census of the machine, blind to other users' Ray runs."""
    temp_dir = env["RAY_TMPDIR"]
    return [str(path) for path in Path(temp_dir).glob("ray/session_*")] + ray_processes_left(env)


def ray_processes_left(env: dict[str, str]) -> list[str]:
    """The live processes of the Ray that a CLI run under `env` started ("pid: command line"): none may outlive it."""
    temp_dir, found = env["RAY_TMPDIR"], []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.environ().get("RAY_TMPDIR") == temp_dir or temp_dir in " ".join(proc.info["cmdline"] or []):
                found.append(f"{proc.pid}: {' '.join(proc.info['cmdline'] or [])[:120]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


@pytest.fixture
def torch_threads():
    """Peer sets torch's thread count for its process; give this process its own back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def dhts():
    """dhts(n): n hivemind DHTs on loopback in this process, started as a peer starts its own, the first one the
    others' bootstrap peer; all shut down afterwards. (Not `Peer.stop`, which also kills this process's other
    children, torch's shared-memory manager among them: fine in a peer's own process, fatal to the later tests of a
    pytest process.)"""
    from workers.averaging.levers import Levers, start_dht

    started = []

    def start(count: int, levers: Levers | None = None, swarm_size: int | None = None) -> list:
        """`levers`: whose DHT options (default: a peer's, caching off and p2pd on one thread); `swarm_size`: the
        swarm a peer would size its DHT's replication for (default: hivemind's)."""
        for _ in range(count):
            initial = started[0].get_visible_maddrs() if started else []
            started.append(start_dht(levers or Levers(), swarm_size, initial_peers=initial,
                                     host_maddrs=["/ip4/127.0.0.1/tcp/0"]))  # fmt: skip
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
