"""Checkpoints: the atomic write, the round trip, the resume check, the LR schedule, and a resume in one process
(a peer without Ray or hivemind) that must reproduce an uninterrupted run exactly."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from launcher.cli import main as cli_main
from tests.conftest import QUICKSTART, quick_config
from workers.averaging.base import NoAveraging
from workers.core.config import OptimConfig
from workers.core.errors import ConfigError
from workers.peer.checkpoint import (
    RESUME_KEYS,
    atomic_save,
    check_resume,
    checkpoint_identity,
    checkpoint_path,
    load_checkpoint,
    run_checkpoint_dir,
)
from workers.peer.peer import Peer
from workers.peer.schedule import build_scheduler, lr_factor, resume_schedule
from workers.peer.train import evaluate, train

# --- atomic write and round trip -------------------------------------------------------------------------------------


def test_atomic_save_round_trips_tensors_and_plain_data(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3), "epoch": 3, "rng": (3, (1, 2), None), "acc": -math.inf}
    path = tmp_path / "sub" / "peer-0_final.pt"
    atomic_save(state, path)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["w"], state["w"])
    assert (loaded["epoch"], loaded["rng"], loaded["acc"]) == (3, (3, (1, 2), None), -math.inf)
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temporary file is left behind"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "peer-0_best.pt"
    atomic_save({"epoch": 1}, path)
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises for a lambda
        atomic_save({"epoch": 2, "unpicklable": lambda: None}, path)
    assert load_checkpoint(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_load_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "peer-3_final.pt")):
        load_checkpoint(checkpoint_path(tmp_path, 3, "final"))


# --- the resume check, before Ray ------------------------------------------------------------------------------------


def test_check_resume_names_every_missing_checkpoint(tmp_path):
    atomic_save({key: {} for key in RESUME_KEYS}, checkpoint_path(tmp_path, 0, "final"))
    check_resume(quick_config("peers=1", "gossip.method=none", f"resume_from={tmp_path}"))
    check_resume(quick_config())  # no resume: nothing to check
    with pytest.raises(ConfigError) as err:
        check_resume(quick_config("peers=3", f"resume_from={tmp_path}"))
    message = str(err.value)
    assert "resume_from=" in message and "2 of peers=3" in message
    assert str(tmp_path / "peer-1_final.pt") in message and str(tmp_path / "peer-2_final.pt") in message
    assert "peer-0_final" not in message


def test_each_run_has_its_own_checkpoint_folder_under_checkpoint_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    shared = quick_config("checkpoint_dir=~/ckpt")
    assert run_checkpoint_dir(shared, "run-a", tmp_path / "results" / "run-a") == tmp_path / "home" / "ckpt" / "run-a"
    assert run_checkpoint_dir(shared, "run-b", tmp_path / "results" / "run-b") == tmp_path / "home" / "ckpt" / "run-b"
    run_dir = tmp_path / "results" / "run-a"
    assert run_checkpoint_dir(quick_config(), "run-a", run_dir) == run_dir, "unset: the run folder itself"


def fake_swarm_checkpoints(folder, *overrides: str) -> None:
    """peer-<i>_final.pt for every peer of the run `overrides` configure, holding its identity (and empty state)."""
    cfg = quick_config(*overrides)
    for peer in range(cfg.peers):
        state = {"identity": checkpoint_identity(cfg), **{key: {} for key in RESUME_KEYS}}
        atomic_save(state, checkpoint_path(folder, peer, "final"))


@pytest.mark.parametrize(
    "resume_with, named",
    [
        (["peers=2"], "peers=4 there, peers=2 here"),
        (["data.partition=dirichlet"], "data.partition='iid' there, data.partition='dirichlet' here"),
        (["seed=1"], "seed=0 there, seed=1 here"),
    ],
)
def test_check_resume_refuses_a_checkpoint_of_another_swarm_or_data(tmp_path, resume_with, named):
    fake_swarm_checkpoints(tmp_path)  # the 4-peer quickstart
    check_resume(quick_config(f"resume_from={tmp_path}", "optim.lr=0.01"))  # other settings may change
    with pytest.raises(ConfigError) as err:
        check_resume(quick_config(f"resume_from={tmp_path}", *resume_with))
    assert named in str(err.value) and "peer-0_final.pt" in str(err.value)


def test_check_resume_points_from_a_checkpoint_dir_to_its_runs(tmp_path):
    fake_swarm_checkpoints(tmp_path / "quickstart-gossip-1")
    with pytest.raises(ConfigError, match="it holds the checkpoint folders of runs quickstart-gossip-1"):
        check_resume(quick_config(f"resume_from={tmp_path}"))


def test_cli_refuses_fewer_peers_than_the_checkpoints_before_ray_starts(tmp_path, capsys):
    fake_swarm_checkpoints(tmp_path / "ckpt")
    code = cli_main(["run", str(QUICKSTART), "--resume-from", str(tmp_path / "ckpt"), "--peers", "2",
                     "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 2
    assert "peers=4 there, peers=2 here" in capsys.readouterr().err
    assert not (tmp_path / "out").exists(), "no run folder: the run never started"


def test_cli_resume_from_flag_is_checked_before_ray_starts(tmp_path, capsys):
    code = cli_main(["run", str(QUICKSTART), "--resume-from", str(tmp_path / "no run"), "--out", str(tmp_path)])
    assert code == 2
    assert str(tmp_path / "no run" / "peer-0_final.pt") in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [], "no run folder: the run never started"


# --- the schedule ----------------------------------------------------------------------------------------------------


def test_lr_factor_per_schedule():
    constant = OptimConfig(epochs=5)
    assert [lr_factor(e, constant) for e in range(5)] == [1.0] * 5
    cosine = OptimConfig(epochs=4, schedule="cosine")
    assert [round(lr_factor(e, cosine), 4) for e in range(4)] == [1.0, 0.8536, 0.5, 0.1464]
    step = OptimConfig(epochs=9, schedule="step", step_size=3, gamma=0.5, warmup_epochs=1)
    assert [lr_factor(e, step) for e in range(9)] == [0.5, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25]


def test_warmup_must_leave_epochs():
    with pytest.raises(ValueError, match="warmup_epochs=3 leaves no epoch of epochs=3"):
        OptimConfig(epochs=3, warmup_epochs=3)


def test_a_resumed_schedule_follows_the_new_run_length():
    model = torch.nn.Linear(2, 2)
    short, long = OptimConfig(epochs=2, schedule="cosine", lr=0.1), OptimConfig(epochs=4, schedule="cosine", lr=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=short.lr)
    scheduler = build_scheduler(optimizer, short)
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    saved_optimizer, saved_scheduler = optimizer.state_dict(), scheduler.state_dict()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # the end of the 2-epoch cosine

    optimizer = torch.optim.SGD(model.parameters(), lr=long.lr)
    scheduler = build_scheduler(optimizer, long)
    optimizer.load_state_dict(saved_optimizer)
    resume_schedule(optimizer, scheduler, saved_scheduler, long)
    lrs = []
    for _ in range(2):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.1 * lr_factor(2, long), 0.1 * lr_factor(3, long)])


# --- resume in one process -------------------------------------------------------------------------------------------


def train_peer(tmp_path, name: str, *overrides: str) -> tuple[Peer, list]:
    """Peer 0 of a 2-peer digits swarm without communication, trained in this process."""
    cfg = quick_config("peers=2", "gossip.method=none", "optim.schedule=step", "optim.step_size=1",
                       "optim.gamma=0.5", "optim.warmup_epochs=1", *overrides)  # fmt: skip
    peer = Peer(cfg, 0, name, checkpoint_dir=tmp_path / name)
    return peer, [report.row for report in train(peer.setup, NoAveraging(), threading.Event())]


def test_a_resumed_peer_reproduces_the_uninterrupted_run(tmp_path, torch_threads):
    _, full = train_peer(tmp_path, "full", "optim.epochs=4")
    _, first = train_peer(tmp_path, "first", "optim.epochs=2")
    _, resumed = train_peer(tmp_path, "resumed", "optim.epochs=4", f"resume_from={tmp_path / 'first'}")
    assert [r.epoch for r in first] == [1, 2] and [r.epoch for r in resumed] == [3, 4]
    for got, want in zip(resumed, full[2:], strict=True):
        assert (got.step, got.samples_seen) == (want.step, want.samples_seen)
        assert got.train_loss == pytest.approx(want.train_loss, rel=1e-6)
        assert got.test_loss == pytest.approx(want.test_loss, rel=1e-6)
    assert resumed[0].wall_time_s > first[-1].wall_time_s, "wall time continues from the checkpoint"


def test_checkpoints_hold_the_state_of_their_epoch(tmp_path, torch_threads):
    peer, rows = train_peer(tmp_path, "run", "optim.epochs=3", "optim.lr=0.5")  # a large lr: accuracy may drop
    final = load_checkpoint(checkpoint_path(tmp_path / "run", 0, "final"))
    best = load_checkpoint(checkpoint_path(tmp_path / "run", 0, "best"))
    assert final["progress"]["epoch"] == 3 and final["progress"]["step"] == rows[-1].step
    assert final["progress"]["samples_seen"] == rows[-1].samples_seen
    best_row = max(rows, key=lambda r: r.test_acc)
    assert best["metrics"]["epoch"] == best_row.epoch
    assert best["progress"]["best_acc"] == final["progress"]["best_acc"] == best_row.test_acc
    assert set(final["rng"]) == {"torch", "cuda", "shuffle", "numpy", "python"}
    assert final["identity"] == checkpoint_identity(peer.cfg) and final["identity"]["peers"] == 2
    assert final["scheduler"]["last_epoch"] == 3 and "momentum_buffer" in final["optimizer"]["state"][0]

    setup = peer.setup  # a model loaded from `best` scores what the best epoch's row says
    setup.model.load_state_dict(best["model"])
    test_loss, test_acc = evaluate(setup.model, setup.test_loader, setup.device)
    assert (test_loss, test_acc) == (pytest.approx(best_row.test_loss, rel=1e-6), best_row.test_acc)


def test_a_peer_refuses_a_checkpoint_of_another_swarm(tmp_path, torch_threads):
    """The peer checks too, for runs that did not come through the CLI's check_resume (`python -m workers`)."""
    train_peer(tmp_path, "first", "optim.epochs=2")
    with pytest.raises(ConfigError, match="peers=2 there, peers=3 here"):
        train_peer(tmp_path, "again", "optim.epochs=3", "peers=3", f"resume_from={tmp_path / 'first'}")


def test_resuming_a_finished_run_without_more_epochs_is_an_error(tmp_path, torch_threads):
    train_peer(tmp_path, "done", "optim.epochs=2")
    with pytest.raises(ConfigError, match="finished epoch 2, and optim.epochs=2"):
        train_peer(tmp_path, "again", "optim.epochs=2", f"resume_from={tmp_path / 'done'}")


def test_a_resumed_run_starts_with_the_previous_best_in_its_own_folder(tmp_path, torch_threads):
    train_peer(tmp_path, "first", "optim.epochs=2")
    cfg = quick_config("peers=2", "gossip.method=none", "optim.epochs=3", f"resume_from={tmp_path / 'first'}")
    Peer(cfg, 0, "resumed", checkpoint_dir=tmp_path / "resumed")  # not trained: the best so far is the old one
    carried = load_checkpoint(checkpoint_path(tmp_path / "resumed", 0, "best"))
    previous = load_checkpoint(checkpoint_path(tmp_path / "first", 0, "best"))
    assert carried["progress"] == previous["progress"] and carried["metrics"]["run_id"] == "first"
    assert not checkpoint_path(tmp_path / "resumed", 0, "final").exists()


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_newcomer_that_gets_no_state_never_starts_from_its_initial_weights(torch_threads, tmp_path):
    """A gossip newcomer whose swarm serves no state (here: the only other peer has not started training, so it
    shares nothing) must not train from its fresh initialisation: that would be averaged into a trained swarm, and
    its rows would land in long-finished epochs. It raises, and the driver decides (restart or give up)."""
    from workers.peer.peer import Peer, StateUnavailable

    cfg = quick_config("peers=2")
    other, newcomer = Peer(cfg, 0, "no-state", checkpoint_dir=tmp_path), Peer(cfg, 1, "no-state", tmp_path)
    try:
        newcomer.start_dht(other.start_dht([]))
        with pytest.raises(StateUnavailable, match="no live peer served its state within 3 s"):
            newcomer.restore_state(timeout=3)
        assert newcomer.setup.progress.epoch == 0
    finally:
        for peer in (other, newcomer):  # not Peer.stop: it kills this process's children (torch's shm manager)
            peer.averaging.shutdown()
            peer.dht.shutdown()
