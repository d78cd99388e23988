"""Sticky groups (workers/averaging/sticky.py) with real hivemind peers on loopback, in this process: a group that is
the whole live swarm is reused, averages exactly, keeps one attempt counter on every member, and falls back to
matchmaking when a member is SIGKILLed or a newcomer arrives; a stranger's liveness record changes nothing. hivemind
keeps the group where the gloo transport does not (`Levers(gloo=False)` here; the gloo rounds: tests/test_gloo.py)."""

from __future__ import annotations

import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import torch
from torch import nn

from workers.averaging.gossip import GossipAveraging
from workers.averaging.levers import Levers
from workers.core.config import GossipConfig

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

HIVEMIND = Levers(gloo=False)  # the sticky group's rounds through hivemind
CFG = GossipConfig(group_size=16, matchmaking_time=2.0, round_timeout=20.0)  # sticky_wait: 2 + 1 s


class Swarm:
    """Peers of one prefix, each a GossipAveraging over a small model, whose rounds run together."""

    def __init__(self, dhts, prefix: str, levers: Levers | None = None, **options):
        self.dhts, self.prefix, self.levers, self.options = dhts, prefix, levers or HIVEMIND, options
        self.peers: list[GossipAveraging] = []
        self.pool = ThreadPoolExecutor(8)

    def add(self, dht=None) -> GossipAveraging:
        torch.manual_seed(len(self.peers))
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        dht = dht or self.dhts(1)[0]
        peer = GossipAveraging(model, dht, CFG, self.prefix, levers=self.levers, **self.options)
        self.peers.append(peer)
        for each in self.peers:
            each.set_swarm_size(len(self.peers))
        return peer

    def round(self, peers: list[GossipAveraging], skew_s: float = 0.0) -> list[dict]:
        """New values on every peer, then a round with arrivals up to `skew_s` apart: per peer, its group size (None:
        failed), its largest error against the exact mean of the group's values, its sticky group."""
        with torch.no_grad():
            for peer in peers:
                for tensor in peer.tensors:
                    tensor.normal_()
        sent = {id(peer): [t.clone().double() for t in peer.tensors] for peer in peers}
        delays = [random.uniform(0, skew_s) for _ in peers]
        sizes = list(self.pool.map(lambda peer, delay: time.sleep(delay) or peer.average(), peers, delays))
        exact = [sum(ts) / len(peers) for ts in zip(*sent.values(), strict=True)]
        reports = [peer.averager.sticky_report() for peer in peers]
        return [dict(size=size, group=report["group"], counts=report["counts"],
                     error=max(float((t.double() - e).abs().max()) for t, e in zip(peer.tensors, exact, strict=True)))
                for peer, size, report in zip(peers, sizes, reports, strict=True)]  # fmt: skip

    def shutdown(self) -> None:
        self.pool.shutdown()
        for peer in self.peers:
            peer.shutdown()


@pytest.fixture
def swarm(dhts):
    made = []

    def make(prefix: str, size: int, **options) -> Swarm:
        made.append(Swarm(dhts, prefix, **options))
        for dht in dhts(size):
            made[-1].add(dht)
        return made[-1]

    yield make
    for each in made:
        each.shutdown()


def assert_one_sticky_round(results: list[dict], size: int) -> None:
    """Every peer averaged exactly, in one sticky group (the same base id and attempt counter on every member)."""
    assert [r["size"] for r in results] == [size] * len(results), results
    assert max(r["error"] for r in results) < 1e-5, results
    groups = {r["group"] for r in results}
    assert len(groups) == 1 and None not in groups and next(iter(groups))[2] == size, groups


def test_a_group_of_the_whole_swarm_sticks_averages_exactly_and_keeps_one_counter(swarm):
    peers = swarm("steady", 3)
    first = peers.round(peers.peers)
    assert [r["size"] for r in first] == [3] * 3 and all(r["counts"].get("formed") == 1 for r in first)
    counters = [first[0]["group"][1]]
    for _ in range(5):  # arrivals up to 1.5 s apart: within sticky_wait (3 s)
        results = peers.round(peers.peers, skew_s=1.5)
        assert_one_sticky_round(results, 3)
        counters.append(results[0]["group"][1])
    assert counters == list(range(6)), "one attempt per round, the same on every member"
    assert all(r["counts"].get("sticky") == 5 and not r["counts"].get("sticky_failed") for r in results)


def kill(peer: GossipAveraging) -> None:
    """SIGKILL a peer's hivemind: its averager's and DHT's processes and its p2pd daemon."""
    dht = psutil.Process(peer.averager.dht.pid)
    for process in [psutil.Process(peer.averager.pid), *dht.children(recursive=True), dht]:
        os.kill(process.pid, signal.SIGKILL)


def test_a_sigkilled_member_costs_the_survivors_one_round_then_they_stick_again(swarm):
    peers = swarm("kill", 3, levers=Levers(live_ttl=3.0, gloo=False))  # the dead one's record expires within 3 s
    for _ in range(2):
        peers.round(peers.peers)
    survivors, dead = peers.peers[:2], peers.peers[2]
    kill(dead)
    for peer in survivors:
        peer.set_swarm_size(2)  # what the driver does when it notices the death
    history = [peers.round(survivors) for _ in range(3)]
    time.sleep(3.0)
    history += [peers.round(survivors) for _ in range(2)]
    print("after the kill, per round and survivor (group size, sticky attempt):",
          [[(r["size"], r["group"] and r["group"][1]) for r in results] for results in history])  # fmt: skip
    failed = [sum(r[i]["size"] is None for r in history) for i in range(2)]
    assert failed[0] <= 1 and failed[1] <= 1, history
    assert all(r["error"] < 1e-5 for results in history for r in results if r["size"]), "no partial average"
    assert_one_sticky_round(history[-1], 2)


def wait_until_live(peers: list[GossipAveraging], prefix: str, count: int, timeout: float = Levers().live_ttl) -> None:
    """Until each of `peers` reads `count` live records under the sticky groups' key from its DHT, as its rounds read
    it (local storage first): a store takes longer on a loaded machine than the 0.5 s this test once slept."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [peer.averager.dht.get(f"{prefix}.live") for peer in peers]
        if all(f is not None and sum(item.value is True for item in f.value.values()) >= count for f in found):
            return
        time.sleep(0.1)
    raise AssertionError(f"{count} liveness records not read by every peer within {timeout} s")


def test_a_newcomer_is_picked_up_and_the_group_of_all_sticks(swarm):
    peers = swarm("newcomer", 2)
    for _ in range(2):
        peers.round(peers.peers)
    peers.add()  # its averager's liveness record: the others drop their group at their next round
    # the members see the newcomer's record (it stores to every node); its own view of theirs waits for their next
    # renewal (live_ttl / 3), which its first rounds do not need: it has no group to keep
    wait_until_live(peers.peers[:-1], "newcomer", 3)  # (a joining peer downloads the swarm's state meanwhile)
    history = [peers.round(peers.peers) for _ in range(3)]
    assert [r["size"] for r in history[0]] == [3, 3, 3], "matchmaking met the newcomer at once"
    assert all(r["error"] < 1e-5 for results in history for r in results)
    assert_one_sticky_round(history[-1], 3)


def test_a_strangers_liveness_record_is_ignored(swarm, dhts):
    """A closed swarm: members publish their proofs (workers/averaging/admission.py). A DHT node without a proof
    declares itself live under the run's key: the members' group still sticks."""
    from hivemind.utils.timed_storage import get_dht_time

    from workers.averaging.admission import publish_membership
    from workers.core.membership import new_swarm_key

    key = new_swarm_key()
    nodes = dhts(3)
    for dht in nodes:
        publish_membership(dht, "closed", key)
    peers = Swarm(dhts, "closed", swarm_key=key)
    try:
        for dht in nodes:
            peers.add(dht)
        (stranger,) = dhts(1)
        stranger.store("closed.live", subkey=stranger.peer_id.to_bytes(), value=True,
                       expiration_time=get_dht_time() + 600)  # fmt: skip
        assert len(nodes[0].get("closed.live", latest=True).value) == 4, "the stranger's record is there"
        for _ in range(2):
            peers.round(peers.peers)
        assert_one_sticky_round(peers.round(peers.peers), 3)
    finally:
        peers.shutdown()
