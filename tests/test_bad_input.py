"""Bad input gets a clear error and loses nothing: the rows of the README's "What happens when" table, each with the
real fault (a cut checkpoint file, a pickle that runs code, a bound port, a full disk), through the real CLI where
the CLI is the one that must catch it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch

from tests.conftest import QUICKSTART, ROOT, quick_config, run_processes
from workers.averaging import NoAveraging
from workers.checkpoint import CheckpointError, check_resume, checkpoint_path, load_checkpoint

LAUNCH = [sys.executable, "-m", "launcher", "run", str(QUICKSTART)]


def launch(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, as a user runs it."""
    return subprocess.run([*LAUNCH, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def new_run_processes(before: set[int]) -> list[str]:
    return [p for p in run_processes() if int(p.split(":")[0]) not in before]


def pids_now() -> set[int]:
    return {int(line.split(":")[0]) for line in run_processes()}


# --- checkpoints given to --resume-from ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """peer-0_final.pt and peer-1_final.pt of a 2-peer, 1-epoch run, written by the peers' own checkpoint code."""
    from workers.peer import Peer
    from workers.train import train

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


def test_cli_names_a_truncated_checkpoint_before_ray_starts(finished_run, tmp_path):
    damaged = copy_run(finished_run, tmp_path / "damaged")
    truncate(checkpoint_path(damaged, 1, "final"))
    before, started = pids_now(), time.perf_counter()
    proc = launch("--peers", "2", "--set", "optim.epochs=3", "--resume-from", str(damaged), "--out", str(tmp_path))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{checkpoint_path(damaged, 1, 'final')}: cannot be loaded, the file is truncated or corrupt" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.perf_counter() - started < 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged"], "no run folder: the run never started"
    assert new_run_processes(before) == []
    assert load_checkpoint(checkpoint_path(damaged, 0, "final"))["progress"]["epoch"] == 1, "the intact one is fine"


def test_a_standalone_peer_names_its_truncated_checkpoint(finished_run, tmp_path):
    from workers.standalone import build_parser, standalone_config

    damaged = copy_run(finished_run, tmp_path / "damaged")
    truncate(checkpoint_path(damaged, 1, "final"))
    args = build_parser().parse_args(["--peers", "2", "--peer", "1", "--resume_from", str(damaged)])
    with pytest.raises(CheckpointError, match=f"{checkpoint_path(damaged, 1, 'final')}: cannot be loaded"):
        standalone_config(args)
