"""gossip.method: sgp in real swarms: a local Ray, one actor per peer, real hivemind DHTs and push-sum over their
p2p daemons on loopback. The quickstart (12 epochs, a round every 2 steps), synchronous and overlapped, against the
same run without communication; and a kill, a join and a leave in one run against the fault-free one."""

from __future__ import annotations

import pytest

from launcher.driver.controller import run_experiment
from launcher.results.summary import read_events, read_metrics
from tests.conftest import quick_config
from workers.peer.models import build_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

# 12 epochs, not the quickstart's 10: at 10 the overlapped runs ended at 0.948-0.971, too close to the 0.95 bar for a
# test on a loaded machine (`none` is held to its 10-epoch consensus, which only grows with more epochs)
EPOCHS = 12
SGP = (f"optim.epochs={EPOCHS}", "gossip.method=sgp", "gossip.every_steps=2")  # 12 steps per epoch: 6 rounds
CHURN = (
    "scenario=[{at_epoch: 3, peer: 1, event: kill}, {at_epoch: 3, event: join}, {at_epoch: 6, peer: 2, event: leave}]"
)
# the churn run is longer: its swarm goes on at full speed through the faults (the dead peer leaves the views when
# the driver names it), about 0.27 s an epoch here, and a restart takes 5-7 s (an actor, a DHT, the state): at 12
# epochs, and at 30 in 2 runs of 7, the restarted peer came back after the others were done
CHURN_EPOCHS = 60


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory, none_ten_epochs):
    out = tmp_path_factory.mktemp("sgp")
    found = {"none": (None, none_ten_epochs)}
    churn = (CHURN, f"optim.epochs={CHURN_EPOCHS}")
    for name, extra in (("sync", ()), ("overlap", ("gossip.overlap=true",)), ("churn", churn)):
        result = run_experiment(quick_config(*SGP, *extra), out)
        found[name] = (result, read_metrics(result.run_dir))
    return found


def final(metrics):
    """The run's last epoch's rows (`none`'s is its 10th)."""
    return metrics[metrics.epoch == metrics.epoch.max()]


@pytest.mark.parametrize("mode", ["sync", "overlap"])
def test_the_quickstart_learns_and_agrees_as_with_averaging(runs, mode):
    result, metrics = runs[mode]
    none = runs["none"][1]
    assert result.exit_code == 0
    assert sorted(metrics.groupby("peer")["epoch"].apply(list)) == [list(range(1, EPOCHS + 1))] * 4
    last = final(metrics)
    print(f"{mode}: test_acc {last.test_acc.mean():.4f}, consensus {last.consensus_dist.iloc[0]:.3g} against "
          f"{final(none).consensus_dist.iloc[0]:.3g} without communication")  # fmt: skip
    assert last.test_acc.mean() >= 0.95
    assert last.consensus_dist.iloc[0] <= 0.1 * final(none).consensus_dist.iloc[0]
    rounds = 6 * EPOCHS  # a round is one send: ok when the target accepted it
    if mode == "sync":  # lockstep: every round delivers, every peer adds one message per round
        assert (last.averaging_rounds_ok == rounds).all() and (last.averaging_rounds_failed == 0).all()
        assert (metrics.messages_received == 6).all() and (metrics.messages_dropped == 0).all()
        assert metrics.averaging_group_size.notna().all()
    else:  # on a loaded machine a round may find two sends still in flight and send none: counted as failed (CI's
        # busier machine: one peer 64 of 72, here 70-72); every round is counted once (a send still in flight at the
        # end, at most MAX_IN_FLIGHT = 2, is not counted yet), and most deliver
        assert (last.averaging_rounds_ok + last.averaging_rounds_failed).between(rounds - 2, rounds).all()
        assert (last.averaging_rounds_ok >= 0.75 * rounds).all()
        assert (metrics.groupby("peer").messages_received.sum() >= 0.75 * rounds).all()
        assert metrics.messages_received.sum() <= last.averaging_rounds_ok.sum(), "a peer adds only what was sent"
    assert (metrics.averaging_group_size.dropna() == 2).all()  # (overlapped: an epoch whose rounds all failed has none)
    params = sum(p.numel() for p in build_model(quick_config().model, 10, (1, 8, 8)).parameters())
    sent = metrics.groupby("peer").averaging_bytes.sum()
    assert (metrics.bytes_source == "measured").all()
    assert (sent >= 4 * params * last.set_index("peer").averaging_rounds_ok).all(), "a message's float32 parts"


def test_a_kill_a_join_and_a_leave(runs):
    """Peer 1 is killed after epoch 3 and restarted, a fifth peer joins once the swarm has done epoch 3, peer 2 leaves
    after epoch 6: the newcomers take the swarm's state (with push-sum weight 1), the dead peer's mass is lost, and the
    run ends no lower than 0.02 below the fault-free one."""
    result, metrics = runs["churn"]
    events = read_events(result.run_dir)
    print(events.to_string())
    assert result.exit_code == 0
    for peer, kind in ((1, "restarted"), (4, "joined")):
        assert set(events[events.peer == peer].event) >= {kind, "state_downloaded"}
        rows = metrics[(metrics.peer == peer) & (metrics.restarts == (1 if peer == 1 else 0))].sort_values("epoch")
        first = int(rows.epoch.iloc[0])
        assert 2 <= first < CHURN_EPOCHS - 2, first  # (back while the others train)
        assert rows.epoch.tolist() == list(range(first, CHURN_EPOCHS + 1)), rows.epoch.tolist()
    assert metrics[metrics.peer == 2].epoch.max() == 6 and "left" in set(events[events.peer == 2].event)
    last, fault_free = final(metrics), final(runs["sync"][1])
    assert sorted(last.peer) == [0, 1, 3, 4]
    print(f"final test_acc {last.test_acc.mean():.4f}, fault-free {fault_free.test_acc.mean():.4f}")
    assert last.test_acc.mean() >= fault_free.test_acc.mean() - 0.02  # (a run with faults may also end higher)
    # averaging went on through the churn: every peer in the run at its end added messages in every epoch from its
    # first epoch with one on, and that came within its first four. (A newcomer's state is some rounds behind the
    # swarm's, which does about 20 rounds a second here: until it has caught up, its messages come too late for the
    # others and theirs too early for it, both refused and their mass kept; seen: a joiner's first three epochs.)
    # CI saw a joiner get none in its first epochs for another reason, fixed: the killed peer stayed in the views
    # until its record expired, and every round whose in-neighbour it was waited out its timeout
    for _, rows in metrics[metrics.peer.isin([0, 1, 3, 4])].groupby("peer"):
        received = rows[rows.restarts == rows.restarts.max()].sort_values("epoch").messages_received.tolist()
        entered = next((i for i, count in enumerate(received) if count >= 1), len(received))
        assert entered <= 3 and min(received[entered:]) >= 1, received
    consensus, none = last.consensus_dist.iloc[0], final(runs["none"][1]).consensus_dist.iloc[0]
    print(f"final consensus {consensus:.3g}, {none:.3g} without communication")
    assert consensus <= 0.1 * none  # (the fault-free runs' bar: every peer trains on together to the end)
