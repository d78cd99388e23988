"""Gossip rounds against real hivemind peers on loopback (in this process, no Ray): a round starts as soon as the
swarm has joined, an overlapped round lands as a correction that keeps the local steps, and compression cuts the
bytes on the wire."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator  # noqa: UP035 (hivemind's ServicerBase finds streams by typing's _name)

import pytest
import torch
from hivemind.proto import averaging_pb2
from torch import nn

from workers.averaging.base import averaged_tensors
from workers.averaging.flat import FlatLayout
from workers.averaging.gossip import GossipAveraging
from workers.core.config import GossipConfig

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def linear(seed: int, width: int = 64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(width, width // 2)


def layers(seed: int, count: int = 15, width: int = 64) -> nn.Module:
    """Many small tensors (30 here), to be averaged as one flat buffer: every member of a group reduces a share."""
    torch.manual_seed(seed)
    return nn.Sequential(*(nn.Linear(width, width) for _ in range(count)))


def swarm(dhts, cfg: GossipConfig, prefix: str, size: int = 2, width: int = 64):
    models = [linear(seed, width) for seed in range(size)]
    peers = [GossipAveraging(m, d, cfg, prefix, swarm_size=size) for m, d in zip(models, dhts(size), strict=True)]
    return models, peers


def in_parallel(peers: list[GossipAveraging], call, settle_s: float = 0.0) -> list:
    """`call` on every peer at once; then, `settle_s` later, the peers are shut down."""
    try:
        with ThreadPoolExecutor(len(peers)) as pool:
            return list(pool.map(call, peers))
    finally:
        time.sleep(settle_s)  # a reducer may still be streaming its last averaged part to a peer that has all it needs
        for peer in peers:
            peer.shutdown()


def test_a_round_starts_once_the_swarm_has_joined_not_after_matchmaking_time(dhts):
    """The original knobs: a target group of 16 and 5 s of matchmaking, with 2 peers. The group aims at the 2 the
    run knows of, so the round runs at once instead of waiting out the 5 s."""
    cfg = GossipConfig(group_size=16, matchmaking_time=5.0, round_timeout=10.0)
    _, peers = swarm(dhts, cfg, "fast")
    sizes = in_parallel(peers, lambda peer: peer.average())
    assert sizes == [2, 2]
    # the rounds alone (the shutdowns after them are not timed): a round that waited for a group of 16 takes 5 s
    assert max(peer.stats.seconds for peer in peers) < 3.0, "no wait for a group of 16 that the swarm cannot fill"


def test_an_overlapped_round_keeps_the_local_steps_taken_meanwhile(dhts):
    """θ ← θ + (avg(θ_sent) − θ_sent): what each peer sent is averaged, and the steps it took while the round was in
    flight (here: +1 and +2 on every weight) stay on top of the average."""
    cfg = GossipConfig(group_size=2, matchmaking_time=2.0, round_timeout=10.0, overlap=True, every_steps=1)
    models, peers = swarm(dhts, cfg, "overlap")
    sent = [[t.clone() for t in averaged_tensors(m)] for m in models]
    mean = [(a + b) / 2 for a, b in zip(*sent, strict=True)]

    def overlapped(peer: GossipAveraging) -> int | None:
        peer.average()  # starts the round, returns at once
        assert peer.in_flight is not None
        with torch.no_grad():
            for tensor in peer.tensors:
                tensor.add_(1.0 + peers.index(peer))  # local steps while the round is in flight
        return peer.finish_round()

    assert in_parallel(peers, overlapped) == [2, 2]
    for index, model in enumerate(models):
        for got, want in zip(averaged_tensors(model), mean, strict=True):
            torch.testing.assert_close(got, want + 1.0 + index)


def test_an_overlapped_round_carries_over_an_epoch_end_but_lands_by_the_last_one(dhts):
    """Rounds every H steps with overlap: the epoch's end does not wait for the round in flight (it lands in the next
    epoch, counted there); the peer's last epoch does."""
    cfg = GossipConfig(group_size=2, matchmaking_time=2.0, round_timeout=10.0, overlap=True, every_steps=1)
    _, peers = swarm(dhts, cfg, "carry")

    def two_epoch_ends(peer: GossipAveraging) -> tuple:
        peer.average()
        peer.after_epoch(last=False)
        carried = peer.in_flight is not None, peer.stats.ok
        peer.after_epoch(last=True)
        return carried, (peer.in_flight is None, peer.stats.ok)

    assert in_parallel(peers, two_epoch_ends) == [((True, 0), (True, 1))] * 2


@pytest.mark.parametrize("codec, bytes_per_value", [("float16", 2), ("uint8", 1)])
def test_compression_cuts_the_bytes_and_stays_close_to_the_exact_mean(dhts, codec, bytes_per_value):
    width = 512  # uint8 parts carry a 1 KiB codebook each: negligible next to 128k values
    values = sum(t.numel() for t in averaged_tensors(linear(0, width)))
    results = {}
    for name in ("none", codec):
        cfg = GossipConfig(group_size=2, matchmaking_time=2.0, round_timeout=10.0, compression=name)
        models, peers = swarm(dhts, cfg, f"bytes-{name}", width=width)
        exact = [(a + b) / 2 for a, b in zip(*(averaged_tensors(m) for m in models), strict=True)]
        assert in_parallel(peers, lambda peer: peer.average(), settle_s=1.0) == [2, 2]
        errors = [(got - want).abs().max() for got, want in zip(averaged_tensors(models[0]), exact, strict=True)]
        error = float(max(errors))
        results[name] = ([p.averager.part_bytes.value for p in peers], error)
    (plain, plain_error), (squeezed, squeezed_error) = results["none"], results[codec]
    # every part crosses the wire once each way: to its reducer, and back averaged; summed over the reducers of a
    # group of 2, that is twice the tensors' bytes (however hivemind splits them between the two)
    assert sum(plain) == 2 * 4 * values, plain
    assert sum(squeezed) <= sum(plain) * bytes_per_value / 4 * 1.1, (plain, squeezed)
    assert plain_error < 1e-6 and 0 < squeezed_error < 0.05


def test_matchmaking_reads_the_dht_at_most_once_per_poll_interval(dhts):
    """hivemind re-reads the group's key back to back while a peer waits for partners (a CPU burn on a shared
    machine): paced, reads are at least poll_s apart, and the first read of a round is at once. Real DHT reads
    through the class hivemind's matchmaking builds its key manager from."""
    import asyncio

    from hivemind.averaging import matchmaking

    from workers.averaging.gossip import swarm_averager_class
    from workers.averaging.matchmaking import MATCHMAKING_POLL_S, paced_matchmaking

    (dht,) = dhts(1)
    try:
        paced_matchmaking(0.3)
        manager = matchmaking.GroupKeyManager(dht, "paced", "", 2)

        async def read_thrice() -> list[float]:
            began, times = time.monotonic(), []
            for _ in range(3):
                await manager.get_averagers(manager.current_key, only_active=True)
                times.append(time.monotonic() - began)
            return times

        times = asyncio.run(read_thrice())
        assert times[0] < 0.3 and all(later - earlier >= 0.3 for earlier, later in zip(times, times[1:], strict=False))
    finally:
        paced_matchmaking()
    swarm_averager_class()  # what every averager is built with
    assert matchmaking.GroupKeyManager.poll_s == MATCHMAKING_POLL_S


def test_overlap_with_one_round_per_epoch_makes_exactly_one_round_per_epoch(dhts):
    """An epoch-end round started early (overlap) that lands before the epoch's last step is that epoch's round:
    the epoch's end must not run a second, blocking one. Long epochs (40 steps of 20 ms) and a fast round make the
    early round land well before the end."""
    cfg = GossipConfig(group_size=2, matchmaking_time=2.0, round_timeout=10.0, overlap=True, every_steps="epoch")
    _, peers = swarm(dhts, cfg, "epoch-overlap")
    epochs, steps = 4, 40

    def train(peer: GossipAveraging) -> int:
        step = 0
        for epoch in range(1, epochs + 1):
            for left in range(steps - 1, -1, -1):
                time.sleep(0.02)
                step += 1
                peer.after_step(step, left)
            peer.after_epoch(last=epoch == epochs)
        return peer.stats.ok + peer.stats.failed

    assert in_parallel(peers, train) == [epochs, epochs]
    assert [peer.stats.ok for peer in peers] == [epochs, epochs]


def test_a_round_whose_reducer_failed_counts_as_partial_not_ok(dhts):
    """hivemind reports a round as a success even when a reducer failed for some of a peer's parts (the peer keeps
    their local values). Here the third member of a group of 3 is a real averager whose reducer fails every part it
    is sent: the two others' rounds are partial, not ok, and their group sizes are not counted."""
    from hivemind.averaging.allreduce import AllreduceException

    from workers.averaging.gossip import swarm_averager_class

    class BrokenReducer(swarm_averager_class()):
        async def rpc_aggregate_part(
            self, stream: AsyncIterator[averaging_pb2.AveragingData], context
        ) -> AsyncIterator[averaging_pb2.AveragingData]:
            raise AllreduceException("this reducer is broken")
            yield  # an async generator, as hivemind's handler is

    BrokenReducer.__name__ = swarm_averager_class().__name__  # hivemind names the handlers after the class

    cfg = GossipConfig(group_size=3, min_group_size=3, matchmaking_time=2.0, round_timeout=5.0)
    first, second, third = dhts(3)
    models = [layers(seed) for seed in range(2)]
    peers = [GossipAveraging(m, d, cfg, "partial", swarm_size=3) for m, d in zip(models, (first, second), strict=True)]
    tensors = averaged_tensors(layers(2))  # as the other peers' averagers hold them: one flat buffer
    broken = BrokenReducer(FlatLayout(tensors).buffers(tensors), third, prefix="partial", target_group_size=3,
                           min_group_size=3, min_matchmaking_time=2.0, request_timeout=1.0, allreduce_timeout=5.0,
                           start=True)  # fmt: skip
    try:
        with ThreadPoolExecutor(3) as pool:
            rounds = pool.submit(lambda: broken.step(timeout=10, allow_retries=False))
            results = list(pool.map(lambda peer: peer.average(), peers))
            rounds.exception(timeout=30)  # (the broken member itself may or may not see its round fail)
        stats = [(p.stats.ok, p.stats.partial, p.stats.failed) for p in peers]
        assert stats == [(0, 1, 0)] * 2, stats
        assert results == [None, None] and all(p.stats.take_window()[0] != p.stats.take_window()[0] for p in peers)
    finally:
        for peer in peers:
            peer.shutdown()
        broken.shutdown()


def test_a_round_in_flight_is_dropped_before_a_reload_replaces_the_parameters(dhts):
    """A diverged peer reloads the swarm's state while an overlapped round it started is in flight: that round's
    correction comes from the diverged trajectory and must never be added to the reloaded parameters."""
    cfg = GossipConfig(group_size=2, matchmaking_time=2.0, round_timeout=10.0, overlap=True, every_steps=1)
    models, peers = swarm(dhts, cfg, "dropped")
    reloaded = [torch.full_like(t, 7.0) for t in averaged_tensors(models[0])]

    def reload_midway(peer: GossipAveraging) -> bool:
        peer.average()  # starts a round, returns at once
        if peers.index(peer) == 0:
            peer.drop_round()  # what Peer does before it takes a donor's state
            with torch.no_grad():
                for tensor, state in zip(peer.tensors, reloaded, strict=True):
                    tensor.copy_(state)
            time.sleep(1.0)  # the other peer's round completes meanwhile
            peer.after_epoch(last=True)  # the epoch's end lands whatever round is in flight: none
        else:
            peer.finish_round()
        return peer.in_flight is None

    assert in_parallel(peers, reload_midway) == [True, True]
    for got, want in zip(averaged_tensors(models[0]), reloaded, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
