"""The churn decisions as pure functions over plain data: policy (restart, give up, kill a wedged peer), the
scenario's timing, and the collector's bookkeeping when peers die, restart and join. No Ray."""

from __future__ import annotations

import numpy as np
import pytest

from launcher.driver.collect import EpochCollector
from launcher.driver.lifecycle import Phase
from launcher.driver.policy import Decision, GroupView, PeerView, decide, exit_code, stall_deadline
from launcher.driver.scenario import Clock, Scenario
from launcher.driver.swarm import Incarnation, gone_peer_ids
from tests.test_collect import make_row
from workers.core.config import FaultsConfig, ScenarioEvent
from workers.core.errors import ConfigError
from workers.core.protocol import Report

FAULTS = FaultsConfig(max_restarts=2, stall_factor=3, stall_min_s=20, poll_timeout_s=10, start_timeout_s=100)


def test_a_dead_peer_is_restarted_until_its_budget_is_used_then_given_up():
    dead = [PeerView(0, "dead", restarts=0, reason="killed"), PeerView(1, "dead", restarts=2, reason="oom")]
    assert decide([*dead, PeerView(2, "running")], FAULTS) == [
        Decision("restart", 0, "killed"),
        Decision("give_up", 1, "oom; faults.max_restarts=2 used up"),
    ]


@pytest.mark.parametrize("up", ["running", "done"])
def test_a_newcomer_bootstraps_off_any_peer_whose_dht_is_up(up):
    """A peer that finished keeps its DHT and averager up to serve its state: a restart joins through it."""
    views = [PeerView(0, "dead", reason="killed", epoch=3), PeerView(1, up, epoch=10)]
    assert decide(views, FAULTS) == [Decision("restart", 0, "killed")]


def test_when_every_peer_died_at_once_one_restarts_the_swarm_from_the_newest_checkpoint_and_the_others_wait():
    views = [PeerView(0, "dead", reason="killed", epoch=3), PeerView(1, "dead", reason="killed", epoch=4),
             PeerView(2, "left", epoch=2)]  # fmt: skip
    first, second = decide(views, FAULTS)
    assert (first.action, first.peer, first.donor) == ("reseed", 0, 1), "peer 1's checkpoint of epoch 4 is newest"
    assert "no peer's DHT is up" in first.reason and "epoch 4" in first.reason
    assert (second.action, second.peer) == ("wait", 1)
    reseeding = [PeerView(0, "starting", restarts=1, reseeding=True), views[1]]
    assert [d.action for d in decide(reseeding, FAULTS)] == ["wait"], "until the reseeded peer's DHT is up"
    up = [PeerView(0, "running", restarts=1), views[1]]
    assert [d.action for d in decide(up, FAULTS)] == ["restart"]


def test_without_any_checkpoint_a_swarm_that_died_is_given_up_not_started_afresh():
    views = [PeerView(0, "dead", reason="killed"), PeerView(1, "dead", reason="killed")]
    assert [(d.action, "no peer saved a checkpoint" in d.reason) for d in decide(views, FAULTS)] == [
        ("give_up", True), ("give_up", True)]  # fmt: skip


def test_a_groups_dead_member_restarts_the_whole_group_from_the_newest_checkpoint():
    """The all-reduce baseline: one collective, fixed membership. A death stops it for all (elastic restart)."""
    views = [PeerView(0, "running", epoch=4), PeerView(1, "dead", reason="killed", epoch=3), PeerView(2, "running",
             epoch=4)]  # fmt: skip
    (decision,) = decide(views, FAULTS, group=GroupView(members=3, restarts=0))
    assert (decision.action, decision.donor) == ("restart_group", 0)
    assert "peer 1: killed" in decision.reason and "peer 0's checkpoint of epoch 4" in decision.reason
    assert decide([PeerView(0, "running"), PeerView(1, "running")], FAULTS, group=GroupView(2, 0)) == []


def test_a_group_restarts_when_a_member_leaves_and_gives_up_past_its_budget():
    left = [PeerView(0, "running", epoch=5), PeerView(1, "left", epoch=5), PeerView(2, "running", epoch=5)]
    (decision,) = decide(left, FAULTS, group=GroupView(members=3, restarts=1))
    assert decision.action == "restart_group" and "a member left" in decision.reason
    assert decide(left, FAULTS, group=GroupView(members=2, restarts=1)) == [], "absorbed: the group has 2 now"
    done = [PeerView(0, "done", epoch=10), PeerView(1, "running", epoch=9)]
    assert decide(done, FAULTS, group=GroupView(members=2, restarts=0)) == [], "a finished member is no leave"
    over = [PeerView(0, "running", epoch=2), PeerView(1, "dead", reason="oom", epoch=2)]
    give_up, restart = decide(over, FAULTS, group=GroupView(members=2, restarts=2))
    assert (give_up.action, give_up.peer, restart.action) == ("give_up", 1, "restart_group")
    assert "faults.max_restarts=2 group restarts used up" in give_up.reason


@pytest.mark.parametrize(
    "view, expected",
    [
        (PeerView(0, "running", hivemind_error="its hivemind process p2pd (pid 7) died"), "p2pd (pid 7) died"),
        (PeerView(0, "running", poll_age_s=10.5), "did not answer a status poll for 10 s"),
        (PeerView(0, "running", progress_age_s=21), "no training progress for 21 s (deadline 20 s)"),
        (PeerView(0, "running", progress_age_s=31, epoch_s=10), "no training progress for 31 s (deadline 30 s)"),
        (PeerView(0, "starting", phase_s=101), "did not start within faults.start_timeout_s=100 s"),
        (PeerView(0, "starting", phase_s=181, start_s=80), "start_timeout_s=100 s + 80 s for its state's download"),
    ],
)
def test_a_wedged_peer_is_killed_with_the_reason(view, expected):
    (decision,) = decide([view], FAULTS)
    assert decision.action == "kill" and expected in decision.reason


@pytest.mark.parametrize(
    "view",
    [
        PeerView(0, "running", progress_age_s=29, epoch_s=10, poll_age_s=9.9),  # a slow epoch, not a stall
        PeerView(0, "starting", phase_s=99, poll_age_s=50),  # a starting peer answers no polls yet
        PeerView(0, "starting", phase_s=179, start_s=80),  # a big state on a slow link takes that long
        PeerView(0, "done", progress_age_s=1000),
        PeerView(0, "left"),
        PeerView(0, "given_up"),
    ],
)
def test_a_healthy_or_finished_peer_is_left_alone(view):
    assert decide([view], FAULTS) == []


def test_the_stall_deadline_follows_the_peers_own_epoch_time_and_its_longest_round():
    assert stall_deadline(None, FAULTS) == 20
    assert stall_deadline(5, FAULTS) == 20
    assert stall_deadline(50, FAULTS) == 150
    assert stall_deadline(5, FAULTS, round_s=35) == 70, "a round that times out is not a stall"
    assert decide([PeerView(0, "running", progress_age_s=65)], FAULTS, round_s=35) == []


def test_exit_code():
    done = [PeerView(0, "done"), PeerView(1, "left")]
    assert exit_code(done, interrupted=False) == 0
    assert exit_code([*done, PeerView(2, "given_up")], interrupted=False) == 1
    assert exit_code(done, interrupted=True) == 130


def events(*raw: dict) -> list[ScenarioEvent]:
    return [ScenarioEvent(**e) for e in raw]


def test_scenario_events_fire_once_at_their_moment():
    scenario = Scenario(
        events(
            {"at_epoch": 3, "peer": 1, "event": "kill"},
            {"at_s": 40, "event": "join"},
            {"at_epoch": 5, "peer": 2, "event": "leave"},
            {"peer": 3, "event": "slow", "factor": 3},
            {"at_s": 10, "event": "join"},
        ),  # fmt: skip
        peers=4,
    )
    start = scenario.due(Clock(0, 0, {0: 0, 1: 0, 2: 0, 3: 0}))
    assert [(a.event.event, a.peer, a.leave_after) for a in start] == [("leave", 2, 5), ("slow", 3, None)]
    assert scenario.due(Clock(5, 2, {0: 2, 1: 2, 2: 2, 3: 2})) == []
    (kill,) = scenario.due(Clock(9, 2, {0: 3, 1: 3, 2: 2, 3: 2}))
    assert (kill.event.event, kill.peer) == ("kill", 1)
    (first_join,) = scenario.due(Clock(10.5, 3, {0: 3}))
    (second_join,) = scenario.due(Clock(41, 5, {0: 5}))
    assert (first_join.peer, second_join.peer) == (4, 5), "joiners get the next free indices"
    assert scenario.due(Clock(100, 9, {0: 9})) == [] and scenario.pending == []


def test_an_event_for_a_peer_that_is_not_running_waits_for_it():
    scenario = Scenario(events({"at_epoch": 2, "peer": 1, "event": "kill"}), peers=2)
    assert scenario.due(Clock(30, 4, {0: 4})) == []  # peer 1 is restarting
    assert [a.peer for a in scenario.due(Clock(31, 4, {0: 4, 1: 4}))] == [1]


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"event": "kill", "peer": 1}, "kill needs at_epoch or at_s"),
        ({"event": "join", "peer": 1, "at_s": 3}, "a join takes no peer"),
        ({"event": "leave", "at_epoch": 3}, "leave: needs peer: N"),
        ({"event": "slow", "peer": 1}, "slow needs factor"),
        ({"event": "kill", "peer": 1, "at_s": 3, "at_epoch": 2}, "not both"),
        ({"event": "kill", "peer": 9, "at_s": 3}, "scenario.0.peer=9: the swarm has peers 0..3"),
        ({"event": "kill", "peer": 1, "at_epoch": 10}, "scenario.0.at_epoch=10: the run ends after epoch 10"),
        ({"event": "explode", "peer": 1}, "scenario.0.event='explode'"),
        ({"event": "leave", "peer": 1, "at_s": 3, "process": "dht"}, "only a kill names a process"),
    ],
)
def test_a_bad_scenario_is_refused_at_load_time_naming_the_field(raw, message):
    from tests.conftest import quick_config

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        quick_config("optim.epochs=10", f"scenario=[{raw}]")


def test_a_dht_kill_means_nothing_to_allreduce_and_is_refused():
    from tests.conftest import quick_config

    with pytest.raises(ConfigError, match="scenario.0.process=dht: the allreduce baseline uses no DHT"):
        quick_config("gossip.method=allreduce", "scenario=[{event: kill, peer: 1, at_epoch: 2, process: dht}]")
    assert quick_config("gossip.method=allreduce", "scenario=[{event: kill, peer: 1, at_epoch: 2}]").scenario


def report(peer: int, epoch: int, position: float) -> Report:
    return Report(make_row(peer, epoch), np.array([position, 0.0]))


def test_the_collector_waits_for_a_restarted_peer_only_from_its_first_epoch():
    collector = EpochCollector(range(3))
    collector.add(report(0, 1, 0.0))
    collector.add(report(1, 1, 0.0))
    (epoch1,) = collector.drop_peer(2)  # peer 2 died during epoch 1
    assert [r.peer for r in epoch1] == [0, 1] and epoch1[0].consensus_peers == 2
    collector.add(report(0, 2, 0.0))
    collector.expect(2, first_epoch=3)  # restarted with the state of the end of epoch 2
    (epoch2,) = collector.add(report(1, 2, 2.0))
    assert [r.peer for r in epoch2] == [0, 1], "epoch 2 does not wait for the newcomer"
    collector.add(report(0, 3, 0.0))
    assert collector.add(report(1, 3, 0.0)) == [], "epoch 3 does"
    (epoch3,) = collector.add(report(2, 3, 3.0))
    assert [r.peer for r in epoch3] == [0, 1, 2] and epoch3[0].consensus_peers == 3
    assert collector.swarm_epoch == 3


def test_a_late_report_for_a_finished_epoch_is_measured_against_that_epochs_rows():
    collector = EpochCollector(range(2))
    collector.add(report(0, 4, 0.0))
    collector.add(report(1, 4, 0.0))
    collector.expect(2, first_epoch=4)  # a joiner that took a state from before epoch 4 ended
    (late,) = collector.add(report(2, 4, 3.0))
    (row,) = late
    assert row.peer == 2 and row.consensus_peers == 3
    assert row.consensus_dist == pytest.approx(np.sqrt((1 + 1 + 4) / 3))


def test_every_phase_change_is_in_the_one_table():
    from launcher.driver.lifecycle import TRANSITIONS, InvalidTransition, Phase, Signal, advance

    assert advance(Phase.STANDBY, Signal.LAUNCHED) == advance(Phase.DEAD, Signal.LAUNCHED) == Phase.STARTING
    assert advance(Phase.STARTING, Signal.JOINED) == Phase.RUNNING
    assert advance(Phase.RUNNING, Signal.FINISHED) == Phase.DONE and advance("running", "left") == Phase.LEFT
    assert advance(Phase.RUNNING, Signal.DIED) == advance(Phase.STARTING, Signal.DIED) == Phase.DEAD
    assert advance(Phase.DEAD, Signal.GAVE_UP) == Phase.GIVEN_UP
    for phase, signal in [(Phase.DONE, Signal.JOINED), (Phase.GIVEN_UP, Signal.LAUNCHED), (Phase.LEFT, Signal.DIED),
                          (Phase.RUNNING, Signal.LAUNCHED), (Phase.STANDBY, Signal.JOINED)]:  # fmt: skip
        with pytest.raises(InvalidTransition, match=f"phase {phase} cannot take signal {signal}"):
            advance(phase, signal)
    assert {phase for phase, _ in TRANSITIONS} | set(TRANSITIONS.values()) == set(Phase), "every phase is reachable"


def test_no_phase_is_set_outside_the_lifecycle_table():
    """The driver changes a peer's phase in one place (Swarm._signal, through lifecycle.advance): nowhere else does
    its code assign a phase."""
    import ast

    from tests.conftest import ROOT

    assignments = []
    for path in (ROOT / "launcher").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for function in [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)]:
            for node in ast.walk(function):
                targets = node.targets if isinstance(node, ast.Assign) else []
                names = [t for target in targets for t in (target.elts if isinstance(target, ast.Tuple) else [target])]
                if any(isinstance(t, ast.Attribute) and t.attr == "phase" for t in names):
                    assignments.append(f"{path.name}:{function.name}")
    assert assignments == ["swarm.py:_signal"]


def test_the_peers_are_told_the_latest_dead_incarnations_each_once():
    """What the driver names to push-sum's live sets (workers/averaging/liveness.py): dead and given-up incarnations,
    newest first, each PeerID once (an incarnation being replaced is in both the retired list and the peers), at most
    `limit`; never a live one, nor one that died before its DHT was up (no multiaddrs)."""

    def incarnation(peer: int, phase: Phase, since: float, pid: str | None) -> Incarnation:
        maddrs = [f"/ip4/127.0.0.1/tcp/{4000 + peer}/p2p/{pid}"] if pid else []
        return Incarnation(peer, 0, None, "node", phase=phase, since=since, maddrs=maddrs)

    old = incarnation(1, Phase.DEAD, 5.0, "QmOld")
    everyone = [old, old, incarnation(0, Phase.RUNNING, 1.0, "QmRun"), incarnation(2, Phase.GIVEN_UP, 7.0, "QmGave"),
                incarnation(3, Phase.DEAD, 9.0, None), incarnation(4, Phase.LEFT, 8.0, "QmLeft"),
                incarnation(5, Phase.DONE, 8.0, "QmDone"), incarnation(6, Phase.DEAD, 2.0, "QmOlder")]  # fmt: skip
    assert gone_peer_ids(everyone) == ("QmGave", "QmOld", "QmOlder")
    assert gone_peer_ids(everyone, limit=2) == ("QmGave", "QmOld")
