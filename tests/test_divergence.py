"""One diverging peer never poisons the others: a real swarm (local Ray, hivemind peers on loopback) in which a
scenario event multiplies one peer's learning rate until its parameters are no longer finite."""

from __future__ import annotations

import pytest

from launcher.driver import run_experiment
from launcher.results import read_events, read_metrics
from tests.conftest import quick_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

EPOCHS = 6
DIVERGE = 'scenario=[{"peer": 1, "event": "lr", "factor": 1e12, "at_epoch": 2}]'


@pytest.fixture(scope="module")
def diverged_and_clean(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    diverged = run_experiment(quick_config(f"optim.epochs={EPOCHS}", DIVERGE), out)
    clean = run_experiment(quick_config(f"optim.epochs={EPOCHS}"), out)
    return diverged, clean


def test_a_diverged_peer_shares_nothing_and_reloads_the_swarms_state(diverged_and_clean):
    diverged, clean = diverged_and_clean
    assert diverged.exit_code == 0
    events = read_events(diverged.run_dir)
    mine = events[events.peer == 1].event.tolist()
    assert "diverged" in mine and "reloaded" in mine and mine.index("diverged") < mine.index("reloaded")
    assert "from peer" in events[events.event == "reloaded"].detail.iloc[0], "the state came from a live peer"
    metrics, baseline = read_metrics(diverged.run_dir), read_metrics(clean.run_dir)
    final, clean_final = metrics[metrics.epoch == EPOCHS], baseline[baseline.epoch == EPOCHS]
    others = final[final.peer != 1].test_acc.mean()
    assert abs(others - clean_final[clean_final.peer != 1].test_acc.mean()) <= 0.02, "the others were not poisoned"
    assert 1 in final.peer.values, "the diverged peer trained to the end"
    assert final.consensus_peers.iloc[0] == 4 and final.consensus_dist.iloc[0] < 1e-3, "back at the consensus"
    assert metrics.notna().test_loss.all() and (metrics.test_loss < 10).all(), "no row shows a poisoned model"
