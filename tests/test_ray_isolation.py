"""The suite does not depend on this machine's Ray state: with someone else's `ray start --head` cluster running,
recorded as the one to join (`ray_current_cluster`, live or stale) and exported as RAY_ADDRESS, the tests' Ray (the
`ray_local` fixture's) and a CLI run in a subprocess (`private_ray_env`) each start a Ray of their own, and the
other cluster gets no job from them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from launcher.driver.ray_tokens import dashboard_auth_mode, token_auth_warning
from tests.cluster import LocalCluster, free_ports, local_cluster
from tests.conftest import QUICKSTART, ROOT, private_token, run_processes

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

# Runs in a subprocess, as the `ray_local` fixture does in the test process: prints the GCS address it got.
_FIXTURE_RAY = """
import json, ray
from tests.conftest import start_private_ray
start_private_ray(num_cpus=1)
session = ray._private.worker._global_node.get_session_dir_path()
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "session": session}))
ray.shutdown()
"""
# Lists a cluster's jobs straight from its GCS (a driver that connected to look would be a job itself).
_JOBS = """
import json, sys
from ray._raylet import GcsClient
print(json.dumps(sorted(job_id.hex() for job_id in GcsClient(address=sys.argv[1]).get_all_job_info(timeout=30))))
"""


@pytest.fixture(scope="module")
def unrelated_cluster() -> Iterator[LocalCluster]:
    """Someone else's `ray start --head` on this machine, as Ray makes it when no token is at hand: no token auth."""
    with local_cluster({}, head_cpus=2, dashboard=True, token_auth=False) as cluster:
        yield cluster


@contextmanager
def recorded_cluster(address: str) -> Iterator[Path]:
    """`address` in the file where `ray start` records the cluster that a bare `ray.init()` joins; the file as it
    was (or its absence) comes back afterwards, since other runs on this machine read it too."""
    from ray._common.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    saved = path.read_bytes() if path.exists() else None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(address)
    try:
        yield path
    finally:
        if saved is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(saved)


def jobs_of(cluster: LocalCluster) -> list[str]:
    result = subprocess.run([sys.executable, "-c", _JOBS, cluster.gcs_address], env=cluster.client_env(),
                            capture_output=True, text=True, timeout=90)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def dead_address() -> str:
    (port,) = free_ports(1)  # nothing listens there: the cluster that was recorded is gone
    return f"127.0.0.1:{port}"


@pytest.mark.parametrize("recorded", ["live", "stale"])
def test_the_fixtures_ray_is_its_own(unrelated_cluster, recorded, tmp_path):
    jobs_before = jobs_of(unrelated_cluster)
    address = unrelated_cluster.gcs_address if recorded == "live" else dead_address()
    # RAY_ADDRESS as a user of the other cluster exports it; a token as `ray_local` gives its Ray
    env = {**os.environ, "RAY_ADDRESS": address, "RAY_AUTH_TOKEN": private_token()["RAY_AUTH_TOKEN"]}
    with recorded_cluster(address):
        result = subprocess.run([sys.executable, "-c", _FIXTURE_RAY], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    started = json.loads(result.stdout.strip().splitlines()[-1])
    assert started["gcs"] not in (unrelated_cluster.gcs_address, address)
    assert not started["session"].startswith(str(unrelated_cluster.temp_dir))
    assert jobs_of(unrelated_cluster) == jobs_before, "no job on the other cluster"


@pytest.fixture
def exported_address(unrelated_cluster, monkeypatch) -> str:
    """RAY_ADDRESS of the other cluster in this process's environment, as its user would have exported it."""
    monkeypatch.setenv("RAY_ADDRESS", unrelated_cluster.gcs_address)
    return unrelated_cluster.gcs_address


# `exported_address` before `private_ray_env`: pytest sets up fixtures of one scope in the order they are requested
def test_a_cli_run_gets_a_ray_of_its_own(unrelated_cluster, exported_address, private_ray_env, tmp_path):
    jobs_before, before = jobs_of(unrelated_cluster), {int(line.split(":")[0]) for line in run_processes()}
    launch = [sys.executable, "-m", "launcher", "run", str(QUICKSTART), "--peers", "2", "--set", "optim.epochs=1",
              "--set", "gossip.method=none", "--out", str(tmp_path)]  # fmt: skip
    with recorded_cluster(unrelated_cluster.gcs_address):
        result = subprocess.run(launch, cwd=ROOT, env=private_ray_env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-5000:]
    (run_dir,) = tmp_path.iterdir()
    assert (run_dir / "metrics.csv").is_file()
    assert (Path(private_ray_env["RAY_TMPDIR"]) / "ray" / "session_latest").exists(), "the run's Ray lived there"
    assert jobs_of(unrelated_cluster) == jobs_before, "no job on the other cluster"
    leftover = [p for p in run_processes() if int(p.split(":")[0]) not in before]
    assert [p for p in leftover if str(unrelated_cluster.temp_dir) not in p] == []


def test_the_other_clusters_head_says_it_takes_anyone(unrelated_cluster):
    """The evidence `token_auth_warning` uses, read from a real head without token auth."""
    assert dashboard_auth_mode(unrelated_cluster.dashboard_url) == "disabled"
    head_says = dashboard_auth_mode(unrelated_cluster.dashboard_url)
    warning = token_auth_warning(2, {"RAY_AUTH_MODE": "token"}, token_file_exists=True, cluster_mode=head_says)
    assert warning is not None and "authentication_mode=disabled" in warning
