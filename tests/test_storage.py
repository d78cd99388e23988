"""Results and checkpoints on storage (workers/core/storage.py): the URI handling, the check before Ray starts, and real
runs against a real S3 API server (moto's server mode on loopback, the bucket made with boto3): a quickstart run with
`--storage s3://...`, a `--resume-from s3://...` of it, and `analyze s3://...`."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pandas as pd
import pytest
import torch

from launcher.cli import main as cli_main
from tests.conftest import QUICKSTART, ROOT, private_token, quick_config, ray_processes_left, slowed
from workers.core.errors import ConfigError
from workers.core.storage import FolderMirror, check_location, is_remote, join, remote_of, staging_dir

BUCKET = "gossip-results"
CHECKPOINTS = [f"peer-{peer}_{kind}.pt" for peer in (0, 1) for kind in ("best", "final")]


# --- the URI handling, no I/O ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "location, remote",
    [("s3://bucket/runs", True), ("gs://bucket", True), ("results", False), ("/data/results", False),
     ("file:///data/results", False), ("~/results", False)],
)  # fmt: skip
def test_is_remote(location, remote):
    assert is_remote(location) is remote
    assert check_location(location) == location


@pytest.mark.parametrize(
    "location, error", [("ftp://host/x", "unknown scheme 'ftp'"), ("s3:///runs", "no bucket"), ("s3://", "no bucket")]
)
def test_check_location_refuses_unknown_schemes_and_missing_buckets(location, error):
    with pytest.raises(ValueError, match=error):
        check_location(location)


def test_join_appends_before_the_query():
    assert join("s3://b/runs", "r1", "metrics.csv") == "s3://b/runs/r1/metrics.csv"
    assert join("s3://b/runs/?endpoint_override=h%3A1", "r1") == "s3://b/runs/r1?endpoint_override=h%3A1"


def test_staging_mirrors_the_uri_and_a_run_folder_lands_at_the_same_place(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    staging = staging_dir("s3://b/runs")
    assert staging == tmp_path / "cache" / "gossip-launcher" / "staging" / "s3" / "b" / "runs"
    assert remote_of("s3://b/runs", staging / "sweep-1" / "run-1") == "s3://b/runs/sweep-1/run-1"
    assert remote_of("s3://b/runs", tmp_path / "elsewhere" / "run-1") == "s3://b/runs/run-1"
    assert remote_of("results", tmp_path / "run-1") is None, "local storage: nothing is copied"
    assert staging_dir("file://" + str(tmp_path)) == tmp_path


def test_config_names_storage_and_resume_from():
    assert quick_config("storage=s3://b/runs").storage == "s3://b/runs"
    assert quick_config("resume_from=s3://b/runs/r1").resume_from == "s3://b/runs/r1", "a URI keeps its //"
    with pytest.raises(ConfigError, match=r"storage='foo://b/x': unknown scheme"):
        quick_config("storage=foo://b/x")
    with pytest.raises(ConfigError, match=r"resume_from='s3:///r1': no bucket"):
        quick_config("resume_from=s3:///r1")


# --- a real S3 API server -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on a free loopback port with one bucket; its environment (endpoint and credentials)."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
    client.create_bucket(Bucket=BUCKET)
    yield env, client
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    env, client = s3_server
    for key, value in {**env, "XDG_CACHE_HOME": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(key, value)
    return client


def keys(client, prefix: str) -> set[str]:
    """The bucket's object names under `prefix`, relative to it."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {item["Key"][len(prefix) :] for page in pages for item in page.get("Contents", [])}


def read(client, key: str) -> bytes:
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


@pytest.mark.parametrize(
    "storage, error",
    [("s3://no-such-bucket/runs", "bucket 'no-such-bucket' does not exist at http://127.0.0.1:"),
     ("foo://bucket/runs", "storage='foo://bucket/runs': unknown scheme")],
)  # fmt: skip
def test_a_bad_storage_is_refused_before_ray_starts(storage, error, s3_env, tmp_path, capsys):
    code = cli_main(["run", str(QUICKSTART), "--peers", "2", "--storage", storage])
    assert code == 2
    message = capsys.readouterr().err
    assert error in message and "storage=" in message
    assert not (tmp_path / "cache").exists(), "nothing staged: the run never started"


def test_an_unreachable_endpoint_is_refused_naming_storage(s3_env, monkeypatch, capsys):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{dead}")
    assert cli_main(["run", str(QUICKSTART), "--peers", "2", "--storage", f"s3://{BUCKET}/runs"]) == 2
    assert f"storage='s3://{BUCKET}/runs': cannot be reached at http://127.0.0.1:{dead}" in capsys.readouterr().err


def test_the_mirror_uploads_what_changed_and_never_checkpoints(s3_env, tmp_path):
    local = tmp_path / "run-1"
    (local / "tensorboard").mkdir(parents=True)
    (local / "metrics.csv").write_text("epoch\n1\n")
    (local / "tensorboard" / "events.out").write_bytes(b"tb")
    (local / "peer-0_final.pt").write_bytes(b"weights")
    (local / ".metrics.csv.tmp").write_text("half")
    mirror = FolderMirror(local, f"s3://{BUCKET}/mirror/run-1", min_interval_s=3600)
    assert mirror.sync()
    assert keys(s3_env, "mirror/run-1/") == {"metrics.csv", "tensorboard/events.out"}
    s3_env.delete_object(Bucket=BUCKET, Key="mirror/run-1/tensorboard/events.out")
    (local / "metrics.csv").write_text("epoch\n1\n2\n")
    assert mirror.sync() and read(s3_env, "mirror/run-1/metrics.csv") == b"epoch\n1\n", "throttled: not yet"
    assert mirror.sync(force=True)
    assert read(s3_env, "mirror/run-1/metrics.csv") == b"epoch\n1\n2\n"
    assert keys(s3_env, "mirror/run-1/") == {"metrics.csv"}, "an unchanged file is not uploaded again"


def test_a_sweep_in_the_bucket_is_resumed_on_a_machine_without_its_staging_copy(s3_env, tmp_path):
    """`--resume` of a sweep whose results went to S3, from a machine (or a cleaned cache) with no local copy: the
    newest sweep folder in the bucket with the same spec is found, its result files (never checkpoints) fetched."""
    from launcher.sweep import runner as sweep_module
    from launcher.sweep.grammar import load_experiment
    from tests.test_sweep import write_sweep

    sweep = load_experiment(write_sweep(tmp_path, {"gossip.alpha": [0.25, 0.5]}), [f"storage=s3://{BUCKET}/sweeps"])
    staging = staging_dir(f"s3://{BUCKET}/sweeps")
    sweep_dir = sweep_module.make_sweep_dir(sweep, staging)
    row = sweep_module.index_row(sweep, sweep.points[0].config, 1, "run-1", 0, "done")
    sweep_module.append_index_row(sweep_dir / "sweep.csv", row)
    (sweep_dir / "run-1").mkdir()
    for name in ("config.yaml", "metrics.csv", "peer-0_final.pt"):
        (sweep_dir / "run-1" / name).write_text(name)
    assert FolderMirror(sweep_dir, remote_of(f"s3://{BUCKET}/sweeps", sweep_dir)).finish()
    shutil.rmtree(staging)  # another machine, or a cleaned cache
    found = sweep_module.resumable_sweep_dir(sweep, staging)
    assert found == sweep_dir and sweep_module.finished_points(found).keys() == {1}
    assert sorted(p.name for p in (found / "run-1").iterdir()) == ["config.yaml", "metrics.csv"]
    other = load_experiment(write_sweep(tmp_path, {"gossip.alpha": [0.1, 0.2]}), [f"storage=s3://{BUCKET}/sweeps"])
    with pytest.raises(ConfigError, match=f"under {staging} or s3://{BUCKET}/sweeps"):
        sweep_module.resumable_sweep_dir(other, staging)


# --- real runs --------------------------------------------------------------------------------------------------------


def launch(args: list[str], env: dict[str, str], timeout: float = 150) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "launcher", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def runs(s3_server, tmp_path_factory):
    """A 2-peer, 2-epoch quickstart run with --storage s3://BUCKET/runs, its staging folder then deleted, and a resume
    of it from the bucket to epoch 3; (first run id, resumed run id, the environment, the staging folder)."""
    env_s3, client = s3_server
    temp = tmp_path_factory.mktemp("storage")
    ray_tmp = tempfile.mkdtemp(prefix="glr_", dir="/tmp")  # short: Ray's socket paths below it have a length limit
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "AWS_"))}
    env.update(env_s3, RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0", XDG_CACHE_HOME=str(temp / "cache"),
               **private_token())  # fmt: skip
    common = ["--peers", "2", "--set", "gossip.matchmaking_time=1.5", "--set", "data.batch_size=8", "--set",
              "optim.lr=0.02", "--storage", f"s3://{BUCKET}/runs"]  # fmt: skip
    started = time.monotonic()
    # slowed: epochs of more than the mirror's 5 s, so that rows reach the bucket while the run trains
    first_run = subprocess.Popen([sys.executable, "-m", "launcher", "run", str(QUICKSTART), *common, "--set",
                                  "optim.epochs=2", "--set", f"scenario=[{slowed(2, 25)}]"], cwd=ROOT, env=env,
                                 stderr=subprocess.PIPE, text=True)  # fmt: skip
    seen = watch_bucket(client, first_run)  # rows and events in the bucket while the run trains
    assert first_run.wait(timeout=150) == 0, first_run.stderr.read()[-3000:]
    ended = time.monotonic()
    (first,) = {key.split("/")[0] for key in keys(client, "runs/")}
    staging = temp / "cache" / "gossip-launcher" / "staging" / "s3" / BUCKET / "runs"
    shutil.rmtree(staging / first)  # the resume must take the checkpoints from the bucket
    resume = ["--resume-from", f"s3://{BUCKET}/runs/{first}", "--set", "optim.epochs=3"]
    launch(["run", str(QUICKSTART), *common, *resume], env)
    (resumed,) = {key.split("/")[0] for key in keys(client, "runs/")} - {first}
    print(f"two runs on S3 storage: {time.monotonic() - started:.1f} s")
    yield first, resumed, env, staging, {name: ended - when for name, when in seen.items()}
    assert ray_processes_left(env) == [], "no process of the run's Ray is left"
    shutil.rmtree(ray_tmp, ignore_errors=True)


def watch_bucket(client, run: subprocess.Popen) -> dict[str, float]:
    """When (time.monotonic) metrics.csv first held a row, and events.csv an event, in the bucket, while `run` ran."""
    seen: dict[str, float] = {}
    while run.poll() is None and len(seen) < 2:
        for key in keys(client, "runs/"):
            name = key.split("/")[-1]
            if name in ("metrics.csv", "events.csv") and name not in seen:
                if len(read(client, f"runs/{key}").decode().splitlines()) >= 2:
                    seen[name] = time.monotonic()
        time.sleep(0.2)
    return seen


def metrics_of(client, run_id: str) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(read(client, f"runs/{run_id}/metrics.csv")))


def checkpoint_of(client, run_id: str, name: str) -> dict:
    return torch.load(io.BytesIO(read(client, f"runs/{run_id}/{name}")), weights_only=True)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_run_writes_its_files_and_every_peers_checkpoints_to_the_bucket(runs, s3_server):
    first, resumed, _, staging, _ = runs
    _, client = s3_server
    files = {"metrics.csv", "events.csv", "summary.csv", "config.yaml", *CHECKPOINTS}
    for run_id in (first, resumed):
        assert files <= keys(client, f"runs/{run_id}/"), f"{run_id}: {keys(client, f'runs/{run_id}/')}"
    metrics = metrics_of(client, first)
    assert sorted(metrics.groupby("peer").epoch.apply(list)) == [[1, 2], [1, 2]]
    assert f"storage: s3://{BUCKET}/runs" in read(client, f"runs/{first}/config.yaml").decode()
    for peer in (0, 1):
        final = checkpoint_of(client, first, f"peer-{peer}_final.pt")
        assert final["progress"]["epoch"] == 2 and final["run_id"] == first
    local = (staging / resumed / "metrics.csv").read_bytes()
    assert read(client, f"runs/{resumed}/metrics.csv") == local, "the bucket holds the rows as written locally"


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_resume_from_the_bucket_continues_the_run(runs, s3_server):
    first, resumed, _, _, _ = runs
    _, client = s3_server
    before, after = metrics_of(client, first), metrics_of(client, resumed)
    assert sorted(after.groupby("peer").epoch.apply(list)) == [[3], [3]], "epochs continue where the run stopped"
    last = before[before.epoch == 2].set_index("peer").sort_index()
    steps = last.step - before[before.epoch == 1].set_index("peer").sort_index().step
    continued = after.set_index("peer").sort_index()
    assert (continued.step == last.step + steps).all() and (continued.wall_time_s > last.wall_time_s).all()
    for peer in (0, 1):
        final = checkpoint_of(client, resumed, f"peer-{peer}_final.pt")
        assert final["progress"]["epoch"] == 3 and final["run_id"] == resumed


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_analyze_reads_runs_from_the_bucket(runs, s3_server):
    first, resumed, env, _, _ = runs
    _, client = s3_server
    proc = launch(["analyze", f"s3://{BUCKET}/runs"], env, timeout=60)
    assert first in proc.stdout and resumed in proc.stdout and "final_acc_mean" in proc.stdout
    assert f"wrote s3://{BUCKET}/runs/comparison.csv" in proc.stdout
    table = pd.read_csv(io.BytesIO(read(client, "runs/comparison.csv")))
    assert set(table.run_id) == {first, resumed}
    assert set(table.run_dir) == {f"s3://{BUCKET}/runs/{first}", f"s3://{BUCKET}/runs/{resumed}"}


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_rows_and_events_reach_the_bucket_while_the_run_trains(runs):
    """Not only at the end: a crash of the driver's machine loses at most the last few seconds (the mirror's
    interval, 5 s). The first run trains a few seconds (slowed); its first rows and events were in the bucket well
    before its end."""
    *_, before_end = runs
    assert before_end.keys() == {"metrics.csv", "events.csv"} and min(before_end.values()) > 2.0, before_end


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_uploads_that_keep_failing_end_the_run_with_exit_1_naming_what_is_missing(tmp_path):
    """The S3 server goes away while the run trains (a real server stopped): checkpoint uploads are retried and
    then given up, the run still finishes its epochs, and exits 1 naming the files missing in the storage."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)  # fmt: skip
    ray_tmp = tempfile.mkdtemp(prefix="glr_", dir="/tmp")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "AWS_"))}
    env.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_DEFAULT_REGION="us-east-1", RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0",
               XDG_CACHE_HOME=str(tmp_path / "cache"), **private_token())  # fmt: skip
    run = subprocess.Popen([sys.executable, "-m", "launcher", "run", str(QUICKSTART), "--peers", "2", "--set",
                            "optim.epochs=6", "--set", "data.batch_size=8", "--storage", f"s3://{BUCKET}/runs"],
                           cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        staging = tmp_path / "cache" / "gossip-launcher" / "staging" / "s3" / BUCKET / "runs"
        deadline = time.monotonic() + 120
        while not list(staging.glob("*/peer-*_final.pt")) and time.monotonic() < deadline:
            time.sleep(0.2)
        server.stop()  # after the first checkpoints: the later ones cannot be uploaded
        _, stderr = run.communicate(timeout=200)
    finally:
        if run.poll() is None:
            run.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert run.returncode == 1, stderr[-3000:]
    (run_dir,) = staging.iterdir()
    assert sorted(pd.read_csv(run_dir / "metrics.csv").groupby("peer").epoch.max()) == [6, 6], "training went on"
    assert f"missing in s3://{BUCKET}/runs/{run_dir.name} (their uploads failed): " in stderr
    assert "peer-0_final.pt" in stderr and "peer-1_final.pt" in stderr
