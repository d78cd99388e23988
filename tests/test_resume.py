"""Checkpoints and resume in a real swarm: a 2-peer gossip run of 2 epochs, then the same swarm resumed to 4."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from launcher.driver.controller import run_experiment
from launcher.results.summary import read_metrics
from tests.conftest import quick_config
from workers.peer.checkpoint import checkpoint_path, load_checkpoint
from workers.peer.data import load_dataset
from workers.peer.models import build_model
from workers.peer.train import evaluate

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def first_and_resumed(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    first = run_experiment(quick_config("peers=2", "optim.epochs=2"), out)
    resumed = run_experiment(quick_config("peers=2", "optim.epochs=4", f"resume_from={first.run_dir}"), out)
    return first, read_metrics(first.run_dir), resumed, read_metrics(resumed.run_dir)


def by_peer(metrics, epoch: int):
    return metrics[metrics.epoch == epoch].set_index("peer").sort_index()


def test_both_runs_write_best_and_final_per_peer(first_and_resumed):
    first, _, resumed, _ = first_and_resumed
    assert first.exit_code == resumed.exit_code == 0
    for run in (first, resumed):
        for peer in (0, 1):
            assert checkpoint_path(run.run_dir, peer, "final").is_file()
            assert checkpoint_path(run.run_dir, peer, "best").is_file()


def test_the_resumed_run_continues_epochs_steps_and_samples(first_and_resumed):
    _, metrics, _, resumed = first_and_resumed
    assert sorted(resumed.groupby("peer")["epoch"].apply(list)) == [[3, 4], [3, 4]]
    one, two, three = by_peer(metrics, 1), by_peer(metrics, 2), by_peer(resumed, 3)
    steps_per_epoch, shard = two.step - one.step, two.samples_seen - one.samples_seen
    assert (three.step == two.step + steps_per_epoch).all()
    assert (three.samples_seen == two.samples_seen + shard).all()
    assert (three.wall_time_s > two.wall_time_s).all()


def test_the_checkpoint_is_the_model_that_was_measured_and_the_resumed_run_starts_from_it(first_and_resumed):
    first, metrics, _, resumed = first_and_resumed
    cfg = quick_config("peers=2", "optim.epochs=2")
    splits = load_dataset(cfg.data)
    loader = DataLoader(splits.test, batch_size=cfg.data.test_batch_size)
    for peer, row in by_peer(metrics, 2).iterrows():
        state = load_checkpoint(checkpoint_path(first.run_dir, peer, "final"))
        model = build_model(cfg.model, splits.num_classes, splits.input_shape)
        model.load_state_dict(state["model"])
        test_loss, _ = evaluate(model, loader, torch.device("cpu"))
        assert test_loss == pytest.approx(row.test_loss, rel=1e-5) == state["metrics"]["test_loss"]
    fresh, loaded, continued = by_peer(metrics, 1), by_peer(metrics, 2), by_peer(resumed, 3)
    assert (continued.test_acc >= fresh.test_acc).all()
    # epoch 3 builds on the checkpoint of epoch 2 (loss ~1.2 here), not on a fresh model (~2.3 after one epoch)
    assert (continued.test_loss < fresh.test_loss).all() and (continued.test_loss < loaded.test_loss).all()


def test_best_checkpoints_hold_the_best_accuracy_so_far(first_and_resumed):
    first, metrics, resumed, resumed_metrics = first_and_resumed
    for peer in (0, 1):
        before = metrics[metrics.peer == peer].test_acc
        after = resumed_metrics[resumed_metrics.peer == peer].test_acc
        first_best = load_checkpoint(checkpoint_path(first.run_dir, peer, "best"))
        resumed_best = load_checkpoint(checkpoint_path(resumed.run_dir, peer, "best"))
        assert first_best["metrics"]["test_acc"] == first_best["progress"]["best_acc"] == before.max()
        assert resumed_best["metrics"]["test_acc"] == max(before.max(), after.max())
