"""Who is live: a short-lived liveness record per live incarnation, the graph's member list for push-sum.

The membership proofs (workers/core/membership.py) live for days and survive their peer, so they are no list of the
living. Each peer in the graph stores a record under f"{prefix}.sgp_live" (subkey: its PeerID bytes, value {"proof",
"live"}) that expires after `ttl`, re-stored every ttl/3, and reads the whole key every ttl/3 into its member list,
both in the background: no DHT operation per round. A peer that leaves the graph overwrites its record with a
tombstone ("live": False), so the others drop it at their next read; a killed one's record expires within `ttl`.

With a swarm key only records with a valid proof for their PeerID count (and in the closed DHT only members can write
at all); an open swarm keeps the same records without a proof. Reads use latest=True: the key is a dictionary of
subkeys, and hivemind's get(latest=False) stops at the first copy that has not expired, e.g. this node's own store,
which may hold only some of them.
"""

from __future__ import annotations

import contextlib

from hivemind.dht import DHT
from hivemind.p2p import PeerID
from hivemind.utils.timed_storage import get_dht_time

from workers.core.membership import is_member, membership_proof

LIVENESS_TTL_S = 9.0  # a killed peer drops out of the others' graph within about 1.33 x this


class LiveSet:
    """This peer's record and its view of the others' (the caller runs these coroutines on its own event loop)."""

    def __init__(self, dht: DHT, prefix: str, swarm_key: bytes | None, ttl: float = LIVENESS_TTL_S):
        # (not gossip's sticky groups' `<prefix>.live`: its records, per the same PeerID subkey, would replace these)
        self.dht, self.key, self.swarm_key, self.ttl = dht, f"{prefix}.sgp_live", swarm_key, ttl
        self.peer_id: PeerID = dht.peer_id
        self.proof = membership_proof(swarm_key, self.peer_id.to_bytes()) if swarm_key else b""
        self.members: list[PeerID] = [self.peer_id]  # sorted by PeerID bytes: the graph's order
        self.version = 0  # bumped whenever `members` changes
        self._last_expiration = 0.0

    async def publish(self, live: bool = True) -> bool:
        """Store this peer's record (with live=False a tombstone, which replaces every record stored before)."""
        # a record replaces the one with the lower expiration, whatever order they arrive in: each one issued here
        # (a tombstone too) expires later than the one before, which may still be on its way
        expiration = max(get_dht_time() + self.ttl if live else 0.0, self._last_expiration + 1e-3)
        self._last_expiration = expiration
        stored = await self.dht.store(self.key, {"proof": self.proof, "live": live}, expiration,
                                      subkey=self.peer_id.to_bytes(), return_future=True)  # fmt: skip
        return bool(stored)

    async def refresh(self) -> bool:
        """Re-read the live members; whether the list changed."""
        found = await self.dht.get(self.key, latest=True, return_future=True)
        live = {self.peer_id.to_bytes()}
        if found is not None and isinstance(found.value, dict):
            live |= {subkey for subkey, item in found.value.items() if self._is_live(subkey, item)}
        members = []
        for raw in sorted(live):
            with contextlib.suppress(Exception):  # not a PeerID: ignored
                members.append(PeerID(raw))
        if members == self.members:
            return False
        self.members, self.version = members, self.version + 1
        return True

    def _is_live(self, subkey: object, item) -> bool:
        value = item.value
        if not isinstance(subkey, bytes) or item.expiration_time < get_dht_time() or not isinstance(value, dict):
            return False
        if value.get("live") is not True:
            return False
        return self.swarm_key is None or is_member(self.swarm_key, subkey, value.get("proof"))
