"""A real multi-node Ray cluster on this machine (`ray start` head + 2 worker nodes, token authentication on):
the driver connects by address or runs as a `ray job submit` job, peers are pinned to nodes, and they average
across nodes."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from launcher.driver.ray_tokens import dashboard_auth_mode, token_auth_warning
from launcher.results.summary import read_metrics
from tests.cluster import BIN_DIR, LocalCluster, cluster_processes, kill_all, local_cluster, ray_free_environ
from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(600)

WORKERS = {"node_a": {"node_a": 4.0}, "node_b": {"node_b": 4.0}}  # worker node name -> its custom resource
EPOCHS = 3
SHORT_RUN = ["--set", f"optim.epochs={EPOCHS}", "--set", "gossip.matchmaking_time=1.5", "--set", "resources.num_cpus=1"]
RUN = [str(BIN_DIR / "gossip-launch"), "run", "configs/experiments/quickstart.yaml", "--peers", "2", *SHORT_RUN]
UPLOAD_EXCLUDES = [".venv", "results", "data", ".git", "*.egg-info"]  # .gitignore'd too; Ray honours both


@pytest.fixture(scope="module")
def cluster():
    """Head (1 CPU, the dashboard for `ray job`) + node_a + node_b (2 CPUs each); on exit nothing of it may be left:
    local_cluster raises LeftoverProcesses (a teardown error) if a process of the cluster survives SIGKILL."""
    with local_cluster(WORKERS, head_cpus=1, worker_cpus=2, dashboard=True) as running:
        yield running
    assert running.processes() == []
    assert not running.temp_dir.exists()


def run(command: list[str], env: dict, timeout: float = 240) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return result, time.monotonic() - started


def output(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}"


def the_run_dir(out: Path) -> Path:
    runs = [path for path in out.iterdir() if (path / "config.yaml").exists()]
    assert len(runs) == 1, f"expected one run folder in {out}: {list(out.iterdir())}"
    return runs[0]


def assert_averaged_across_peers(run_dir: Path, peers: int) -> None:
    for name in ["metrics.csv", "summary.csv", "config.yaml", *(f"peer-{i}_final.pt" for i in range(peers))]:
        assert (run_dir / name).is_file(), f"{name} missing in {run_dir}: {sorted(p.name for p in run_dir.iterdir())}"
    metrics = read_metrics(run_dir)
    assert sorted(metrics.groupby("peer")["epoch"].apply(list)) == [list(range(1, EPOCHS + 1))] * peers
    assert (metrics.groupby("peer")["averaging_rounds_ok"].max() > 0).all(), "every peer averaged at least once"
    group_sizes = metrics.averaging_group_size.dropna()
    assert len(group_sizes) > 0 and (group_sizes == peers).all(), "every round was a group of all the peers"
    assert (metrics.consensus_peers == peers).all()
    # a full-group round right before evaluation leaves the peers equal; one round may fail or lose a part under
    # load (hivemind counts the latter as a success), so most epochs, not every one, must show it
    per_epoch = metrics.groupby("epoch").consensus_dist.first()
    assert (per_epoch < 1e-3).sum() >= EPOCHS - 1, per_epoch.to_dict()


def peer_processes_left(cluster: LocalCluster, wait: float = 10.0) -> list[str]:
    """hivemind's p2pd daemons of the cluster still running `wait` seconds after the driver exited."""
    deadline = time.monotonic() + wait
    while (left := [p.pid for p in cluster.processes() if name_of(p) == "p2pd"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    return [f"{pid} p2pd" for pid in left]


def name_of(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.NoSuchProcess:
        return ""


@pytest.mark.integration
def test_the_cluster_has_its_nodes_and_refuses_clients_without_the_token(cluster: LocalCluster, tmp_path):
    # ray.nodes() from a driver connected by address: the head and each worker with its own custom resource
    assert set(cluster.node_ids) == {"head", *WORKERS} and len(set(cluster.node_ids.values())) == 3
    no_token = cluster.outsider_env(home=tmp_path)
    wrong_token = cluster.outsider_env(home=tmp_path, token="0" * 64)
    ray = str(BIN_DIR / "ray")

    status, _ = run([ray, "status", "--address", cluster.gcs_address], cluster.client_env(), timeout=60)
    assert status.returncode == 0, output(status)  # (its node list is the autoscaler's, which lags a few seconds)
    refused, _ = run([ray, "status", "--address", cluster.gcs_address], no_token, timeout=60)  # gRPC to the GCS
    assert refused.returncode != 0 and "InvalidAuthToken" in refused.stdout + refused.stderr, output(refused)

    jobs, _ = run([ray, "job", "list", "--address", cluster.dashboard_url], cluster.client_env(), timeout=60)
    assert jobs.returncode == 0, output(jobs)
    missing, _ = run([ray, "job", "list", "--address", cluster.dashboard_url], no_token, timeout=60)  # HTTP 401
    assert missing.returncode != 0 and "Missing authentication token" in missing.stderr, output(missing)
    wrong, _ = run([ray, "job", "list", "--address", cluster.dashboard_url], wrong_token, timeout=60)  # HTTP 403
    assert wrong.returncode != 0 and "Invalid authentication token" in wrong.stderr, output(wrong)


@pytest.mark.integration
def test_the_head_tells_a_driver_that_the_cluster_requires_a_token(cluster: LocalCluster):
    """What a driver in token mode cannot see by itself (a cluster without token auth would let it in too)."""
    assert dashboard_auth_mode(cluster.dashboard_url) == "token"
    assert token_auth_warning(3, {}, False, cluster_mode=dashboard_auth_mode(cluster.dashboard_url)) is None


@pytest.mark.integration
def test_peers_pinned_to_two_worker_nodes_bootstrap_and_average_across_them(cluster: LocalCluster, tmp_path):
    placement = ["--set", "resources.peer_custom=[{node_a: 1}, {node_b: 1}]", "--address", cluster.gcs_address]
    result, seconds = run([*RUN, *placement, "--out", str(tmp_path)], cluster.client_env())
    assert result.returncode == 0, output(result)
    run_dir = the_run_dir(tmp_path)
    assert_averaged_across_peers(run_dir, peers=2)
    metrics = read_metrics(run_dir)
    nodes = metrics.groupby("peer")["node_id"].unique()
    assert nodes.map(list).to_dict() == {0: [cluster.node_ids["node_a"]], 1: [cluster.node_ids["node_b"]]}
    assert peer_processes_left(cluster) == [], "the run left hivemind processes behind on the worker nodes"
    print(f"2 peers on 2 worker nodes: {seconds:.0f} s")


@pytest.mark.integration
@pytest.mark.parametrize(
    "setting, named",
    [("resources.num_gpus=1", "GPU"), ("resources.peer_custom=[{node_a: 1}, {node_c: 1}]", "node_c")],
    ids=["gpu-on-a-cpu-cluster", "a-resource-no-node-has"],
)
def test_a_request_the_cluster_can_never_satisfy_fails_fast_naming_the_resource(
    cluster: LocalCluster, tmp_path, setting, named
):
    result, seconds = run([*RUN, "--set", setting, "--address", cluster.gcs_address, "--out", str(tmp_path)],
                          cluster.client_env(), timeout=120)  # fmt: skip
    assert result.returncode not in (0, 2), output(result)  # 2 would be a config error, before Ray
    assert named in result.stdout + result.stderr, output(result)
    assert seconds < 30, f"took {seconds:.0f} s to fail"  # not resources.placement_timeout (120 s)
    rows = [line for path in tmp_path.rglob("metrics.csv") for line in path.read_text().splitlines()[1:]]
    assert rows == [], "no peer should have trained"


@pytest.mark.integration
def test_ray_job_submit_runs_an_experiment_end_to_end(cluster: LocalCluster, tmp_path):
    submission_id = f"gossip-test-{secrets.token_hex(4)}"
    command = [
        str(BIN_DIR / "ray"), "job", "submit", "--address", cluster.dashboard_url, "--submission-id", submission_id,
        "--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"excludes": UPLOAD_EXCLUDES}),
        "--", "gossip-launch", *RUN[1:], "--out", str(tmp_path),  # found on the head node's PATH: this venv's bin
    ]  # fmt: skip
    result, seconds = run(command, cluster.client_env())
    assert result.returncode == 0, output(result)
    assert f"Job '{submission_id}' succeeded" in result.stdout + result.stderr, output(result)
    run_dir = the_run_dir(tmp_path)
    assert_averaged_across_peers(run_dir, peers=2)
    assert read_metrics(run_dir).node_id.isin(cluster.node_ids.values()).all()
    assert peer_processes_left(cluster) == [], "the job left hivemind processes behind"
    print(f"ray job submit, 2 peers: {seconds:.0f} s")


def test_teardown_finds_the_clusters_orphans_and_only_them(tmp_path):
    mine, other = (f"glc_{secrets.token_hex(3)}" for _ in range(2))
    for marker in (mine, other):  # the shell exits at once: its `sleep` is re-parented, as p2pd is when a peer dies
        subprocess.run(["sh", "-c", "sleep 120 >/dev/null 2>&1 &"], env=ray_free_environ(marker), check=True)
    found, others = cluster_processes(mine, tmp_path), cluster_processes(other, tmp_path)
    try:
        assert [p.name() for p in found] == ["sleep"] and found[0].ppid() != os.getpid()
        assert kill_all(found) == [] and cluster_processes(mine, tmp_path) == []
        assert len(cluster_processes(other, tmp_path)) == 1, "another cluster's processes are left alone"
    finally:
        kill_all(others)
