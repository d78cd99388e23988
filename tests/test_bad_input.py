"""Bad input gets a clear error and loses nothing: the rows of the README's "What happens when" table, each with the
real fault (a cut checkpoint file, a pickle that runs code, a bound port, a full disk), through the real CLI where
the CLI is the one that must catch it."""

from __future__ import annotations

import errno
import logging
import os
import pickle
import shutil
import socket
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
import torch

from tests.cluster import free_port_range
from tests.conftest import QUICKSTART, ROOT, quick_config, ray_started
from workers.averaging.base import NoAveraging
from workers.core.config import NetworkConfig
from workers.core.csvfile import MetricsWriteError
from workers.core.metrics import MetricsRow
from workers.core.network import LOOPBACK, PortInUseError, check_ports_free, dht_maddrs, naming_taken_port
from workers.core.reporting import RowWriter
from workers.peer.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    check_resume,
    checkpoint_path,
    load_checkpoint,
)

LAUNCH = [sys.executable, "-m", "launcher", "run", str(QUICKSTART)]


def launch(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, as a user runs it; `env`: `private_ray_env`, so a run that gets past the check
    (a regression) starts a Ray of its own instead of joining one of this machine's."""
    return subprocess.run([*LAUNCH, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


# --- checkpoints given to --resume-from ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """peer-0_final.pt and peer-1_final.pt of a 2-peer, 1-epoch run, written by the peers' own checkpoint code."""
    from workers.peer.peer import Peer
    from workers.peer.train import train

    folder, threads = tmp_path_factory.mktemp("finished"), torch.get_num_threads()
    cfg = quick_config("peers=2", "gossip.method=none", "optim.epochs=1")
    for peer_index in range(2):
        peer = Peer(cfg, peer_index, "finished", checkpoint_dir=folder)
        list(train(peer.setup, NoAveraging(), threading.Event()))
    torch.set_num_threads(threads)  # Peer sets the thread count of its process
    return folder


def copy_run(source, target):
    shutil.copytree(source, target)
    return target


def truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_check_resume_loads_every_checkpoint_and_names_the_bad_one(finished_run, tmp_path):
    cfg = quick_config("peers=2", "gossip.method=none", "optim.epochs=3", f"resume_from={finished_run}")
    check_resume(cfg)  # intact: passes
    damaged = copy_run(finished_run, tmp_path / "damaged")
    truncate(checkpoint_path(damaged, 1, "final"))
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        check_resume(cfg.model_copy(update={"resume_from": damaged}))
    assert str(checkpoint_path(damaged, 1, "final")) in str(err.value)
    assert "peer-0" not in str(err.value)


def test_a_checkpoint_without_the_training_state_is_refused(tmp_path):
    torch.save({"model": {"w": torch.zeros(2)}}, checkpoint_path(tmp_path, 0, "final"))  # e.g. a bare state dict
    cfg = quick_config("peers=1", "gossip.method=none", f"resume_from={tmp_path}")
    with pytest.raises(CheckpointError, match="lacks progress, optimizer, scheduler, rng"):
        check_resume(cfg)


def test_cli_names_a_truncated_checkpoint_before_ray_starts(finished_run, tmp_path, private_ray_env):
    damaged = copy_run(finished_run, tmp_path / "damaged")
    truncate(checkpoint_path(damaged, 1, "final"))
    started = time.perf_counter()
    proc = launch("--peers", "2", "--set", "optim.epochs=3", "--resume-from", str(damaged), "--out", str(tmp_path),
                  env=private_ray_env)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{checkpoint_path(damaged, 1, 'final')}: cannot be loaded, the file is truncated or corrupt" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.perf_counter() - started < 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged"], "no run folder: the run never started"
    assert ray_started(private_ray_env) == []
    assert load_checkpoint(checkpoint_path(damaged, 0, "final"))["progress"]["epoch"] == 1, "the intact one is fine"


def test_a_standalone_peer_names_its_truncated_checkpoint(finished_run, tmp_path):
    from workers.peer.standalone import build_parser, standalone_config

    damaged = copy_run(finished_run, tmp_path / "damaged")
    truncate(checkpoint_path(damaged, 1, "final"))
    args = build_parser().parse_args(["--peers", "2", "--peer", "1", "--resume_from", str(damaged)])
    with pytest.raises(CheckpointError, match=f"{checkpoint_path(damaged, 1, 'final')}: cannot be loaded"):
        standalone_config(args)


class RunsCode:
    """Unpickled, it calls `open(marker, "w")`: a stand-in for any code a malicious checkpoint would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def code_checkpoint(folder, marker):
    """peer-0_final.pt with the keys of a real checkpoint, whose model entry runs code when unpickled."""
    path = checkpoint_path(folder, 0, "final")
    torch.save({"progress": {}, "model": RunsCode(marker), "optimizer": {}, "scheduler": {}, "rng": {}}, path)
    return path


def test_the_code_checkpoint_really_runs_code_when_unpickled(tmp_path):
    """The fault is real: loaded without weights_only, the file creates the marker."""
    path = code_checkpoint(tmp_path, tmp_path / "marker")
    torch.load(path, weights_only=False)
    assert (tmp_path / "marker").exists()


@pytest.mark.parametrize("write", [torch.save, lambda obj, path: path.write_bytes(pickle.dumps(obj, protocol=2))])
def test_a_checkpoint_with_code_is_refused_without_running_it(write, tmp_path):
    """A torch zip file and a bare pickle alike."""
    path, marker = checkpoint_path(tmp_path, 0, "final"), tmp_path / "ran"
    write({"progress": {}, "model": RunsCode(marker), "optimizer": {}, "scheduler": {}, "rng": {}}, path)
    with pytest.raises(CheckpointError, match="refused without running anything: not a plain-data checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


def test_cli_refuses_a_checkpoint_with_code_without_running_it(tmp_path, private_ray_env):
    marker, path = tmp_path / "ran", code_checkpoint(tmp_path, tmp_path / "ran")
    proc = launch("--peers", "1", "--set", "gossip.method=none", "--resume-from", str(tmp_path),
                  "--out", str(tmp_path / "out"), env=private_ray_env)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{path}: refused without running anything: not a plain-data checkpoint" in proc.stderr
    assert "(it would call or build io.open)" in proc.stderr, "the message says what was refused"
    assert "weights_only` set to `False" not in proc.stderr, "torch's advice to load it anyway is not passed on"
    assert not marker.exists(), "the checkpoint's code never ran"
    assert not (tmp_path / "out").exists() and ray_started(private_ray_env) == []


# --- a port of network.port's range already in use -------------------------------------------------------------------


@pytest.fixture
def taken_port():
    """(base, taken): `base` .. `base + 2` were free, and `taken` = base + 1 is now held by a listening socket."""
    base = free_port_range(3, taken=[])
    with socket.socket() as holder:
        holder.bind((LOOPBACK, base + 1))
        holder.listen()
        yield base, base + 1


def test_check_ports_free_names_the_taken_port_and_what_needed_it(taken_port):
    base, taken = taken_port
    network = NetworkConfig(port=base)
    check_ports_free(network, LOOPBACK, peers=1, rendezvous=False)  # only base: free
    with pytest.raises(PortInUseError, match=f"network.port={base}: port {taken} for peer 1 is in use on 127.0.0.1"):
        check_ports_free(network, LOOPBACK, peers=3, rendezvous=False)
    with pytest.raises(PortInUseError, match=f"port {taken} for the allreduce rendezvous"):
        check_ports_free(network, LOOPBACK, peers=1, rendezvous=True)  # peer 0 on base, the rendezvous on base + 1
    with pytest.raises(PortInUseError, match=f"port {taken} for peer 1 is in use"):
        check_ports_free(network, LOOPBACK, peers=1, rendezvous=False, joins=1)  # a scripted joiner is peer 1
    check_ports_free(NetworkConfig(port=0), LOOPBACK, peers=3, rendezvous=True)  # any free ports: nothing fixed


def test_a_peer_names_its_taken_port_where_it_runs(taken_port):
    base, taken = taken_port
    network = NetworkConfig(port=base)
    assert dht_maddrs(network, 0)[0] == [f"/ip4/127.0.0.1/tcp/{base}"]
    with pytest.raises(PortInUseError, match=f"network.port={base}: port {taken} for peer 1 is in use"):
        dht_maddrs(network, 1)


@pytest.mark.integration
def test_a_port_taken_after_the_check_is_named_from_hiveminds_error(taken_port):
    """The race: hivemind's p2pd finds the port taken; its error ("Daemon failed to start ... address already in
    use") becomes one that names network.port."""
    import hivemind

    base, taken = taken_port
    with pytest.raises(PortInUseError, match=f"network.port={base}: port {taken} for peer 1 is in use") as err:
        with naming_taken_port(NetworkConfig(port=base), 1):
            hivemind.DHT(host_maddrs=[f"/ip4/127.0.0.1/tcp/{taken}"], start=True).shutdown()
    assert "address already in use" in str(err.value), "hivemind's own words are kept"


def test_cli_names_a_taken_port_before_ray_starts(taken_port, private_ray_env, tmp_path):
    base, taken = taken_port
    proc = launch("--peers", "3", "--set", f"network.port={base}", "--out", str(tmp_path), env=private_ray_env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"network.port={base}: port {taken} for peer 1 is in use on 127.0.0.1" in proc.stderr
    assert list(tmp_path.iterdir()) == [] and ray_started(private_ray_env) == []


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_run_whose_peer_finds_its_port_taken_fails_naming_it(ray_local, taken_port, tmp_path, caplog):
    """Where the CLI cannot check (the peers on other nodes; here: run_experiment called directly), peer 1's own
    check fails its start, and the driver's error names the port."""
    from launcher.driver.controller import run_experiment

    base, taken = taken_port
    cfg = quick_config("peers=2", "optim.epochs=1", f"network.port={base}")
    with caplog.at_level(logging.ERROR, logger="launcher"):
        result = run_experiment(cfg, tmp_path)
    assert result.exit_code == 1
    assert f"network.port={base}: port {taken} for peer 1 is in use" in caplog.text


# --- a full disk while writing a checkpoint or metrics.csv -----------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB file system (tmpfs) that a test can fill: writes past it fail with ENOSPC, as on a full disk."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True)


def fill(disk) -> None:
    """Take every free block of `disk` (the test's own filler file)."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as err:
        assert err.errno == errno.ENOSPC
    finally:
        os.close(fd)


def free_bytes(disk) -> int:
    stat = os.statvfs(disk)
    return stat.f_bfree * stat.f_frsize


def test_a_full_disk_keeps_the_previous_checkpoint_and_stops_the_peer_naming_the_path(small_disk):
    """A real peer trains on the tmpfs: epoch 1 is saved, then the disk is full and epoch 2's save fails."""
    from workers.peer.peer import Peer
    from workers.peer.train import train

    threads = torch.get_num_threads()
    cfg = quick_config("peers=2", "gossip.method=none", "optim.epochs=2")
    peer = Peer(cfg, 0, "full-disk", checkpoint_dir=small_disk)
    epochs = train(peer.setup, NoAveraging(), threading.Event())
    next(epochs)
    final = checkpoint_path(small_disk, 0, "final")
    saved = final.read_bytes()
    fill(small_disk)
    free = free_bytes(small_disk)
    with pytest.raises(CheckpointWriteError, match=f"could not write {final}: .*No space left on device"):
        next(epochs)
    torch.set_num_threads(threads)
    assert final.read_bytes() == saved, "the previous checkpoint is untouched"
    assert load_checkpoint(final)["progress"]["epoch"] == 1
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "peer-0_best.pt", "peer-0_final.pt"]
    assert free_bytes(small_disk) == free, "the temporary file's blocks were given back"


def metrics_row(epoch: int) -> MetricsRow:
    return MetricsRow(run_id="full-disk", peer=0, epoch=epoch, step=10 * epoch, samples_seen=320 * epoch,
                      wall_time_s=1.5 * epoch, train_loss=0.5, train_acc=0.8, test_loss=0.6, test_acc=0.75,
                      samples_per_s=213.3, train_s=1.2, eval_s=0.2, averaging_rounds_ok=epoch,
                      averaging_rounds_failed=0,
                      averaging_group_size=2.0, averaging_seconds=0.25, node="host", node_id="n1")  # fmt: skip


def write_until_full(write, disk) -> int:
    """Fill `disk`, then write rows until one fails (the file's last page fills up); returns the rows written."""
    fill(disk)
    for epoch in range(1, 1000):
        try:
            write(metrics_row(epoch))
        except MetricsWriteError as err:
            assert f"could not write {disk / 'metrics.csv'}" in str(err) and "No space left on device" in str(err)
            return epoch - 1
    raise AssertionError("the disk never filled up")


def assert_whole_rows(path, rows: int) -> None:
    assert path.read_bytes().endswith(b"\r\n"), "no half row at the end"
    table = pd.read_csv(path)
    assert list(table.epoch) == list(range(1, rows + 1))
    assert (
        table.notna().drop(columns=["consensus_dist", "consensus_before", "run_time_s"]).all().all()
    )  # (the driver's)


def test_a_full_disk_keeps_the_driver_s_rows_and_names_metrics_csv(small_disk):
    writer = RowWriter(small_disk / "metrics.csv")
    rows = write_until_full(lambda row: writer.write([row]), small_disk)
    writer.close()
    assert rows >= 1 and writer.rows_written == rows
    assert_whole_rows(small_disk / "metrics.csv", rows)


def test_a_full_disk_keeps_a_standalone_peer_s_rows_and_names_metrics_csv(small_disk):
    from workers.core.protocol import Report
    from workers.peer.standalone import write_reports

    with RowWriter(small_disk / "metrics.csv", append=False) as metrics:
        rows = write_until_full(lambda row: write_reports(metrics, [Report(row, None)], epochs=99), small_disk)
    assert rows >= 1 and metrics.rows_written == rows
    assert_whole_rows(small_disk / "metrics.csv", rows)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_full_disk_during_a_run_ends_it_with_a_clear_error_keeping_every_row(small_disk, ray_local, tmp_path,
                                                                              caplog, monkeypatch):  # fmt: skip
    """A real run whose results folder is on a 1 MiB tmpfs that fills up after epoch 2: exit 1, an error naming
    metrics.csv, every row written before it kept whole, the MLflow run marked FAILED (not left RUNNING)."""
    from mlflow.tracking import MlflowClient

    from launcher.driver.controller import run_experiment

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    cfg = quick_config("optim.epochs=10", f"checkpoint_dir={tmp_path / 'checkpoints'}", "metrics.tensorboard=false",
                       "metrics.tracking=mlflow")  # fmt: skip

    def fill_after_two_epochs() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            found = list(small_disk.glob("*/metrics.csv"))
            if found and len(found[0].read_text().splitlines()) > 2 * 4:
                fill(small_disk)
                return
            time.sleep(0.05)

    filler = threading.Thread(target=fill_after_two_epochs, daemon=True)
    filler.start()
    with caplog.at_level(logging.ERROR, logger="launcher"):
        result = run_experiment(cfg, small_disk)
    filler.join(5)
    assert result.exit_code == 1
    metrics_csv = result.run_dir / "metrics.csv"
    assert any(f"could not write {metrics_csv}" in r.getMessage() for r in caplog.records), caplog.text
    table = pd.read_csv(metrics_csv)
    assert metrics_csv.read_bytes().endswith(b"\r\n") and len(table) >= 8 and table.epoch.max() < 10
    (run,) = MlflowClient(tracking).search_runs(MlflowClient(tracking).search_experiments()[0].experiment_id)
    assert run.info.status == "FAILED"
