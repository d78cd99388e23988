"""Admission to one run's swarm: only the peers that hold the run's secret key take part.

libp2p already proves who a peer is: its PeerID is authenticated by the connection's handshake. What hivemind lacks is
the rule "this PeerID belongs to this run". Here a peer's proof of membership is HMAC(key, PeerID), which nobody can
make for a PeerID of their own without the key, and which is worthless to anyone who copies it (it names one PeerID):
- DHT: every request and response carries an HMAC over the message with the key (`SwarmKeyAuthorizer`, hivemind's
  own authorizer hook), so a peer without the key gets no answer from any peer's DHT and its answers are ignored.
- Averaging: a member's proof travels with its matchmaking request and its entry in the group, and is published
  under `<prefix>.members` in that closed DHT for state downloads; the averager (`AdmittingAverager`) refuses
  matchmaking and state downloads from a PeerID without a valid proof, and any group with such a member. It also
  refuses a member's part that is not finite (NaN, Inf).
A peer holding the key is trusted: admission keeps strangers out, it does not defend against a member gone rogue.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
from typing import AsyncIterator  # noqa: UP035 (hivemind's ServicerBase finds streams by typing's _name)

from hivemind.averaging.allreduce import AllreduceException
from hivemind.compression import deserialize_torch_tensor
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.auth import AuthorizedRequestBase, AuthorizedResponseBase, AuthorizerBase
from hivemind.utils.timed_storage import TimedStorage, get_dht_time

from workers.swarmkey import MEMBERSHIP_S, Anomalies, is_member, members_key, membership_proof

logger = logging.getLogger(__name__)

MAX_CLOCK_SKEW_S = 60.0  # a signed DHT request older than this is a replay (hivemind's own limit too)
GATHER_KEY = "member"  # where a member's proof goes in hivemind's gather data


def publish_membership(dht, prefix: str, key: bytes) -> None:
    """Store this peer's proof in the (closed) DHT, where the other peers' averagers look it up."""
    peer_id = dht.peer_id.to_bytes()
    stored = dht.store(members_key(prefix), subkey=peer_id, value=membership_proof(key, peer_id),
                       expiration_time=get_dht_time() + MEMBERSHIP_S)  # fmt: skip
    if not stored:
        logger.warning("could not publish this peer's membership in the DHT; other peers will refuse its rounds")


class SwarmKeyAuthorizer(AuthorizerBase):
    """hivemind's DHT authorizer: requests and responses signed with an HMAC under the swarm key; a request that is
    unsigned, signed with another key, too old or replayed gets no answer."""

    def __init__(self, key: bytes, anomalies: Anomalies | None = None):
        self.key, self.anomalies = key, anomalies
        self._recent_nonces: TimedStorage[bytes, None] = TimedStorage()

    def _mac(self, message) -> bytes:
        return hmac.new(self.key, message.SerializeToString(deterministic=True), hashlib.sha256).digest()

    def _signed_by_key(self, message, auth) -> bool:
        signature, auth.signature = auth.signature, b""
        return hmac.compare_digest(signature, self._mac(message))

    async def sign_request(self, request: AuthorizedRequestBase, service_public_key) -> None:
        auth = request.auth
        auth.time, auth.nonce, auth.signature = get_dht_time(), secrets.token_bytes(8), b""
        auth.signature = self._mac(request)

    async def validate_request(self, request: AuthorizedRequestBase) -> bool:
        auth = request.auth
        if not self._signed_by_key(request, auth):
            return self._refuse("DHT request without the swarm key")
        now = get_dht_time()
        with self._recent_nonces.freeze():
            if abs(auth.time - now) > MAX_CLOCK_SKEW_S or auth.nonce in self._recent_nonces:
                return self._refuse("DHT request replayed")
        self._recent_nonces.store(auth.nonce, None, now + 3 * MAX_CLOCK_SKEW_S)
        return True

    async def sign_response(self, response: AuthorizedResponseBase, request: AuthorizedRequestBase) -> None:
        auth = response.auth
        auth.nonce, auth.signature = request.auth.nonce, b""
        auth.signature = self._mac(response)

    async def validate_response(self, response: AuthorizedResponseBase, request: AuthorizedRequestBase) -> bool:
        auth = response.auth
        if not self._signed_by_key(response, auth) or auth.nonce != request.auth.nonce:
            return self._refuse("DHT response without the swarm key")
        return True

    def _refuse(self, what: str) -> bool:
        if self.anomalies is not None:
            self.anomalies.report(what)
        return False


class AdmittingAverager:
    """For hivemind's DecentralizedAverager (as its first base). A member's proof comes with its matchmaking
    request and with its entry in the group (hivemind's `gather` data, see `membership_gather`), and for a state
    download from `<prefix>.members` in the DHT. Refused: matchmaking and state downloads from a PeerID without a
    valid proof, and any group with such a member; all-reduce parts then come only from admitted members, since
    hivemind takes parts only from the members of a group the peer has entered. No `swarm_key`: an open swarm,
    everyone is answered (standalone peers without --swarm_key)."""

    swarm_key: bytes | None = None
    anomalies: Anomalies | None = None

    def _proven(self, peer_id: PeerID, data_for_gather: bytes) -> bool:
        """Whether hivemind's gather data (bandwidth, mode, the peer's own gather) holds a proof for `peer_id`."""
        try:
            own = self.serializer.loads(self.serializer.loads(data_for_gather)[2])
        except Exception:  # noqa: BLE001 (anything unreadable proves nothing)
            return False
        return isinstance(own, dict) and is_member(self.swarm_key, peer_id.to_bytes(), own.get(GATHER_KEY))

    async def _published(self, peer_id: PeerID) -> bool:
        """Whether the DHT holds a valid proof for `peer_id` (a newcomer's may take a moment to appear)."""
        for attempt in range(3):
            found = await self.dht.get(members_key(self.prefix), latest=True, return_future=True)
            proofs = found.value if found is not None and isinstance(found.value, dict) else {}
            proof = proofs.get(peer_id.to_bytes())
            if proof is not None and is_member(self.swarm_key, peer_id.to_bytes(), proof.value):
                return True
            await asyncio.sleep(0.5 * (attempt + 1))
        return False

    def _refuse(self, what: str, peer_id: PeerID) -> None:
        if self.anomalies is None or self.anomalies.report(f"refused {what}", str(peer_id)):
            logger.warning("refused %s: %s holds no key of this run", what, peer_id)

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        if self.swarm_key is not None and not self._proven(context.remote_id, request.gather):
            self._refuse("matchmaking", context.remote_id)
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for response in super().rpc_join_group(request, context):
            yield response

    async def _aggregate_with_group(self, group_info, min_vector_size: int, **kwargs):
        for peer_id, gathered in zip(group_info.peer_ids, group_info.gathered, strict=True):
            if self.swarm_key is not None and not self._proven(peer_id, gathered):
                self._refuse("a group with a stranger", peer_id)
                raise AllreduceException(f"group refused: {peer_id} is no member of this run")
        return await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        async for message in super().rpc_aggregate_part(self._finite_parts(stream, context.remote_id), context):
            self._count(message)  # the averaged part this peer's reducer sends back
            yield message

    async def _finite_parts(self, stream: AsyncIterator[averaging_pb2.AveragingData], sender: PeerID):
        """The sender's parts as they come, up to one that is not finite (NaN or Inf): then the stream fails, and
        hivemind averages the rest of the round without that sender."""
        async for message in stream:
            if message.tensor_part.buffer and not deserialize_torch_tensor(message.tensor_part).isfinite().all():
                if self.anomalies is not None:
                    self.anomalies.report("refused a non-finite part", str(sender))
                raise AllreduceException(f"{sender} sent a part that is not finite")
            self._count(message)
            yield message

    def _count(self, message: averaging_pb2.AveragingData) -> None:
        """Bytes through this peer's reducer, both ways (workers/metrics.py: avg_bytes)."""
        counter = getattr(self, "part_bytes", None)
        if counter is not None:
            counter.value += len(message.tensor_part.buffer)

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        if self.swarm_key is not None and not await self._published(context.remote_id):
            self._refuse("a state download", context.remote_id)
            return
        async for message in super().rpc_download_state(request, context):
            yield message


def membership_gather(swarm_key: bytes | None, peer_id) -> dict | None:
    """What a member passes as `gather` to `averager.step()`: its proof, for the others' checks above."""
    return {GATHER_KEY: membership_proof(swarm_key, peer_id.to_bytes())} if swarm_key else None
