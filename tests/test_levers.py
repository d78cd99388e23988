"""The levers of a cheap gossip round (workers/averaging/levers.py, flat.py): a part's finiteness read in place, the
flat layout, the part size; and, with real hivemind peers on loopback, that the lean DHT use and sticky groups
really remove the DHT RPCs of a round (counted in each DHT's process, as ../shared/tools/round_cost.py counts them)."""

from __future__ import annotations

import collections
import functools
import math
import subprocess
import sys
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


def rpcs_per_peer_round(dhts, levers: Levers, rounds: int = 4, peers: int = 3, sized: bool = False,
                        dht_nodes: int | None = None) -> dict:  # fmt: skip
    """`peers` peers sharing their state as training peers do, one warm-up round, then `rounds` rounds: the DHT RPCs
    (find, store) each peer sent per round, and the rounds that succeeded. `sized`: the DHTs' replication sized for
    the swarm, as a peer's is; `dht_nodes`: the count of DHTs up that each peer is told, as the driver tells it
    (default: `peers`), after its averager's process has started."""
    cfg = GossipConfig(group_size=peers, matchmaking_time=2.0, round_timeout=10.0)
    nodes = dhts(peers, levers, swarm_size=peers if sized else None)
    averagings = []
    for seed, dht in enumerate(nodes):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 8))  # 4 tensors
        averagings.append(GossipAveraging(model, dht, cfg, "rpcs", swarm_size=peers, levers=levers))
    try:
        for averaging in averagings:
            averaging.set_swarm_size(peers, peers if dht_nodes is None else dht_nodes)
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
# 2 other nodes, the group key read locally; sticky: a round asks the DHT nothing but its local storage (on gloo: not
# even that). 8 peers, past hivemind's 5 replicas: lean DHT use only holds with the replication sized for the swarm
# (stores straight to the 7 others); with hivemind's it falls back to traversals, and so it does where a peer is told
# of more DHTs up than it knows (the count reaches the averager's process after it started). Lean finds: a peer that
# reads nobody else in the group key (the first to look in a round, more when they look at once, as here) reads it in
# full once, asking the other peers: locally 0.2 at 3 peers and 1.5 at 8 (CI saw 1.1), where traversals every round
# cost 8 and more
EXPECTED_RPCS = {
    "plain": (8, 100, 8, 100),
    "lean": (0, 2, 2, 5),
    "sticky": (0, 0.25, 0, 0.25),  # find, store: min, max
    "gloo": (0, 0.25, 0, 0.25),  # (its rounds do not touch the DHT)
    "lean, 8 peers": (0, 4, 7, 21),
    "lean, 8 peers, 5 replicas": (8, 1000, 8, 1000),
    "lean, 8 peers, told of 9": (8, 1000, 7, 1000),
}


LEAN = Levers(sticky=False, gloo=False)  # every round matchmade


@pytest.mark.integration
@pytest.mark.timeout(180)
@pytest.mark.parametrize("name, levers, peers", [("plain", Levers.off(), 3), ("lean", LEAN, 3),
                                                 ("sticky", Levers(gloo=False), 3), ("gloo", Levers(), 3),
                                                 ("lean, 8 peers", LEAN, 8), ("lean, 8 peers, 5 replicas", LEAN, 8),
                                                 ("lean, 8 peers, told of 9", LEAN, 8)])  # fmt: skip
def test_lean_dht_use_and_sticky_groups_remove_the_dht_rpcs_of_a_round(dhts, monkeypatch, name, levers, peers):
    from hivemind.dht.protocol import DHTProtocol

    for call in ("find", "store"):  # before the DHTs fork their processes, which inherit it
        monkeypatch.setattr(DHTProtocol, f"call_{call}", counted(getattr(DHTProtocol, f"call_{call}"), call))
    told = peers + 1 if "told of" in name else peers
    got = rpcs_per_peer_round(dhts, levers, peers=peers, sized="5 replicas" not in name, dht_nodes=told)
    print(f"{name}: DHT RPCs per peer and round {got}")
    assert got["ok"] == peers * 5, "every round of every peer succeeded"
    least_find, most_find, least_store, most_store = EXPECTED_RPCS[name]
    assert least_find <= got["find"] <= most_find and least_store <= got["store"] <= most_store, got


def test_the_dhts_replication_is_sized_for_the_swarm_with_lean_dht_use():
    from workers.averaging.levers import MAX_REPLICAS, replication

    assert replication(Levers(), 24) == dict(num_replicas=24, bucket_size=24)
    assert replication(Levers(), 8) == dict(num_replicas=8, bucket_size=20), "k-buckets never below hivemind's 20"
    assert replication(Levers(), 5) == {} and replication(Levers(), None) == {}, "hivemind's own up to 5, or unknown"
    assert replication(Levers.off(), 24) == {}, "plain hivemind keeps its defaults"
    assert replication(Levers(), 1000)["num_replicas"] == MAX_REPLICAS


# -- the lean path only where the node knows the whole swarm -----------------------------------------------------------


async def forget(_dht, node, peer_id) -> bool:
    """Run in a DHT's process: drop `peer_id` from the routing table, as an RPC that timed out does (on capped cores,
    E1 run 4)."""
    uid = node.protocol.routing_table.get(peer_id=peer_id)
    if uid is not None:
        del node.protocol.routing_table[uid]
    return uid is not None


async def known_nodes(_dht, node) -> int:
    return len(node.protocol.routing_table.uid_to_peer_id)


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("told", [True, False], ids=["DHTs up told", "not told"])
def test_a_node_that_lost_a_peer_from_its_routing_table_still_reaches_it(dhts, told):
    """6 nodes, replication sized for them; node 1 forgets node 2 (after node 2 declared itself), then every other
    node declares itself under one key by the lean path and reads the key from its own storage. Told that 6 DHTs
    are up, node 1 knows too few for the lean path and stores by a traversal, which finds node 2 again: every node
    reads all 6. Not told (an open swarm), node 1 stores only to the 4 it knows, and node 2 never sees it: the failure
    of E1 run 4 (a peer left out of matchmaking, 31 of 38 rounds failed) that withdrew the sized replication."""
    import asyncio

    from hivemind.utils.timed_storage import get_dht_time

    from workers.averaging.levers import dht_read, dht_store

    nodes = dhts(6, swarm_size=6)
    up = 6 if told else 0  # the DHTs up, as the driver tells a peer (0: not known)
    assert all(node.run_coroutine(known_nodes) == 5 for node in nodes), "each knows the others to begin with"
    expires = get_dht_time() + 60

    def declare(index: int) -> None:
        node = nodes[index]
        assert asyncio.run(dht_store(node, "whole", node.peer_id.to_bytes(), index, expires, direct=True, swarm=up))

    declare(2)  # (first: node 2 never calls node 1 after node 1 forgot it, which would remind node 1 of it)
    assert nodes[1].run_coroutine(functools.partial(forget, peer_id=nodes[2].peer_id))
    for index in (0, 1, 3, 4, 5):
        declare(index)
    seen = []
    for node in nodes:
        record = asyncio.run(dht_read(node, "whole", local=True, swarm=up))
        seen.append(sorted(entry.value for entry in record.value.values()) if record is not None else [])
    print(f"DHTs up told: {told}; each node read {seen}")
    if told:
        assert seen == [list(range(6))] * 6, "every node reads every declaration from its own storage"
        assert nodes[1].run_coroutine(known_nodes) == 5, "node 1's traversal found node 2 again"
    else:
        assert 1 not in seen[2], "node 2 missed the declaration of node 1, which did not know it"


def test_hivemind_is_imported_without_scipy_optimize_which_loads_when_used():
    """Start-up: a peer imports hivemind without the scipy.optimize that its load balancing imports (workers/averaging/
    __init__.py); a peer that declared a bandwidth would still get hivemind's linear program, loaded on first use, and
    whatever imports scipy.optimize (or one of its submodules) afterwards gets the real module."""
    first_use = """if True:
        import sys
        import workers.averaging
        from hivemind.averaging.load_balancing import load_balance_peers
        assert "hivemind" in sys.modules and "scipy.optimize._optimize" not in sys.modules, "loaded with hivemind"
        assert load_balance_peers(1000, [None, None, None]) == (334, 333, 333)  # ours: no bandwidths, no program
        assert "scipy.optimize._optimize" not in sys.modules, "loaded by a round without bandwidths"
        parts = load_balance_peers(1000, [1.0, None, 2.0])  # a bandwidth: the linear program
        import scipy.optimize
        assert type(scipy.optimize).__name__ == "module" and sys.modules["scipy.optimize"] is scipy.optimize
        assert sum(parts) == 1000 and parts[2] > parts[1], parts
        print("ok")
    """
    submodule_first = """if True:
        import inspect, sys
        import workers.averaging
        import scipy.optimize._minimize  # (a submodule first: the package runs whole)
        from scipy.optimize import linprog
        from hivemind.averaging.load_balancing import load_balance_peers
        assert inspect.getmodule(linprog) is sys.modules["scipy.optimize._linprog"]
        assert sum(load_balance_peers(1000, [1.0, None, 2.0])) == 1000
        print("ok")
    """
    for code in (first_use, submodule_first):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("nat_traversal", [False, True])
def test_p2pds_nat_services_run_only_where_the_config_asks(torch_threads, nat_traversal):
    """A launched swarm's peers dial each other directly: their p2pd starts without UPnP port mapping, AutoNAT and
    circuit relays (network.nat_traversal: false, the default), which hivemind turns on unless told."""
    import psutil

    from tests.conftest import quick_config
    from workers.peer.peer import Peer

    peer = Peer(quick_config("peers=2", f"network.nat_traversal={str(nat_traversal).lower()}"), 0, "nat")
    try:
        peer.start_dht([])
        daemons = [proc for proc in psutil.Process().children(recursive=True) if proc.name() == "p2pd"]
        assert len(daemons) == 1
        flags = set(daemons[0].cmdline()[1:])
        assert {f"-natPortMap={int(nat_traversal)}", f"-autonat={int(nat_traversal)}",
                f"-relay={int(nat_traversal)}"} <= flags, flags  # fmt: skip
    finally:  # (not Peer.stop: it kills this process's children)
        peer.averaging.shutdown()
        peer.dht.shutdown()
