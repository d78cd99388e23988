"""The levers of a cheap gossip round (workers/averaging/levers.py, flat.py): a part's finiteness read in place, the
flat layout, the part size; and, with real hivemind peers on loopback, that the lean DHT use and sticky groups
really remove the DHT RPCs of a round (counted in each DHT's process, as ../shared/tools/round_cost.py counts them)."""

from __future__ import annotations

import collections
import functools
import math
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hivemind.compression import CompressionInfo, Float16Compression, NoCompression, deserialize_torch_tensor
from torch import nn

from workers.averaging.base import averaged_tensors
from workers.averaging.flat import FlatLayout, finite_part, part_size_for
from workers.averaging.gossip import GossipAveraging, uniform_8bit
from workers.averaging.levers import Levers
from workers.core.config import GossipConfig


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [None, math.nan, math.inf, -math.inf])
def test_a_parts_finiteness_is_read_as_a_full_decode_reads_it(dtype, bad):
    tensor = torch.randn(1000).to(dtype)
    if bad is not None:
        tensor[417] = bad
    codecs = [NoCompression()] + ([Float16Compression()] if dtype == torch.float32 else [])
    for codec in codecs:
        part = codec.compress(tensor, CompressionInfo.from_tensor(tensor))
        decoded = bool(torch.isfinite(deserialize_torch_tensor(part)).all())
        if isinstance(codec, NoCompression) or bad is None or math.isnan(bad):  # (float16 clamps +-Inf: finite)
            assert decoded == (bad is None)
        assert finite_part(part) == decoded, (codec, bad)


def test_an_8bit_parts_finiteness_is_its_codebooks():
    tensor = torch.randn(1000)
    assert finite_part(uniform_8bit().compress(tensor, CompressionInfo.from_tensor(tensor)))


def test_the_flat_layout_holds_every_tensor_in_one_buffer_per_dtype():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    model = model.to(memory_format=torch.channels_last)  # the layout is the default one, whatever the model's
    tensors = averaged_tensors(model) + [torch.arange(5)]  # (an integer tensor gets a buffer of its own)
    layout = FlatLayout(tensors)
    buffers = layout.buffers(tensors)
    assert [b.dtype for b in buffers] == [torch.float32, torch.int64]
    assert buffers[0].numel() == sum(t.numel() for t in tensors[:-1])
    for view, tensor in zip(layout.views(buffers), tensors, strict=True):
        assert torch.equal(view, tensor) and view.shape == tensor.shape
    buffers[0].add_(1.0)
    assert torch.equal(layout.views(buffers)[0], tensors[0] + 1.0), "views, not copies"


def test_the_part_size_gives_each_reducer_one_part_up_to_the_cap():
    flat = torch.zeros(65_536)
    for codec, bytes_per_value in ((NoCompression(), 4), (Float16Compression(), 2)):
        values_per_part = int(part_size_for([flat], 4, codec, 2**22) / bytes_per_value)
        assert math.ceil(flat.numel() / values_per_part) == 4
    assert part_size_for([torch.zeros(25 * 2**20)], 4, NoCompression(), 2**22) == 2**22


# -- DHT RPCs per round, counted in the DHT processes ------------------------------------------------------------------

RPCS: collections.Counter = collections.Counter()  # in each DHT's process (forked from this one) its own


def counted(method, name: str):
    @functools.wraps(method)
    async def wrapper(*args, **kwargs):
        RPCS[name] += 1
        return await method(*args, **kwargs)

    return wrapper


async def rpcs_so_far(_dht, _node) -> dict:
    """Run in a DHT's process: the RPCs it sent."""
    return dict(RPCS)


def dht_rpcs(dhts) -> collections.Counter:
    total = collections.Counter()
    for dht in dhts:
        total.update(dht.run_coroutine(rpcs_so_far))
    return total


def rpcs_per_peer_round(dhts, levers: Levers, rounds: int = 4, peers: int = 3) -> dict:
    """`peers` peers sharing their state as training peers do, one warm-up round, then `rounds` rounds: the DHT RPCs
    (find, store) each peer sent per round, and the rounds that succeeded."""
    cfg = GossipConfig(group_size=peers, matchmaking_time=2.0, round_timeout=10.0)
    nodes = dhts(peers, levers)
    averagings = []
    for seed, dht in enumerate(nodes):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 8))  # 4 tensors
        averagings.append(GossipAveraging(model, dht, cfg, "rpcs", swarm_size=peers, levers=levers))
    try:
        for averaging in averagings:
            averaging.share_state(lambda: ({}, []), priority=lambda: 0)
        with ThreadPoolExecutor(peers) as pool:
            list(pool.map(lambda a: a.average(), averagings))  # warm-up: connections, the first declarations
            time.sleep(0.5)
            before = dht_rpcs(nodes)
            for _ in range(rounds):
                list(pool.map(lambda a: a.average(), averagings))
            time.sleep(0.5)  # the rounds' last stores
            sent = dht_rpcs(nodes) - before
    finally:
        for averaging in averagings:
            averaging.shutdown()
    per = {name: sent[name] / (peers * rounds) for name in ("find", "store")}
    return dict(per, ok=sum(a.stats.ok for a in averagings))


# plain: a state declaration per averaged tensor, a declaration and an undeclaration, each a traversal and a store to
# every other node, and full reads of the group key; lean: the declaration and the undeclaration stored straight to the
# 2 other nodes, the group key read locally; sticky: a round asks the DHT nothing but its local storage
EXPECTED_RPCS = {"plain": (8, 100, 8, 100), "lean": (0, 1, 2, 5), "sticky": (0, 0.25, 0, 0.25)}  # find, store: min, max


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("name, levers", [("plain", Levers.off()), ("lean", Levers(sticky=False)),
                                          ("sticky", Levers())])  # fmt: skip
def test_lean_dht_use_and_sticky_groups_remove_the_dht_rpcs_of_a_round(dhts, monkeypatch, name, levers):
    from hivemind.dht.protocol import DHTProtocol

    for call in ("find", "store"):  # before the DHTs fork their processes, which inherit it
        monkeypatch.setattr(DHTProtocol, f"call_{call}", counted(getattr(DHTProtocol, f"call_{call}"), call))
    got = rpcs_per_peer_round(dhts, levers)
    print(f"{name}: DHT RPCs per peer and round {got}")
    assert got["ok"] == 3 * 5, "every round of every peer succeeded"
    least_find, most_find, least_store, most_store = EXPECTED_RPCS[name]
    assert least_find <= got["find"] <= most_find and least_store <= got["store"] <= most_store, got
