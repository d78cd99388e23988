"""The command line as a user runs it, in a subprocess: fast rejection of bad input, and Ctrl-C. Each run gets a Ray
of its own (`private_ray_env`), whatever Ray this machine runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import psutil
import pytest
import torch

from tests.conftest import QUICKSTART, ROOT, ray_processes_left, ray_started, run_processes
from workers.core.metrics import CSV_COLUMNS
from workers.peer.checkpoint import checkpoint_path

LAUNCH = [sys.executable, "-m", "launcher", "run", str(QUICKSTART)]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--set", "gossip.alpha=1.5"], "gossip.alpha=1.5"),
        (["--set", "gossip.group_size=0"], "gossip.group_size=0"),
        (["--set", "gossip.colour=red"], "gossip.colour: unknown key"),
        (["--peers", "1"], "can never be met by peers=1"),
        (["--address", "ray://10.0.0.1:10001"], "Ray Client (ray://) is not supported"),
    ],
)
def test_bad_config_exits_2_before_ray_starts(args, expected, tmp_path, private_ray_env):
    started = time.perf_counter()
    proc = subprocess.run([*LAUNCH, *args, "--out", str(tmp_path)], env=private_ray_env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2
    assert expected in proc.stderr
    assert time.perf_counter() - started < 10
    assert list(tmp_path.iterdir()) == [], "nothing is written for a rejected config"
    assert ray_started(private_ray_env) == []


# Columns every row has a value in, also a row flushed after an interrupt (the others may be empty: no successful
# round, no swarm figure for a lone peer, no round in the epoch).
COMPLETE = [c for c in CSV_COLUMNS if c not in ("averaging_group_size", "consensus_dist", "consensus_before")]


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_ctrl_c_keeps_rows_and_leaves_no_processes(tmp_path, private_ray_env):
    """Ctrl-C, then a SIGTERM during the cleanup (as `timeout`, Slurm or Kubernetes send): the cleanup still
    finishes; the peers were stopped before their rows were drained, so no checkpoint is newer than its last row."""
    before = {int(line.split(":")[0]) for line in run_processes()}
    log = (tmp_path / "log.txt").open("w")
    # A new session, like a terminal's foreground job: SIGINT goes to the whole process group.
    proc = subprocess.Popen([*LAUNCH, "--out", str(tmp_path / "out")], cwd=ROOT, env=private_ray_env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    written = wait_for_rows(tmp_path / "out", at_least=8, timeout=150)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGTERM)  # a second signal, during the cleanup
    assert proc.wait(timeout=90) == 130
    (metrics,) = (tmp_path / "out").glob("*/metrics.csv")
    assert metrics.read_text().startswith(written), "the rows written before the interrupt are kept as they were"
    frame = pd.read_csv(metrics)
    assert tuple(frame.columns) == CSV_COLUMNS and len(frame) >= len(written.splitlines()) - 1
    assert frame[COMPLETE].notna().all().all(), "every row is complete, also those flushed after the interrupt"
    assert not frame.duplicated(["peer", "epoch"]).any(), "each (peer, epoch) once"
    for peer, epochs in frame.groupby("peer").epoch:
        assert sorted(epochs) == list(range(1, epochs.max() + 1)), f"peer {peer}: no epoch lost in between"
        final = torch.load(checkpoint_path(metrics.parent, peer, "final"), weights_only=True)
        assert final["progress"]["epoch"] == epochs.max(), f"peer {peer}: its final model is its last row's"
    time.sleep(2)
    assert [p for p in run_processes() if int(p.split(":")[0]) not in before] == []


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_ctrl_c_stops_a_run_with_wedged_peers_within_60_s(tmp_path, private_ray_env):
    """One peer's hivemind DHT process killed (its rounds hang), another peer's process frozen (SIGSTOP: it answers
    nothing, not even the stop), then Ctrl-C: the run still ends within 60 s and leaves no process behind."""
    before = {int(line.split(":")[0]) for line in run_processes()}
    log = (tmp_path / "log.txt").open("w")
    args = [*LAUNCH, "--set", "optim.epochs=40", "--out", str(tmp_path / "out")]
    proc = subprocess.Popen(args, cwd=ROOT, env=private_ray_env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        wait_for_rows(tmp_path / "out", at_least=8, timeout=150)
        processes = psutil.Process(proc.pid).children(recursive=True)
        actors = sorted((p for p in processes if p.name().startswith("ray::Peer") and  # not hivemind's forks of one
                         not p.parent().name().startswith("ray::")), key=lambda p: p.pid)  # fmt: skip
        assert len(actors) == 4
        (p2pd,) = [p for p in actors[1].children(recursive=True) if p.name() == "p2pd"]
        os.kill(p2pd.ppid(), signal.SIGKILL)  # peer's DHT process
        os.kill(actors[2].pid, signal.SIGSTOP)
        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=90) == 130
        assert time.monotonic() - started < 60
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(2)
    assert [p for p in run_processes() if int(p.split(":")[0]) not in before] == []
    assert ray_processes_left(private_ray_env) == [], "no process of the run's Ray is left"


def wait_for_rows(out_dir, at_least: int, timeout: float) -> str:
    """The complete lines of the run's metrics.csv once it has `at_least` rows."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for metrics in out_dir.glob("*/metrics.csv"):
            text = metrics.read_text()
            text = text[: text.rfind("\n") + 1]  # a line being written is not a row yet
            if len(text.splitlines()) - 1 >= at_least:
                return text
        time.sleep(0.2)
    raise AssertionError(f"fewer than {at_least} rows in {timeout} s")
