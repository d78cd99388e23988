"""Push-sum (gossip.method: sgp) on real hivemind DHTs and p2p daemons on loopback, no training, no Ray: exactness on
8 endpoints (3 offsets), mixing on 7, the closed swarm against a stranger in a process of its own, overlapped rounds,
a dead peer. Peers run in this process, one thread per peer for a round."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import hivemind
import pytest
import torch
from hivemind.compression import NoCompression

from launcher.driver.swarm import peer_id_of
from tests.conftest import ROOT
from workers.averaging.admission import SwarmKeyAuthorizer
from workers.averaging.gossip import compression
from workers.averaging.liveness import latest_records
from workers.averaging.pushsum import PushSum
from workers.averaging.pushsum_wire import NOT_FINITE, push
from workers.core.anomalies import Anomalies
from workers.core.membership import membership_proof, new_swarm_key

pytestmark = pytest.mark.integration
SHAPES = [(64, 32), (32,), (16, 8, 3), (8,), (100,), (7, 7), (5,), (3, 3, 3), (12, 4), (1,)]


def start_dhts(count: int, first: hivemind.DHT | None = None, **kwargs) -> list[hivemind.DHT]:
    started: list[hivemind.DHT] = []
    for _ in range(count):
        root = first or (started[0] if started else None)
        initial = root.get_visible_maddrs() if root else []
        started.append(hivemind.DHT(initial_peers=initial, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True,
                                    **kwargs))  # fmt: skip
    return started


@pytest.fixture(scope="module")
def eight():
    started = start_dhts(8)
    yield started
    for dht in started:
        dht.shutdown()


def initial(index: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(index)
    return [torch.randn(shape, generator=gen) * (1 + index) + 3 * index for shape in SHAPES]


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def swarm(dhts, prefix: str, **kwargs) -> list[PushSum]:
    peers = [PushSum(dht, prefix, initial(i), **kwargs) for i, dht in enumerate(dhts)]
    for peer in peers:
        peer.join()
    for peer in peers:
        assert len(peer.wait_members(len(peers), timeout=20)) == len(peers)
    return peers


def rounds(peers, k: int, pool: ThreadPoolExecutor):
    """Round k on every peer at once; (results, counts) per peer."""
    results = list(pool.map(lambda peer: peer.round(k), peers))
    return results, [peer.take_counts() for peer in peers]


def relative_error(peer: PushSum, mean: torch.Tensor) -> float:
    return float((flat(peer.tensors) - mean).norm() / mean.norm())


def consensus_distance(peers, mean: torch.Tensor) -> float:
    return math.sqrt(sum(float((flat(p.tensors) - mean).square().sum()) for p in peers) / len(peers))


def shutdown(peers) -> None:
    for peer in peers:
        peer.shutdown()


@pytest.mark.timeout(120)
def test_eight_peers_average_exactly_in_three_rounds_and_not_in_two(eight):
    peers = swarm(eight, "t1", timeout=10.0)
    mean = torch.stack([flat(p.tensors) for p in peers]).mean(0)
    try:
        with ThreadPoolExecutor(len(peers)) as pool:
            for k in range(3):
                if k == 2:
                    assert min(relative_error(p, mean) for p in peers) > 0.1, "not averaged after two rounds"
                results, counts = rounds(peers, k, pool)
                assert all(r.sent and r.delivered and r.members == 8 for r in results), results
                assert all((c.sends, c.accepted, c.received, c.dropped) == (1, 1, 1, 0) for c in counts), counts
                assert all(c.bytes_sent >= 4 * mean.numel() for c in counts), "float32 parts, measured on the wire"
        for peer in peers:
            assert relative_error(peer, mean) < 1e-5
            assert abs(peer.weight - 1.0) < 1e-6
    finally:
        shutdown(peers)


@pytest.mark.timeout(120)
def test_seven_peers_mix_every_round_but_never_exactly(eight):
    peers = swarm(eight[:7], "t2", timeout=10.0)
    mean = torch.stack([flat(p.tensors) for p in peers]).mean(0)
    distances = [consensus_distance(peers, mean)]
    try:
        with ThreadPoolExecutor(len(peers)) as pool:
            for k in range(5):
                results, counts = rounds(peers, k, pool)
                assert all(r.delivered for r in results) and all(c.received == 1 for c in counts)
                distances.append(consensus_distance(peers, mean))
    finally:
        shutdown(peers)
    assert all(b < a for a, b in zip(distances, distances[1:], strict=False)), distances
    # offsets 1, 2, 4 over 7 peers: z_i <- (z_i + the sum of all) / 8, an eighth of the distance left, not 0
    assert abs(distances[3] / distances[0] - 1 / 8) < 1e-3, distances
    assert distances[5] > 1e-3 * distances[0]


@pytest.mark.timeout(150)
def test_a_closed_swarm_refuses_a_strangers_messages_and_a_members_non_finite_ones():
    """Two members on DHTs closed with the run's key; a stranger in a process of its own (the member's address, the
    prefix, the project's code, no key) sends its messages: refused, recorded as anomalies, never applied."""
    key, alarms = new_swarm_key(), [Anomalies(), Anomalies()]
    dhts = start_dhts(1, authorizer=SwarmKeyAuthorizer(key, alarms[0]))
    dhts += start_dhts(1, first=dhts[0], authorizer=SwarmKeyAuthorizer(key, alarms[1]))
    a, b = (PushSum(dht, "t3", initial(i), swarm_key=key, anomalies=alarms[i], timeout=10.0)
            for i, dht in enumerate(dhts))  # fmt: skip
    try:
        for peer in (a, b):
            peer.join()
        assert all(len(peer.wait_members(2, timeout=20)) == 2 for peer in (a, b))
        before = flat(a.tensors)
        copied = membership_proof(key, b.peer_id.to_bytes()).hex()  # b's proof, as if a stranger had read it
        done = subprocess.run([sys.executable, "-m", "tests.sgp_stranger", "t3", str(dhts[0].get_visible_maddrs()[0]),
                               str(before.numel()), copied], cwd=ROOT, capture_output=True, text=True,
                              timeout=90)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        got = json.loads(done.stdout.strip().splitlines()[-1])
        assert got["statuses"] == dict.fromkeys(("no proof", "other key", "copied proof"), "stranger"), got
        assert all(str(p) != got["peer_id"] for p in a.wait_members(3, timeout=3)), "no member of the graph"
        assert torch.equal(flat(a.tensors), before) and a.weight == 1.0
        assert a.take_counts().dropped == 3

        # a member's message with a part or a weight that is not finite
        poisoned = flat(b.tensors).float()
        poisoned[5] = float("nan")
        for bad, weight in ((poisoned, 0.5), (flat(b.tensors).float(), float("inf"))):
            sent = push(b._p2p, a.peer_id, a.handler_name, k=0, weight=weight, flat=bad, proof=b.live.proof,
                        codec=NoCompression())  # fmt: skip
            assert b._call(sent, timeout=20).status == NOT_FINITE
        assert torch.equal(flat(a.tensors), before) and a.weight == 1.0 and a.take_counts().dropped == 2
        time.sleep(0.5)  # (the anomalies' queue hands its items over in a thread)
        seen = {(what, who) for what, who, _ in alarms[0].take()}
        assert ("refused a push-sum message from a stranger", got["peer_id"]) in seen
        assert ("refused a non-finite push-sum part", str(b.peer_id)) in seen
        assert any(what == "DHT request without the swarm key" for what, _ in seen), seen

        # the members' own round: exactly their mean, nothing of the stranger's 50.0
        expected = (before + flat(b.tensors)) / 2
        with ThreadPoolExecutor(2) as pool:
            results, counts = rounds([a, b], 0, pool)
        assert all(r.delivered for r in results) and [c.received for c in counts] == [1, 1]
        for peer in (a, b):
            assert torch.allclose(flat(peer.tensors), expected, rtol=1e-6, atol=1e-6)
    finally:
        shutdown([a, b])
        for dht in dhts:
            dht.shutdown()


def mass_error(peers, mass: torch.Tensor) -> float:
    """How far sum_i w_i z_i is from `mass` (conserved while nothing is lost), relative."""
    total = sum(p.weight * flat(p.tensors) for p in peers)
    return float((total - mass).norm() / mass.norm())


@pytest.mark.timeout(90)
def test_synchronous_rounds_hold_early_messages_and_refuse_late_ones_whose_sender_keeps_the_mass(eight):
    a, b = swarm(eight[:2], "t4", timeout=2.0)
    mass = flat(a.tensors) + flat(b.tensors)
    try:
        first = a.round(5)  # b is not there: a waits out its timeout; its message waits at b for b's round 5
        assert first.delivered and first.seconds >= 1.9
        late = b.round(1)  # 4 rounds late at a: refused, the mass comes back; a's round 5 is here: no wait
        assert late.send_status == "late" and not late.delivered and late.seconds < 1.0, late
        assert a.take_counts().dropped == 1 and b.weight == 1.0
        assert b.take_counts().received == 0, "round 5's message is held until b's round 5"
        for peer, k in ((b, 5), (a, 6), (b, 6)):
            assert peer.round(k).delivered
        a.apply_due()  # (b's round 6, held at a since)
        assert a.weight + b.weight == 2.0 and mass_error([a, b], mass) < 1e-6
    finally:
        shutdown([a, b])


@pytest.mark.timeout(150)
def test_overlapped_rounds_add_messages_as_they_come_and_wait_only_two_rounds_ahead(eight):
    """A round waits only when its peer is more than 2 rounds ahead of the peer that sends to it (the paper's bounded
    delay); a message is added when it arrives, however far apart the two peers' rounds are. (A timeout of 2 s: "no
    wait" is under 0.5 s, a stall of the 4 peers' threads on a loaded machine stays under it.)"""
    timeout = 2.0
    peers = swarm(eight[:4], "t5", overlap=True, timeout=timeout)
    slow, others = peers[3], peers[:3]

    def settle():  # the sends land, then the additions they scheduled at their receivers
        for _ in range(2):
            for p in peers:
                p.flush()

    try:
        for k in range(6):  # in step: nobody waits
            assert all(p.round(k).seconds < 0.25 * timeout for p in peers)
            settle()
        before = flat(slow.tensors)
        waited = []
        for k in range(6, 10):  # the slow peer stops at round 5: the peers it sends to wait from round 8 on
            for index, p in enumerate(others):  # (a local step: the swarm was at its mean)
                p.tensors[0].add_(index + 1.0)
            waited += [p.round(k).seconds >= 0.9 * timeout for p in others]
            settle()
        assert sum(waited) == 2, waited  # its targets of rounds 6 and 7 (offsets 1 and 2), in rounds 8 and 9
        assert not torch.equal(flat(slow.tensors), before), "messages added as they came, without a round of its own"
        for k in range(6, 10):  # 3 rounds behind its targets: taken all the same
            assert slow.round(k).seconds < 0.25 * timeout
            settle()
        counts = [p.take_counts() for p in peers]
        assert sum(c.sends for c in counts) == sum(c.accepted for c in counts) == sum(c.received for c in counts) == 40
        assert sum(c.dropped for c in counts) == 0 and abs(sum(p.weight for p in peers) - len(peers)) < 1e-9
    finally:
        shutdown(peers)


@pytest.mark.timeout(90)
def test_a_local_step_taken_while_the_message_is_on_its_way_survives_the_mix_whole(eight):
    """SGP steps the numerator: the mix averages the parameters as sent, the steps since then are kept."""
    a, b = swarm(eight[:2], "t8", overlap=True, timeout=5.0)
    try:
        sent_a, sent_b = flat(a.tensors), flat(b.tensors)
        a.hold(True)  # b's message waits at a
        a.round(0)
        b.round(0)
        for peer in (a, b):
            peer.flush()
        with torch.no_grad():
            a.tensors[0].add_(1.0)  # a local step of a's
        step = flat(a.tensors) - sent_a
        a.hold(False)
        a.flush()
        assert torch.allclose(flat(a.tensors), (sent_a + sent_b) / 2 + step, atol=1e-5)
        assert torch.allclose(flat(b.tensors), (sent_a + sent_b) / 2, atol=1e-5) and a.weight == b.weight == 1.0
    finally:
        shutdown([a, b])


@pytest.mark.timeout(90)
def test_a_newcomer_far_behind_the_swarms_round_catches_up_instead_of_waiting_out_its_timeouts(eight):
    """A peer that took a state some rounds ago starts rounds behind: its messages come too late, the others' too
    early (refused both ways, their senders keep the mass), but they tell either side that the other moved on."""
    timeout = 5.0
    ahead = PushSum(eight[0], "t9", initial(0), timeout=timeout)
    ahead.join()
    for k in range(40):  # alone: nothing to wait for
        ahead.round(k)
    behind = PushSum(eight[1], "t9", initial(1), timeout=timeout)
    try:
        behind.join(expected=2)
        ahead.wait_members(2, timeout=20)
        with ThreadPoolExecutor(2) as pool:
            runs = [pool.submit(lambda: [ahead.round(k) for k in range(40, 45)]),
                    pool.submit(lambda: [behind.round(k) for k in range(20, 45)])]  # fmt: skip
            results = [run.result() for run in runs]
        assert all(r.seconds < 0.9 * timeout for rounds_of_one in results for r in rounds_of_one)
        assert [r.delivered for r in results[0][-2:] + results[1][-2:]] == [True] * 4, "in step from there on"
        assert ahead.weight + behind.weight == pytest.approx(2.0, abs=1e-9)
    finally:
        shutdown([ahead, behind])


@pytest.mark.timeout(120)
def test_a_newcomer_behind_peers_that_never_sent_to_it_does_not_wait_for_them(eight):
    """Two peers ten rounds ahead of a newcomer, in one graph of three once it is in: one of them never sent the
    newcomer a message (its rounds before went to the other), and the newcomer's round whose in-neighbour it is would
    wait for a message that never comes, while the two wait for the newcomer's message of their round (seen in a
    churn run: the swarm and a joiner waited for each other 4 s, a round's timeout). A receiver answers with its round,
    so a sender knows which of its target's sends have ended; and a peer more than its staleness window behind a member
    it heard of waits for nobody."""
    timeout = 10.0
    first = [PushSum(dht, "t14", initial(i), timeout=timeout) for i, dht in enumerate(eight[2:4])]
    newcomer = PushSum(eight[4], "t14", initial(2), timeout=timeout)
    try:
        for peer in first:
            peer.join(expected=2)
        with ThreadPoolExecutor(3) as pool:
            for k in range(40):  # two alone: each sends every round to the other
                results, _ = rounds(first, k, pool)
            assert all(r.delivered for r in results)
            newcomer.join(expected=3)
            assert [len(peer.wait_members(3, timeout=20)) for peer in first] == [3, 3]
            runs = [pool.submit(lambda peer=peer: [peer.round(k) for k in range(40, 46)]) for peer in first]
            runs.append(pool.submit(lambda: [newcomer.round(k) for k in range(30, 46)]))
            results = [run.result() for run in runs]
        slowest = max(r.seconds for rounds_of_one in results for r in rounds_of_one)
        assert slowest < 0.5 * timeout, f"a round waited {slowest:.1f} s"
        assert all(r.delivered for rounds_of_one in results for r in rounds_of_one[-2:]), "in step from there on"
        assert sum(peer.weight for peer in [*first, newcomer]) == pytest.approx(3.0, abs=1e-9)
    finally:
        shutdown([*first, newcomer])


def test_a_local_read_keeps_what_the_last_full_read_found_unless_its_own_record_is_later():
    full = {b"a": (10.0, True), b"b": (10.0, True), b"c": (10.0, True)}
    local = {b"a": (12.0, True), b"b": (11.0, False), b"d": (9.0, True)}  # b left (tombstone), c's store missed it
    assert latest_records(full, local) == {b"a": (12.0, True), b"b": (11.0, False), b"c": (10.0, True),
                                           b"d": (9.0, True)}  # fmt: skip
    assert latest_records(full, {b"c": (8.0, True)})[b"c"] == (10.0, True)  # an older copy does not replace it


async def records_held(_dht, node, key: str) -> int:
    """(In the DHT's process) how many subkeys of `key` the node holds in its own storage."""
    from hivemind.dht.routing import DHTID

    found = node.protocol.storage.get(DHTID.generate(source=key))
    return 0 if found is None else len(found.value)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("lean", [False, True], ids=["full-reads", "lean-dht"])
def test_a_dead_peer_does_not_block_the_others_and_leaves_the_graph(eight, lean):
    """`lean`: a DHT of its own 4 nodes, where the liveness records are stored straight to every node and read from
    the node's own storage (sgp's default in a launched swarm); else 4 nodes in the 12 of `eight`'s DHT: full reads."""
    own = start_dhts(4) if lean else start_dhts(4, first=eight[0])
    timeout, ttl = 1.5, 3.0
    peers = swarm(own, "t6", timeout=timeout, liveness_ttl=ttl, lean_dht=lean)
    if lean:  # every record was stored in every node's own storage (the lean reads see them without a traversal)
        assert [dht.run_coroutine(partial(records_held, key="t6.sgp_live")) for dht in own] == [4] * 4
    dead, survivors = peers[3], peers[:3]
    try:
        with ThreadPoolExecutor(4) as pool:
            results, _ = rounds(peers, 0, pool)
            assert all(r.delivered for r in results)
            own[3].shutdown()  # its p2pd and DHT die mid-run
            died, k, undelivered = time.monotonic(), 1, 0
            while any(len(p.members()) != 3 for p in survivors) and time.monotonic() - died < 20:
                results, _ = rounds(survivors, k, pool)
                assert all(r.seconds < timeout + 1.0 for r in results), results
                undelivered += sum(r.target == dead.peer_id and not r.delivered for r in results)
                k += 1
            shrunk_after = time.monotonic() - died
            assert undelivered >= 1 and shrunk_after < 4 * ttl
            for _ in range(2):
                results, counts = rounds(survivors, k, pool)
                k += 1
            assert all(r.delivered and r.seconds < timeout for r in results) and all(c.received == 1 for c in counts)
        # a peer that leaves overwrites its liveness record with a tombstone at once
        survivors[2].leave()
        record = own[0].get("t6.sgp_live", latest=True).value[survivors[2].peer_id.to_bytes()]
        assert record.value["live"] is False
        assert [len(p.wait_members(99, timeout=1.5)) for p in survivors[:2]] == [2, 2]  # (one read, < ttl)
    finally:
        started = time.monotonic()
        shutdown(peers)
        assert time.monotonic() - started < 15, "the dead one's too"
        for dht in own[:3]:
            dht.shutdown()


@pytest.mark.timeout(90)
def test_a_dead_peer_the_driver_names_leaves_the_views_at_once():
    """The driver names a dead incarnation by the PeerID in its multiaddrs: the others drop it from their views then,
    where its record (ttl 30 s here) would keep it, and no synchronous round waits for its message (CI saw a whole
    swarm stall 5.8 s: a joiner's in-neighbour was a peer killed a second before). The lean DHT of the launched
    swarm."""
    own = start_dhts(4)
    timeout, ttl = 5.0, 30.0
    peers = swarm(own, "t13", timeout=timeout, liveness_ttl=ttl, lean_dht=True)
    dead, survivors = peers[3], peers[:3]
    try:
        with ThreadPoolExecutor(4) as pool:
            results, _ = rounds(peers, 0, pool)
            assert all(r.delivered for r in results)
            name = peer_id_of([str(maddr) for maddr in own[3].get_visible_maddrs()])
            assert name == dead.peer_id.to_base58()
            own[3].shutdown()  # its p2pd and DHT die
            for peer in survivors:
                peer.expect(3, 3, [name])
            assert all(p.members() == sorted(p.members()) and dead.peer_id not in p.members() for p in survivors)
            for k in range(1, 4):  # every offset of the 3-peer graph: each round is a full exchange, none waits
                results, counts = rounds(survivors, k, pool)
                assert all(r.delivered and r.seconds < 0.5 * timeout for r in results), results
                assert all(c.received == 1 for c in counts)
    finally:
        shutdown(peers)
        for dht in own[:3]:
            dht.shutdown()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("lean", [False, True], ids=["full-reads", "lean-dht"])
def test_a_newcomer_the_driver_counts_is_in_the_others_views_at_once(lean):
    """The driver tells the running peers their new count once a newcomer is in (its record already stored): their
    views take it in then, not at the periodic read (ttl/3, here 20 s; CI saw a joiner get no message in its first
    epoch's six rounds). The DHT of 3 nodes is the launched swarm's: within the replication, every node counted."""
    own = start_dhts(3)
    ttl = 60.0
    try:
        first = swarm(own[:2], "t12", liveness_ttl=ttl, lean_dht=lean)
        for peer in first:
            peer.expect(2, 3)
        newcomer = PushSum(own[2], "t12", initial(2), liveness_ttl=ttl, lean_dht=lean)
        newcomer.expect(3, 3)
        assert len(newcomer.join(expected=3, wait=10)) == 3
        told = time.monotonic()
        for peer in first:
            peer.expect(3, 3)
        while any(len(p.members()) < 3 for p in first) and time.monotonic() - told < ttl / 3:
            time.sleep(0.05)
        assert [len(p.members()) for p in first] == [3, 3] and time.monotonic() - told < 2.0
        views = {tuple(p.members()) for p in [*first, newcomer]}
        assert len(views) == 1, "one graph"
    finally:
        shutdown([*first, newcomer])
        for dht in own:
            dht.shutdown()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("codec, bytes_per_value, error", [("float16", 2, 2e-3), ("uint8", 1, 5e-2)])
def test_compressed_messages_average_within_the_codecs_precision(eight, codec, bytes_per_value, error):
    peers = swarm(eight[4:], f"t7{codec}", codec=compression(codec), timeout=10.0)
    mean = torch.stack([flat(p.tensors) for p in peers]).mean(0)
    try:
        with ThreadPoolExecutor(len(peers)) as pool:
            for k in range(2):  # n = 4: m = 2 rounds
                results, counts = rounds(peers, k, pool)
                assert all(r.delivered for r in results)
                assert all(c.bytes_sent < mean.numel() * bytes_per_value + 2200 for c in counts), counts
        assert all(relative_error(peer, mean) < error for peer in peers)
        assert all(peer.weight == 1.0 for peer in peers)
        print(codec, [f"{relative_error(peer, mean):.1e}" for peer in peers])
    finally:
        shutdown(peers)
