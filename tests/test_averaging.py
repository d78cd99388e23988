"""The averaging strategies against real hivemind peers on loopback (in this process, no Ray): a channels_last model
is really averaged by every method."""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workers.averaging.allreduce import AllReduceAveraging
from workers.averaging.base import averaged_tensors
from workers.averaging.gossip import GossipAveraging
from workers.averaging.optimizer import OptimizerAveraging
from workers.core.config import GossipConfig
from workers.core.network import free_port

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


def conv_model(seed: int) -> nn.Module:
    """A tiny CNN in channels_last layout, as the peer builds it on GPU with model.channels_last."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    return model.to(memory_format=torch.channels_last)


def is_channels_last(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()


def test_the_test_model_really_has_channels_last_strides_on_cpu():
    weight = conv_model(0)[0].weight
    assert is_channels_last(weight)
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        weight.detach().to("cpu", copy=True).view(-1)  # what hivemind's partitioning did with the old copies


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_gossip_averages_a_channels_last_model(dhts):
    models = [conv_model(seed) for seed in (1, 2)]
    mean = [(a + b) / 2 for a, b in zip(*(averaged_tensors(m) for m in models), strict=True)]
    cfg = GossipConfig(group_size=2, matchmaking_time=2.0, round_timeout=10.0)
    peers = [GossipAveraging(model, dht, cfg, prefix="cl") for model, dht in zip(models, dhts(2), strict=True)]
    try:
        with ThreadPoolExecutor(2) as pool:
            group_sizes = list(pool.map(lambda peer: peer.average(), peers))
    finally:
        for peer in peers:
            peer.shutdown()
    assert group_sizes == [2, 2] and [p.stats.failed for p in peers] == [0, 0]
    for got, want, other in zip(averaged_tensors(models[0]), mean, averaged_tensors(models[1]), strict=True):
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(other, want)
    assert is_channels_last(models[0][0].weight), "the model keeps its layout"


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_a_round_without_a_partner_fails_after_matchmaking_time_not_the_round_timeout(dhts):
    cfg = GossipConfig(matchmaking_time=1.5, round_timeout=30.0)
    peer = GossipAveraging(conv_model(0), dhts(1)[0], cfg, prefix="alone")
    try:
        assert peer.average() is None
    finally:
        peer.shutdown()
    print(f"failed round: {peer.stats.seconds:.2f} s")
    assert peer.stats.failed == 1
    # the round's deadline is matchmaking_time + request_timeout; then hivemind's step fails and reports back
    assert cfg.matchmaking_time <= peer.stats.seconds < cfg.matchmaking_time + 5.0


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_a_partner_that_comes_within_matchmaking_time_is_averaged_with(dhts):
    """The shorter deadline must not cut off a partner that starts its round late, but within matchmaking_time."""
    models = [conv_model(seed) for seed in (1, 2)]
    cfg = GossipConfig(group_size=2, matchmaking_time=3.0, round_timeout=10.0)
    peers = [GossipAveraging(model, dht, cfg, prefix="late") for model, dht in zip(models, dhts(2), strict=True)]

    def average_after(peer: GossipAveraging, delay: float) -> int | None:
        time.sleep(delay)
        return peer.average()

    try:
        with ThreadPoolExecutor(2) as pool:
            group_sizes = list(pool.map(average_after, peers, [0.0, 2.0]))
    finally:
        for peer in peers:
            peer.shutdown()
    assert group_sizes == [2, 2]
    torch.testing.assert_close(models[0][0].weight, models[1][0].weight)


@pytest.mark.integration
@pytest.mark.timeout(180)
@pytest.mark.parametrize("local_updates", [True, False])
def test_hivemind_optimizer_averages_a_channels_last_model(dhts, local_updates):
    """Both of hivemind.Optimizer's averagers: parameters (every round) and gradients (without local updates).
    One process per peer: hivemind's progress tracker keys a peer by a process-wide key, so two in one process
    would count as one peer."""
    (bootstrap,) = dhts(1)
    maddrs = [str(addr) for addr in bootstrap.get_visible_maddrs()]
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    procs = [spawn.Process(target=optimizer_peer, args=(maddrs, seed, local_updates, results)) for seed in (1, 2)]
    for proc in procs:
        proc.start()
    try:
        outcomes = [results.get(timeout=120) for _ in procs]
    finally:
        for proc in procs:
            proc.join(10)
            proc.kill()
    for rounds in outcomes:
        assert rounds["parameters_ok"] >= 1 and rounds["parameters_failed"] == 0, outcomes
        if not local_updates:
            assert rounds["gradients_ok"] >= 1 and rounds["gradients_failed"] == 0, outcomes


def optimizer_peer(initial_peers: list[str], seed: int, local_updates: bool, results) -> None:
    """One hivemind.Optimizer peer (in its own process): local steps on random data until it has had a round of
    parameter averaging (both peers of a round count it) or 60 s passed; puts its round counts into `results`."""
    import hivemind

    multiprocessing.set_start_method("fork", force=True)  # hivemind's averagers cannot be spawned; Linux forks them
    grads = _MessageCounter("hivemind.optim.optimizer", "Averaged gradients with", "Averaging gradients failed")
    dht = hivemind.DHT(initial_peers=initial_peers, host_maddrs=LOOPBACK, start=True)
    cfg = GossipConfig(method="optimizer", group_size=2, matchmaking_time=1.0, round_timeout=10.0,
                       local_updates=local_updates)  # fmt: skip
    model, stop = conv_model(seed), threading.Event()
    averaging = OptimizerAveraging(torch.optim.SGD(model.parameters(), lr=0.05), dht, cfg, prefix="clopt",
                                   batch_size=4, target_batch_size=16, peers=2, stop=stop, join_timeout=30)  # fmt: skip
    inputs, targets = torch.randn(4, 3, 8, 8).to(memory_format=torch.channels_last), torch.randint(3, (4,))
    deadline, step = time.monotonic() + 60, 0
    try:
        while averaging.stats.ok + averaging.stats.failed == 0 and time.monotonic() < deadline:
            step += 1
            loss = F.cross_entropy(model(inputs), targets)
            averaging.optimizer.zero_grad()
            loss.backward()
            averaging.before_step()
            averaging.optimizer.step()
            averaging.after_step(step)
    finally:
        averaging.shutdown()
        dht.shutdown()
    stats = averaging.stats
    results.put(dict(parameters_ok=stats.ok, parameters_failed=stats.failed, gradients_ok=grads.ok,
                     gradients_failed=grads.failed))  # fmt: skip


class _MessageCounter(logging.Handler):
    """Counts a logger's records that start with `ok` or `failed` (hivemind reports rounds only in its log)."""

    def __init__(self, name: str, ok: str, failed: str):
        super().__init__(logging.INFO)
        self.prefixes, self.ok, self.failed = (ok, failed), 0, 0
        logging.getLogger(name).addHandler(self)
        logging.getLogger(name).setLevel(logging.INFO)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.ok += message.startswith(self.prefixes[0])
        self.failed += message.startswith(self.prefixes[1])


def test_allreduce_keeps_channels_last_values_in_place():
    """The all-reduce baseline flattens the tensors into one buffer and copies them back: with one process the
    mean is the identity, so any mix-up of the channels_last layout would show as changed values."""
    model = conv_model(3)
    before = [t.clone() for t in averaged_tensors(model)]
    address = f"tcp://127.0.0.1:{free_port('127.0.0.1')}"
    averaging = AllReduceAveraging(model, GossipConfig(method="allreduce", every_steps=1), address, 0, 1)
    try:
        averaging.after_step(1)
    finally:
        averaging.shutdown()
    assert averaging.stats.ok == 1
    for got, want in zip(averaged_tensors(model), before, strict=True):
        assert torch.equal(got, want)
    assert is_channels_last(model[0].weight)
