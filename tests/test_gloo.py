"""Gossip rounds of the whole swarm over gloo (workers/averaging/gloo.py): the pure decision who forms a group, real
gloo process groups on loopback (one per thread, met at a real TCPStore), and real hivemind peers in this process
whose rounds move onto gloo after a matchmade round, leave it together when the swarm changes, fall back to hivemind
at once when a member goes, and leave the group to hivemind where a peer gave up on gloo (a group that did not form, a
round out of time). (A SIGKILLed peer's gloo group: test_churn's gossip runs, gloo being the default.)"""

from __future__ import annotations

import gc
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

from workers.averaging import gloo
from workers.averaging.gossip import GossipAveraging
from workers.core.config import GossipConfig

pytestmark = pytest.mark.timeout(120)

OFFER = dict(gloo="127.0.0.1:1", swarm=3, led=0)


def test_every_member_plans_the_same_group_or_none():
    gathered = {b"c": dict(OFFER, gloo="h:3"), b"a": dict(OFFER, gloo="h:1", led=4), b"b": dict(OFFER, gloo="h:2")}
    plans = [gloo.plan(gathered, me, b"key") for me in (b"a", b"b", b"c")]
    assert [p.rank for p in plans] == [0, 1, 2], "ranks in PeerID order"
    assert {(p.address, p.prefix, p.size) for p in plans} == {("h:1", plans[0].prefix, 3)}, "met at rank 0's store"
    led = gathered | {b"a": dict(gathered[b"a"], led=5)}
    assert gloo.plan(led, b"a", b"key").prefix != plans[0].prefix, "each group rank 0 leads meets under a new prefix"
    assert gloo.plan(gathered, b"a", b"other").prefix != plans[0].prefix, "a stranger cannot derive the prefix"
    assert gloo.plan(gathered | {b"b": dict(OFFER, swarm=4)}, b"a", None) is None, "one counts 4: not all"
    assert gloo.plan(gathered | {b"b": None}, b"a", None) is None, "one offers no rendezvous"
    assert gloo.plan({b"a": dict(OFFER, swarm=1)}, b"a", None) is None, "a group of one"


def test_the_announced_ipv4_is_the_rendezvous_host():
    assert gloo.ip4_host(["/ip6/::1/tcp/1", "/ip4/10.0.0.2/tcp/31337/p2p/Qm"]) == "10.0.0.2"
    assert gloo.ip4_host(["/ip6/::1/tcp/1"]) is None


MADE: list[gloo.GlooRounds] = []


@pytest.fixture(autouse=True)
def released():
    """Every GlooRounds a test made is shut down, and every gloo object left in a reference cycle (a failed
    collective's traceback, kept by pytest.raises) collected, in this process, even if the test failed: one collected
    as garbage in a process forked from this one (a later test's DHT) crashed it (the suite saw a segfault, then a
    DHT that never came up)."""
    yield
    while MADE:
        MADE.pop().shutdown()
    gc.collect()


def rounds_of(timeout_s: float) -> gloo.GlooRounds:
    MADE.append(gloo.GlooRounds("127.0.0.1", timeout_s))
    return MADE[-1]


def formed(size: int, timeout_s: float = 10.0) -> list[gloo.GlooRounds]:
    """`size` GlooRounds of one group, formed as after a matchmade round."""
    rounds = [rounds_of(timeout_s) for _ in range(size)]
    gathered = {bytes([i]): each.offer(size) for i, each in enumerate(rounds)}
    for i, each in enumerate(rounds):
        each.form(gathered, bytes([i]))
    assert all(each.ready() for each in rounds)
    return rounds


def test_a_round_moves_alpha_of_the_way_to_the_mean_one_result_on_every_member():
    members = formed(3)
    values = [[torch.randn(1000), torch.randn(7, dtype=torch.float64)] for _ in members]
    for alpha in (0.5, 1.0):
        tensors = [[t.clone() for t in ts] for ts in values]
        with ThreadPoolExecutor(3) as pool:
            sizes = list(pool.map(lambda m, t, a: m.run(t, a, leave=False), members, tensors, [alpha] * 3))
        assert sizes == [3, 3, 3] and all(m.group is not None for m in members), "nobody wished to leave"
        for k in range(2):
            mean = sum(v[k].double() for v in values) / 3
            for own, moved in zip(values, tensors, strict=True):
                assert torch.allclose(moved[k].double(), own[k].double() + alpha * (mean - own[k].double()), atol=1e-5)
    assert all(torch.equal(tensors[0][k], other[k]) for other in tensors[1:] for k in range(2)), "alpha 1: bitwise one"


def test_one_wish_to_leave_dissolves_the_group_on_every_member_after_the_same_round():
    members = formed(3)
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda i: members[i].run([torch.ones(4)], 1.0, leave=i == 2), range(3)))
    assert [m.group for m in members] == [None] * 3


def test_a_member_that_shuts_its_group_down_fails_the_others_at_once():
    members = formed(3, timeout_s=20.0)
    with ThreadPoolExecutor(2) as pool:
        started = time.monotonic()
        waiting = [pool.submit(m.run, [torch.ones(10)], 1.0, False) for m in members[:2]]
        time.sleep(0.5)
        members[2].shutdown()
        for future in waiting:
            with pytest.raises(RuntimeError):
                future.result(timeout=15)
    assert time.monotonic() - started < 5, "failed at once, not after the 20 s timeout"
    assert [m.group for m in members[:2]] == [None, None], "and left the group"


def test_a_peer_gives_up_on_gloo_after_a_group_that_did_not_form_and_a_round_out_of_time():
    alone = rounds_of(1.0)
    offers = {b"a": alone.offer(2), b"b": dict(OFFER, gloo=alone.address, swarm=2)}  # b never comes
    alone.form(offers, b"a")
    assert not alone.ready() and alone.setbacks == 1, "the group did not form within the timeout"
    slow, gone = formed(2, timeout_s=1.0)
    with pytest.raises(RuntimeError):
        slow.run([torch.ones(4)], 1.0, leave=False)  # its groupmate never runs the round
    assert slow.setbacks == 1 and slow.group is None, "out of time: a setback, and the group left"
    assert slow.offer(2)["gloo"] is not None
    slow.setbacks = alone.setbacks = gloo.SETBACKS
    assert slow.offer(2)["gloo"] is None and gloo.plan({b"a": slow.offer(2), b"b": gone.offer(2)}, b"a", None) is None


CFG = GossipConfig(group_size=16, matchmaking_time=2.0, round_timeout=20.0)


def round_of(peers: list[GossipAveraging], pool) -> tuple[list, float]:
    """New values on every peer, one blocking round: its group sizes, and the largest error against the exact mean."""
    with torch.no_grad():
        for peer in peers:
            for tensor in peer.tensors:
                tensor.normal_()
    sent = [[t.clone().double() for t in peer.tensors] for peer in peers]
    sizes = list(pool.map(lambda peer: peer.average(), peers))
    exact = [sum(ts) / len(peers) for ts in zip(*sent, strict=True)]
    error = max(float((t.double() - e).abs().max()) for p in peers for t, e in zip(p.tensors, exact, strict=True))
    return sizes, error


def test_gossip_rounds_move_onto_gloo_leave_it_when_the_swarm_changes_and_fall_back_when_a_member_goes(dhts):
    peers, pool = [], ThreadPoolExecutor(4)
    try:
        for dht in dhts(3):
            torch.manual_seed(len(peers))
            model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
            peers.append(GossipAveraging(model, dht, CFG, "gloo-rounds"))
        for peer in peers:
            peer.set_swarm_size(3)
        assert round_of(peers, pool)[0] == [3, 3, 3], "matchmade"
        for _ in range(3):
            sizes, error = round_of(peers, pool)
            assert sizes == [3, 3, 3] and error < 1e-5 and all(p.gloo.group is not None for p in peers), "gloo"
        assert all(torch.equal(peers[0].tensors[0], p.tensors[0]) for p in peers[1:]), "one model, bitwise"
        assert all(p.averager.sticky_report()["group"] is None for p in peers), "one mechanism: hivemind keeps none"
        assert all(p.averager.part_bytes.value > 0 for p in peers), "the rounds' bytes are counted"

        peers[0].set_swarm_size(4)  # the driver told one member of a newcomer: all leave after this round
        assert round_of(peers, pool)[0] == [3, 3, 3] and all(p.gloo.group is None for p in peers)
        for peer in peers:
            peer.set_swarm_size(3)
        sizes, error = round_of(peers, pool)  # matchmade again, and the group formed again after it
        assert sizes == [3, 3, 3] and error < 1e-5
        assert round_of(peers, pool)[0] == [3, 3, 3] and all(p.gloo.group is not None for p in peers)

        gone = peers.pop()
        gone.shutdown()  # its group closes: the others' next collective fails at once, and hivemind takes the round
        for peer in peers:
            peer.set_swarm_size(2)
        started = time.monotonic()
        sizes, error = round_of(peers, pool)
        assert sizes == [2, 2] and error < 1e-5, "the same round, matchmade, with the survivors"
        assert time.monotonic() - started < peers[0].matchmaking_deadline + 2, "no wait for the gloo timeout"
    finally:
        pool.shutdown()
        for peer in peers:
            peer.shutdown()


def test_where_a_peer_gave_up_on_gloo_hivemind_keeps_the_group(dhts):
    peers, pool = [], ThreadPoolExecutor(3)
    try:
        for dht in dhts(3):
            torch.manual_seed(len(peers))
            peers.append(GossipAveraging(nn.Linear(16, 4), dht, CFG, "gave-up"))
        for peer in peers:
            peer.set_swarm_size(3)
        peers[0].gloo.setbacks = gloo.SETBACKS
        for _ in range(3):
            sizes, error = round_of(peers, pool)
            assert sizes == [3, 3, 3] and error < 1e-5 and all(p.gloo.group is None for p in peers)
        reports = [peer.averager.sticky_report() for peer in peers]
        assert all(r["counts"].get("sticky", 0) >= 1 for r in reports), reports
    finally:
        pool.shutdown()
        for peer in peers:
            peer.shutdown()
