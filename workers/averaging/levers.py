"""What a gossip round may skip of hivemind 1.1.12's fixed cost, without forking hivemind. Measured on a 2-core machine
(4 peers, 0.25 MB in 10 tensors): plain hivemind made ~80 DHT RPCs, 12 DHT stores and 3.8 streams per peer and round;
with every lever a round makes 0.1 RPCs, 1 local DHT read and 3 streams (docs/performance.md).

- `quiet_state` (QuietStateDeclarations): hivemind re-declares a peer as a state donor (`<prefix>.all_averagers`, a
  full DHT store) once per *averaged tensor* per round: its all-reduce wakes the declaring loop after every tensor.
  Here the declaration is stored only when it changes, or before it expires.
- `lean_dht`: in a swarm no larger than the DHT's replication factor every node stores every key, so a store goes
  straight to the known nodes (no traversal first), and a read of the group key (or of the sticky groups' liveness
  records) comes from the node's own storage, with one full read after a read that found nobody else. The
  replication factor is sized for the launched swarm (`replication`), so this holds past hivemind's 5; and only a
  node that knows every peer whose DHT is up takes this path (`small_swarm`), others traverse until they do.
- `flat` (workers/averaging/flat.py): one buffer per dtype, a part per reducer.
- `sticky` (workers/averaging/sticky.py): a group that is the whole live swarm is kept for the next rounds.
- `gloo` (workers/averaging/gloo.py): a sticky group's rounds all-reduce through a gloo process group of its members
  instead of hivemind's streams through p2pd.
- `dht_cache` off: hivemind's DHT caching only adds refresh traffic to a swarm whose nodes hold every key.
- `p2pd_gomaxprocs`, `averager_threads`: p2pd's Go threads and the averager's torch threads on shared cores.
Each lever touches hivemind only through subclasses and substitutions in the averager's own process, behind
`hivemind_internals`. `Levers.off()` is plain hivemind, for measurement (the config's `gossip.cheap_rounds: false`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from functools import partial

import numpy as np

from workers.averaging.matchmaking import hivemind_internals, paced_matchmaking
from workers.core.config import GossipConfig


@dataclass(frozen=True)
class Levers:
    sticky: bool = True
    gloo: bool = True
    quiet_state: bool = True
    lean_dht: bool = True
    flat: bool = True
    dht_cache: bool = False
    p2pd_gomaxprocs: int | None = 1  # None: Go's default, a thread per core
    averager_threads: int | None = 1  # None: the peer's own torch thread count
    live_ttl: float = 30.0  # sticky: a liveness record's lifetime, refreshed every third of it

    @classmethod
    def off(cls) -> Levers:
        """Plain hivemind 1.1.12 (with the project's pacing, live group target, admission and SaferRunner)."""
        return cls(sticky=False, gloo=False, quiet_state=False, lean_dht=False, flat=False, dht_cache=True,
                   p2pd_gomaxprocs=None, averager_threads=None)  # fmt: skip

    @classmethod
    def of(cls, cfg: GossipConfig) -> Levers:
        gloo = cfg.sticky_transport == "gloo" and cfg.compression == "none"  # (gloo sends full precision)
        return cls(gloo=gloo) if cfg.cheap_rounds else cls.off()


NO_DHT_CACHE = dict(cache_locally=False, cache_nearest=0, cache_on_store=False, cache_refresh_before_expiry=0)


REPLICAS = 5  # hivemind's default num_replicas: the size up to which every node stores every key
MAX_REPLICAS = 64  # beyond, a store to every node costs more than the traversal it saves


def replication(levers: Levers, swarm_size: int | None) -> dict:
    """The DHT's replication for a swarm of (at most) `swarm_size` nodes: with `lean_dht` every node is to store every
    key (num_replicas and the k-buckets as large as the swarm, up to MAX_REPLICAS), so the lean stores and local reads
    hold up past hivemind's 5 replicas; {} keeps hivemind's defaults. Measured on the quickstart with groups of 8 on
    2 cores (with `small_swarm`'s whole-swarm check): 16 peers got 88% of their rounds through, against 25% with
    hivemind's 5 (docs/performance.md, G8)."""
    if not levers.lean_dht or swarm_size is None or swarm_size <= REPLICAS:
        return {}
    size = min(swarm_size, MAX_REPLICAS)
    return dict(num_replicas=size, bucket_size=max(20, size))


def start_dht(levers: Levers, swarm_size: int | None = None, **kwargs):
    """hivemind.DHT(start=True, **kwargs), with the levers' DHT options (`replication` for a swarm of `swarm_size`)
    and p2pd's environment."""
    import hivemind

    options = {**({} if levers.dht_cache else NO_DHT_CACHE), **replication(levers, swarm_size)}
    with p2pd_env(gomaxprocs=levers.p2pd_gomaxprocs):
        return hivemind.DHT(start=True, **options, **kwargs)


@contextlib.contextmanager
def p2pd_env(gomaxprocs: int | None):
    """GOMAXPROCS for the p2pd that a DHT started in this block spawns (hivemind copies its process's environment,
    forked from this one, for the daemon); restored afterwards. GOMAXPROCS=1 cut p2pd's CPU per plain round 13-21%."""
    saved = os.environ.get("GOMAXPROCS")
    if gomaxprocs is not None:
        os.environ["GOMAXPROCS"] = str(gomaxprocs)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("GOMAXPROCS", None)
        else:
            os.environ["GOMAXPROCS"] = saved


# -- run in the DHT's process (DHT.run_coroutine pickles these module-level functions by reference) -------------------


def small_swarm(node, swarm: int = 0) -> bool:
    """Whether every node of the DHT stores every key and this one knows them all: it knows no more nodes than
    num_replicas, this one included, and at least `swarm` (the peers whose DHT is up, as the driver last counted them;
    0: not known). A node that knows fewer goes by traversals, which fill its routing table: with only the nodes it
    knew, its stores would miss the others and its local reads would never see their records (E1 run 4,
    docs/performance.md). (A count, not the PeerIDs: a dead peer's entry, until a store to it fails and evicts it,
    can stand in for a live one the node lost.)"""
    return swarm <= len(node.protocol.routing_table.uid_to_peer_id) + 1 <= node.num_replicas


async def direct_store(_dht, node, key, subkey, value, expiration_time: float, swarm: int = 0) -> bool:
    """DHTNode.store without the traversal before it, in a small swarm: the record as store_many makes it (serialised,
    signed by the record validator if any) to local storage and, by one call_store each, to every known node."""
    if not small_swarm(node, swarm):
        return await node.store(key, value, expiration_time, subkey=subkey)
    from hivemind.dht.routing import DHTID
    from hivemind.dht.validation import DHTRecord

    protocol, key_id = node.protocol, DHTID.generate(source=key)
    value_bytes = protocol.serializer.dumps(value)
    if protocol.record_validator is not None:
        record = DHTRecord(key_id.to_bytes(), protocol.serializer.dumps(subkey), value_bytes, expiration_time)
        value_bytes = protocol.record_validator.sign_value(record)
        if not protocol.record_validator.validate(dataclasses.replace(record, value=value_bytes)):
            return False
    stored = protocol.storage.store(key_id, value_bytes, expiration_time, subkey=subkey)
    # every known node, the ones hivemind bans for a while after a failed find too (small_swarm counts them)
    peers = list(protocol.routing_table.uid_to_peer_id.values())
    results = await asyncio.gather(*(
        protocol.call_store(peer, keys=[key_id], values=[value_bytes], expiration_time=[expiration_time],
                            subkeys=[subkey])
        for peer in peers))  # fmt: skip
    return bool(stored or any(result and result[0] for result in results))


async def local_get(_dht, node, key, full: bool = False, swarm: int = 0):
    """A read from local storage in a small swarm (it finishes without a traversal); a full read otherwise."""
    return await node.get(key, latest=full or not small_swarm(node, swarm))


# -- from the averager's process ---------------------------------------------------------------------------------------


async def dht_store(dht, key, subkey, value, expiration_time: float, direct: bool, swarm: int = 0) -> bool:
    """`direct`: without a traversal where the node knows all `swarm` peers whose DHT is up (`small_swarm`)."""
    if direct:
        store = partial(direct_store, key=key, subkey=subkey, value=value, expiration_time=expiration_time, swarm=swarm)
        return await dht.run_coroutine(store, return_future=True)
    return await dht.store(key, subkey=subkey, value=value, expiration_time=expiration_time, return_future=True)


async def dht_read(dht, key, local: bool, swarm: int = 0):
    if local:
        return await dht.run_coroutine(partial(local_get, key=key, swarm=swarm), return_future=True)
    return await dht.get(key, latest=True, return_future=True)


class LeverAware:
    """The averager's levers, given to its constructor (`levers=`) and inherited by its forked process; `dht_nodes`: a
    shared int (a fork context's Value) holding how many peers' DHTs are up, which the peer updates as the driver tells
    it (None: not known)."""

    levers: Levers = Levers()
    dht_nodes = None

    def __init__(self, *args, levers: Levers | None = None, dht_nodes=None, **kwargs):
        if levers is not None:
            self.levers = levers
        self.dht_nodes = dht_nodes
        super().__init__(*args, **kwargs)

    def swarm_nodes(self) -> int:
        """How many peers' DHTs are up, as last told (0: not known), for the DHT's lean path (`small_swarm`)."""
        return self.dht_nodes.value if self.dht_nodes is not None else 0


class QuietStateDeclarations(LeverAware):
    """Mixin (before DecentralizedAverager): the state-sharing declaration only when allow_state_sharing changed, when
    the priority changed and the last store is at least a fifth of declare_state_period old, or a fifth of that period
    before the last one expires (hivemind's loop, averager.py `_declare_for_download_periodically`, stores whenever
    its all-reduce set `_state_updated`: after every tensor). The peers raise their priority (their step) every
    epoch: a store per epoch cost each peer of a 4-peer sgp run about 0.8 stores a second (3 RPCs each); a donor's
    priority is now at most 6 s stale (hivemind's 30 s period), while every peer's moves on alike."""

    async def _declare_for_download_periodically(self):
        if not self.levers.quiet_state:
            return await super()._declare_for_download_periodically()
        hivemind_internals("QuietStateDeclarations")
        from hivemind.utils.timed_storage import get_dht_time

        key, margin = f"{self.prefix}.all_averagers", 0.2 * self.declare_state_period
        declared, expires, stored = None, -math.inf, -math.inf  # (allowed, priority) declared last; its expiry; when
        while True:
            state, now = (self.allow_state_sharing, self.state_sharing_priority), get_dht_time()
            switched = state[0] != (declared is not None and declared[0])  # sharing allowed or withdrawn
            moved = state[0] and declared is not None and state[1] != declared[1] and now >= stored + margin
            if switched or moved or (state[0] and now >= expires - margin):
                stored, expires = now, now + self.declare_state_period
                value = state[1] if state[0] else None
                store = dht_store(
                    self.dht, key, self.peer_id.to_bytes(), value, expires, self.levers.lean_dht, self.swarm_nodes()
                )
                asyncio.create_task(asyncio.wait_for(store, timeout=self.declare_state_period))
                declared = state
            self._state_updated.clear()
            wait = None
            if state[0]:  # the renewal, or a priority not declared yet once it may be
                due = expires - margin if state == declared else min(expires - margin, stored + margin)
                wait = max(0.0, due - now)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._state_updated.wait(), timeout=wait)


class LeanMatchmaking(LeverAware):
    """Mixin (before DecentralizedAverager): matchmaking's declarations stored directly and the group key read
    locally (`lean_dht`). hivemind builds its key manager by the name in its matchmaking module; a subclass of the
    project's paced one is substituted there in the averager's (forked) process only."""

    def run(self):
        if self.levers.lean_dht:
            from hivemind.averaging import matchmaking

            hivemind_internals("LeanMatchmaking")
            paced_matchmaking()  # (a no-op: the averager's process inherits it)
            full_read_every = self.matchmaking_kwargs["min_matchmaking_time"]
            lean = lean_key_manager(matchmaking.GroupKeyManager, full_read_every, self.swarm_nodes)
            matchmaking.GroupKeyManager = lean
        super().run()


def lean_key_manager(paced: type, full_read_every: float, swarm_nodes=lambda: 0) -> type:
    """A subclass of the project's PacedGroupKeyManager (its reads stay paced: a local read takes ~1 ms, and hivemind
    re-reads the key as soon as a read finds no leader) whose stores are direct and whose reads are local; a read that
    finds nobody else is followed by a full one, at most once per `full_read_every` s (the first peer of every round
    finds nobody, and keeps reading while it waits). `swarm_nodes()`: the peers whose DHT is up (`small_swarm`)."""
    from hivemind.p2p import PeerID

    class LeanGroupKeyManager(paced):
        last_full_read = -math.inf

        async def declare_averager(self, group_key, peer_id, expiration_time: float, looking_for_group: bool = True):
            if not looking_for_group:  # (as hivemind's: an undeclaration expires one ulp after its declaration)
                expiration_time = float(np.nextafter(expiration_time, math.inf))
            return await dht_store(
                self.dht, group_key, peer_id.to_bytes(), looking_for_group, expiration_time, True, swarm_nodes()
            )

        async def read_averagers(self, group_key, only_active: bool):
            result = await dht_read(self.dht, group_key, local=True, swarm=swarm_nodes())
            found = [] if result is None or not isinstance(result.value, dict) else [
                (PeerID(key), entry.expiration_time) for key, entry in result.value.items()
                if entry.value or not only_active]  # fmt: skip
            nobody_else = all(peer == self.peer_id for peer, _ in found)
            if nobody_else and time.monotonic() >= self.last_full_read + full_read_every:
                self.last_full_read = time.monotonic()
                return await super().read_averagers(group_key, only_active)
            return found

    return LeanGroupKeyManager


class OneThreadAverager(LeverAware):
    """Mixin: torch's threads in the averager's process (its sums and serialisation are small; a pool as wide as the
    trainer's competes with training for the cores)."""

    def run(self):
        if self.levers.averager_threads is not None:
            import torch

            torch.set_num_threads(self.levers.averager_threads)
        super().run()
