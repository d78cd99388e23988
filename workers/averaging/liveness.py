"""Who is live: a short-lived liveness record per live incarnation, the graph's member list for push-sum.

The membership proofs (workers/core/membership.py) live for days and survive their peer, so they are no list of the
living. Each peer in the graph stores a record under f"{prefix}.sgp_live" (subkey: its PeerID bytes, value {"proof",
"live"}) that expires after `ttl`, re-stored every ttl/3, and reads the whole key every ttl/3 into its member list,
both in the background: no DHT operation per round. A peer that leaves the graph overwrites its record with a
tombstone ("live": False), so the others drop it at their next read; a killed one's record expires within `ttl`,
but in a launched swarm the driver, which sees the actor die within about 0.5 s, names the dead incarnations' PeerIDs
(`expect(gone=...)`) and they leave the view at once; its new count of running peers makes a view that lacks peers
(a newcomer, its record already stored) read again at once.

`lean` (the `lean_dht` lever, workers/averaging/levers.py): in a swarm whose nodes all store every key, a record goes
straight to the known nodes and a read comes from the node's own storage, as the sticky groups' records do. A local read
is merged with the last full read (per PeerID the record that expires later: a record whose store missed this node is
not dropped at the next local read), and followed by a full one when it finds fewer live members than the swarm runs, at
most once per `ttl` (and on demand: `refresh(full=True)`, e.g. a message from a sender this peer does not know).
Measured idle on the 2-core machine (4 peers, no swarm key, results/examples/bench/sgp-lean-20261207/idle_liveness.py:
three interleaved repeats), the records cost each peer 8.8-11.8 ms of CPU per second with full stores and reads, 5.1-6.5
with lean ones (0.9-2.3 without records); in a training run (4 peers, cifar_cnn) sgp's background in hivemind's
processes and p2pd fell from 9.0-9.6 to 3.2-5.0 ms per peer and second, with the quieter state declarations
(workers/averaging/levers.py).

With a swarm key only records with a valid proof for their PeerID count (and in the closed DHT only members can write
at all); an open swarm keeps the same records without a proof. Full reads use latest=True: the key is a dictionary of
subkeys, and hivemind's get(latest=False) stops at the first copy that has not expired, e.g. this node's own store,
which may hold only some of them.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Iterable

from hivemind.dht import DHT
from hivemind.p2p import PeerID
from hivemind.utils.timed_storage import get_dht_time

from workers.averaging.levers import dht_read, dht_store
from workers.core.membership import is_member, membership_proof

LIVENESS_TTL_S = 9.0  # a killed peer drops out of the others' graph within about 1.33 x this


class LiveSet:
    """This peer's record and its view of the others' (the caller runs these coroutines on its own event loop)."""

    publishes_per_ttl = 3  # a record is re-stored every ttl / this
    reads_per_ttl = 3  # the live set is re-read every ttl / this

    def __init__(self, dht: DHT, prefix: str, swarm_key: bytes | None, ttl: float = LIVENESS_TTL_S,
                 lean: bool = False):  # fmt: skip
        # (not gossip's sticky groups' `<prefix>.live`: its records, per the same PeerID subkey, would replace these)
        self.dht, self.key, self.swarm_key, self.ttl, self.lean = dht, f"{prefix}.sgp_live", swarm_key, ttl, lean
        self.peers = 0  # the peers running in the swarm, as the driver last counted them (0: not known)
        self.dht_nodes = 0  # the peers whose DHT is up, running or done (0: not known): `small_swarm`'s count
        self.gone: set[bytes] = set()  # the PeerIDs of incarnations the driver saw die: out of the view
        self._last_full = -math.inf
        self._full_records: dict[bytes, tuple[float, bool]] = {}  # what the last full read found
        self.peer_id: PeerID = dht.peer_id
        self.proof = membership_proof(swarm_key, self.peer_id.to_bytes()) if swarm_key else b""
        self.members: list[PeerID] = [self.peer_id]  # sorted by PeerID bytes: the graph's order
        self.version = 0  # bumped whenever `members` changes
        self._members_lock = threading.Lock()  # `expect` (the actor's thread) and `refresh` (the loop's) both set them
        self._last_expiration = 0.0

    def expect(self, peers: int, dht_nodes: int = 0, gone: Iterable[str] = ()) -> bool:
        """What the driver saw: `peers` running, `dht_nodes` DHTs up, and the PeerIDs (base58) of incarnations that
        died. The dead leave this view now (their records would keep them in it up to a ttl). When the count grew (a
        newcomer entered, its record already stored), the next read that finds fewer may read in full at once. Whether
        this view now lacks peers (a read is due)."""
        if peers > self.peers:
            self._last_full = -math.inf
        self.peers, self.dht_nodes = peers, dht_nodes
        dead = set()
        for raw in gone:
            with contextlib.suppress(Exception):  # not a PeerID: ignored
                dead.add(PeerID.from_base58(raw).to_bytes())
        with self._members_lock:
            self.gone = dead
            self._set_members({m.to_bytes() for m in self.members})
        return len(self.members) < peers

    async def publish(self, live: bool = True) -> bool:
        """Store this peer's record (with live=False a tombstone, which replaces every record stored before)."""
        # a record replaces the one with the lower expiration, whatever order they arrive in: each one issued here
        # (a tombstone too) expires later than the one before, which may still be on its way
        expiration = max(get_dht_time() + self.ttl if live else 0.0, self._last_expiration + 1e-3)
        self._last_expiration = expiration
        value = {"proof": self.proof, "live": live}
        return await dht_store(self.dht, self.key, self.peer_id.to_bytes(), value, expiration, self.lean,
                               self.dht_nodes)  # fmt: skip

    async def refresh(self, full: bool = False) -> bool:
        """Re-read the live members (lean: locally, merged with what the last full read found, and in full when that
        finds fewer than the running peers, at most once per ttl; `full`: in full now); whether the list changed."""
        records = await self._read(full or not self.lean)
        if self.lean and not full:  # per PeerID the later record of the two reads: one a store never brought stays
            records = latest_records(self._full_records, records)
            if len(self._live(records) - self.gone) < self.peers and time.monotonic() >= self._last_full + self.ttl:
                records = await self._read(True)
        with self._members_lock:
            return self._set_members(self._live(records))

    def _set_members(self, live: set[bytes]) -> bool:
        """The view from these PeerIDs (less the dead); whether it changed (then `version` is bumped). The caller holds
        `_members_lock`."""
        members = []
        for raw in sorted(live - self.gone):
            with contextlib.suppress(Exception):  # not a PeerID: ignored
                members.append(PeerID(raw))
        if members == self.members:
            return False
        self.members, self.version = members, self.version + 1
        return True

    async def _read(self, full: bool) -> dict[bytes, tuple[float, bool]]:
        """Per PeerID (bytes), its record: (expiration, whether it says live with a valid proof)."""
        if full:
            self._last_full = time.monotonic()
        found = await dht_read(self.dht, self.key, local=not full, swarm=self.dht_nodes)
        records = {}
        if found is not None and isinstance(found.value, dict):
            for subkey, item in found.value.items():
                if isinstance(subkey, bytes):
                    records[subkey] = (item.expiration_time, self._says_live(subkey, item.value))
        if full:
            self._full_records = records
        return records

    def _live(self, records: dict[bytes, tuple[float, bool]]) -> set[bytes]:
        """The PeerIDs whose record says live and has not expired, this one's included."""
        now = get_dht_time()
        return {self.peer_id.to_bytes()} | {subkey for subkey, (expiration, live) in records.items()
                                             if live and expiration >= now}  # fmt: skip

    def _says_live(self, subkey: bytes, value) -> bool:
        if not isinstance(value, dict) or value.get("live") is not True:
            return False
        return self.swarm_key is None or is_member(self.swarm_key, subkey, value.get("proof"))


def latest_records(*reads: dict[bytes, tuple[float, bool]]) -> dict[bytes, tuple[float, bool]]:
    """Per PeerID, the record that expires latest among the reads (a DHT keeps that one; ties: the later read's)."""
    merged: dict[bytes, tuple[float, bool]] = {}
    for records in reads:
        for subkey, record in records.items():
            if record[0] >= merged.get(subkey, (-math.inf, False))[0]:
                merged[subkey] = record
    return merged
