"""gossip.method: diloco. The outer Nesterov step by hand; DiLoCo with outer_lr 1 and no momentum is gossip exactly
(real hivemind averagers, the digits training loop in this process); a failed round steps on the peer's own Δ; a
newcomer downloads θ_sync and the outer momentum with the parameters; a quickstart-size run learns as gossip does."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from launcher.driver.controller import run_experiment
from launcher.results.summary import read_metrics
from tests.conftest import QUICKSTART, quick_config
from workers.averaging.base import averaged_tensors
from workers.averaging.diloco import DiLoCoAveraging, OuterOptimizer
from workers.averaging.gossip import GossipAveraging
from workers.core.config import load_config
from workers.core.errors import ConfigError
from workers.peer.peer import Peer
from workers.peer.train import train


def test_the_outer_step_is_nesterov_sgd_on_the_pseudo_gradient():
    """θ_sync = 1 and the group's mean 0.5 below it, twice. Nesterov with lr 0.7 and momentum 0.9, by hand:
    step 1: Δ = 0.5, buf = Δ = 0.5, update = Δ + 0.9·buf = 0.95, θ = 1 − 0.7·0.95 = 0.335;
    step 2: Δ = 0.5, buf = 0.9·0.5 + 0.5 = 0.95, update = 0.5 + 0.9·0.95 = 1.355, θ = 0.335 − 0.7·1.355 = −0.6135."""
    param = torch.ones(3)
    outer = OuterOptimizer([param], lr=0.7, momentum=0.9)
    outer.step([param - 0.5], [param])
    torch.testing.assert_close(param, torch.full((3,), 0.335))
    outer.step([param - 0.5], [param])
    torch.testing.assert_close(param, torch.full((3,), -0.6135))
    torch.testing.assert_close(outer.sync[0], param)
    # lr 1 without momentum takes the mean itself: gossip's averaging
    plain = OuterOptimizer([param], lr=1.0, momentum=0.0)
    plain.step([torch.full((3,), 0.25)], [param])
    torch.testing.assert_close(param, torch.full((3,), 0.25))


def test_the_outer_state_round_trips_and_steps_the_same():
    params = [torch.randn(4, 3), torch.randn(3)]
    donor = OuterOptimizer(params, lr=0.7, momentum=0.9)
    donor.step([p - 0.1 for p in params], params)
    newcomer_params = [torch.zeros_like(p) for p in params]
    newcomer = OuterOptimizer(newcomer_params, lr=0.7, momentum=0.9)
    newcomer.load(donor.state())
    mean = [p + 0.2 for p in params]
    donor.step(mean, params)
    newcomer.step(mean, newcomer_params)
    for got, want in zip(newcomer_params, params, strict=True):
        torch.testing.assert_close(got, want)  # the momentum came along: the same step from the same state


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["gossip.outer_lr=0.5"], "gossip.method='gossip' ignores gossip.outer_lr=0.5"),
        (["gossip.method=optimizer", "gossip.outer_momentum=0.5"], "ignores gossip.outer_momentum=0.5"),
        (["gossip.method=diloco", "gossip.outer_lr=0"], "gossip.outer_lr=0: "),
        (["gossip.method=diloco", "gossip.outer_momentum=1"], "gossip.outer_momentum=1: "),
        (["gossip.method=diloco", "gossip.outer_momentum=-0.1"], "gossip.outer_momentum=-0.1: "),
        (["gossip.method=diloco", "gossip.overlap=true"], "gossip.overlap=True is not supported with gossip.method="),
        (["gossip.method=diloco", "gossip.every_steps=37"], "gossip.every_steps=37 is never reached"),
        (["gossip.method=diloco", "gossip.min_group_size=5"], "min_group_size=5 can never be met by peers=4"),
    ],
)
def test_diloco_knobs_are_checked_when_the_config_is_loaded(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        quick_config(*overrides)


def test_diloco_takes_gossips_group_knobs_and_none_accepts_its_own():
    cfg = quick_config("gossip.method=diloco", "gossip.every_steps=6", "gossip.compression=float16",
                       "gossip.outer_lr=0.5", "gossip.outer_momentum=0")  # fmt: skip
    assert (cfg.gossip.every_steps, cfg.gossip.outer_lr, cfg.gossip.outer_momentum) == (6, 0.5, 0.0)
    assert quick_config("gossip.method=none", "gossip.outer_lr=0.5").gossip.outer_lr == 0.5
    defaults = quick_config("gossip.method=diloco").gossip
    assert (defaults.outer_lr, defaults.outer_momentum) == (0.7, 0.9)


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_a_round_without_a_partner_fails_and_steps_on_the_peers_own_delta(dhts):
    """Alone, the round finds no group: it counts as failed and the outer step takes this peer's own parameters as
    the mean. After a local change of +1 everywhere: Δ = −1, buf = −1, update = −1 + 0.9·(−1) = −1.9, so
    θ = θ_sync + 0.7·1.9 = θ_sync + 1.33 (Nesterov overshoots the peer's own progress)."""
    cfg = quick_config("gossip.method=diloco", "gossip.matchmaking_time=1").gossip
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    synced = [t.clone() for t in averaged_tensors(model)]
    peer = DiLoCoAveraging(model, dhts(1)[0], cfg, prefix="alone", swarm_size=2)
    try:
        with torch.no_grad():
            for tensor in peer.tensors:
                tensor.add_(1.0)  # the inner steps
        assert peer.average() is None
    finally:
        peer.shutdown()
    assert (peer.stats.ok, peer.stats.failed) == (0, 1)
    for got, before in zip(averaged_tensors(model), synced, strict=True):
        torch.testing.assert_close(got, before + 1.33)
    torch.testing.assert_close(peer.outer.sync, averaged_tensors(model))


def final_parameters(dhts, method: str, *overrides: str) -> tuple[list[list[torch.Tensor]], list[int]]:
    """Two digits peers trained in this process for 2 epochs, rounds every 5 steps through real averagers: each
    peer's final parameters and its successful rounds."""
    cfg = quick_config("peers=2", "optim.epochs=2", "gossip.every_steps=5", "gossip.matchmaking_time=3",
                       f"gossip.method={method}", *overrides)  # fmt: skip
    setups = [Peer(cfg, i, method).setup for i in range(2)]  # the same seeds and batch order in both runs
    kind = DiLoCoAveraging if method == "diloco" else GossipAveraging
    pairs = zip(setups, dhts(2), strict=True)
    rounds = [kind(setup.model, dht, cfg.gossip, prefix=method, lock=setup.lock, swarm_size=2) for setup, dht in pairs]
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda s, a: list(train(s, a, threading.Event())), setups, rounds))
    finally:
        time.sleep(0.5)  # a reducer may still be sending its last part to the other peer
        for averaging in rounds:
            averaging.shutdown()
    return [[t.clone() for t in averaged_tensors(s.model)] for s in setups], [a.stats.ok for a in rounds]


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_diloco_with_outer_lr_1_and_no_momentum_is_gossip_exactly(dhts, torch_threads):
    gossip, gossip_ok = final_parameters(dhts, "gossip")
    diloco, diloco_ok = final_parameters(dhts, "diloco", "gossip.outer_lr=1", "gossip.outer_momentum=0")
    rounds = 2 * 23 // 5  # 23 steps per epoch on half of digits' 1438 training samples, a round every 5
    assert gossip_ok == diloco_ok == [rounds, rounds], "every round of both runs had both peers"
    for peer in range(2):
        for got, want in zip(diloco[peer], gossip[peer], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    default, _ = final_parameters(dhts, "diloco")  # the outer momentum changes the run: the comparison can fail
    assert max((a - b).abs().max() for a, b in zip(default[0], gossip[0], strict=True)) > 1e-2


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_newcomer_downloads_the_outer_state_with_the_parameters(torch_threads):
    """A donor trains one epoch alone, rounds every 10 of its 23 steps: both fail (no partner), so each steps on its
    own Δ and leaves outer momentum, and its last 3 steps move it off θ_sync. A newcomer built fresh takes all of it
    from the donor through hivemind's state download, and then steps exactly as the donor does."""
    cfg = quick_config("peers=2", "optim.epochs=1", "gossip.method=diloco", "gossip.every_steps=10",
                       "gossip.matchmaking_time=1")  # fmt: skip
    donor, newcomer = Peer(cfg, 0, "outer-state"), Peer(cfg, 1, "outer-state")
    try:
        newcomer.start_dht(donor.start_dht([]))
        donor.start_training()
        deadline = time.monotonic() + 60
        while donor.poll().state == "running" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert donor.poll().state == "done" and donor.averaging.stats.failed == 2
        assert newcomer.restore_state(timeout=30) == "peer 0"
        donor_outer, new_outer = donor.averaging.method_state(), newcomer.averaging.method_state()
    finally:
        for peer in (donor, newcomer):  # not Peer.stop: it kills this process's children (torch's shm manager)
            peer.averaging.shutdown()
            peer.dht.shutdown()
    params = donor.averaging.params
    momentum = donor_outer[params:]
    assert max(float(m.abs().max()) for m in momentum) > 0, "the failed rounds left outer momentum"
    sync_vs_params = [(s - p).abs().max() for s, p in zip(donor_outer[:params], donor.averaging.tensors, strict=False)]
    assert max(float(d) for d in sync_vs_params) > 0, "the donor's parameters moved on from θ_sync"
    for got, want in zip(new_outer, donor_outer, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got, want in zip(averaged_tensors(newcomer.setup.model), averaged_tensors(donor.setup.model), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert newcomer.setup.progress.step == donor.setup.progress.step == 23
    mean = [t + 0.01 for t in donor.averaging.tensors[:params]]  # one more outer step, the same on both
    for peer in (donor, newcomer):
        peer.averaging.outer.step(mean, peer.averaging.tensors[:params])
    for got, want in zip(averaged_tensors(newcomer.setup.model), averaged_tensors(donor.setup.model), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


QUICKSTART_DILOCO = QUICKSTART.with_name("quickstart_diloco.yaml")


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_quickstart_diloco_run_learns_as_well_as_gossip(ray_local, tmp_path):
    """Side by side, 4 peers, 10 epochs of digits, one round per epoch for both: DiLoCo's final mean accuracy is
    within 2 points of gossip's (measured: 0.969 in three runs against 0.964), with the same rounds and metrics."""
    runs = {}
    for method, path in [("gossip", QUICKSTART), ("diloco", QUICKSTART_DILOCO)]:
        result = run_experiment(load_config(path, ["gossip.matchmaking_time=1.5"]), tmp_path)
        assert result.exit_code == 0
        runs[method] = read_metrics(result.run_dir)
    diloco = runs["diloco"]
    assert sorted(diloco.groupby("peer")["epoch"].apply(list)) == [list(range(1, 11))] * 4
    final = diloco[diloco.epoch == 10]
    assert (final.averaging_rounds_ok == 10).all() and (final.averaging_rounds_failed == 0).all()
    assert (diloco.averaging_group_size == 4).all() and (diloco.averaging_seconds > 0).all()
    # the same tensors through the same groups as gossip: the same traffic over the run (to a few bytes of framing per
    # round). Not epoch by epoch: a reducer's last averaged parts can leave after its own round ended, so they count in
    # that peer's next epoch (seen in CI: 4% of an epoch's bytes moved from epoch 6 to 7)
    swarm_bytes = {method: run.averaging_bytes.sum() for method, run in runs.items()}
    assert abs(swarm_bytes["diloco"] - swarm_bytes["gossip"]) < 0.01 * swarm_bytes["gossip"]
    # a full group with one θ_sync and one outer momentum takes the same outer step: the peers stay one model
    assert diloco.groupby("epoch").consensus_dist.first().median() < 1e-4
    accuracy = {method: run.groupby("epoch").test_acc.mean() for method, run in runs.items()}
    assert (accuracy["diloco"] - accuracy["gossip"]).abs().max() > 0, "the outer step changes the run"
    assert accuracy["diloco"][10] >= accuracy["gossip"][10] - 0.02, (accuracy["diloco"][10], accuracy["gossip"][10])


def test_the_inner_optimizer_is_sgd_or_adamw_from_optim():
    from torch import nn

    from tests.conftest import quick_config
    from workers.peer.schedule import build_optimizer

    model = nn.Linear(3, 2)
    sgd = build_optimizer(model.parameters(), quick_config("optim.momentum=0.5").optim)
    adamw = build_optimizer(model.parameters(), quick_config("optim.optimizer=adamw", "optim.lr=0.001").optim)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.5
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["lr"] == 0.001
    before = model.weight.detach().clone()
    model(torch.ones(4, 3)).sum().backward()
    adamw.step()
    assert not torch.equal(before, model.weight), "AdamW steps the parameters"
