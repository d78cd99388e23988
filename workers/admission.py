"""Admission to one run's swarm: only the peers that hold the run's secret key take part.

libp2p already proves who a peer is: its PeerID is authenticated by the connection's handshake. What hivemind lacks is
the rule "this PeerID belongs to this run". Here a peer's proof of membership is HMAC(key, PeerID), which nobody can
make for a PeerID of their own without the key, and which is worthless to anyone who copies it (it names one PeerID):
- DHT: every request and response carries an HMAC over the message with the key (`SwarmKeyAuthorizer`, hivemind's
  own authorizer hook), so a peer without the key gets no answer from any peer's DHT and its answers are ignored.
- Averaging: each peer publishes its proof under `<prefix>.members` in that closed DHT before it averages; the
  averager (workers/averaging.py) refuses matchmaking, all-reduce parts and state downloads from a PeerID without a
  valid proof, and a group with such a member.
A peer holding the key is trusted: admission keeps strangers out, it does not defend against a member gone rogue.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from typing import AsyncIterator  # noqa: UP035 (hivemind's ServicerBase finds streams by typing's _name)

from hivemind.averaging.allreduce import AllreduceException
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.auth import AuthorizedRequestBase, AuthorizedResponseBase, AuthorizerBase
from hivemind.utils.timed_storage import TimedStorage, get_dht_time

from workers.swarmkey import MEMBERSHIP_S, Anomalies, is_member, members_key, membership_proof

logger = logging.getLogger(__name__)

MAX_CLOCK_SKEW_S = 60.0  # a signed DHT request older than this is a replay (hivemind's own limit too)
REFUSED_RECHECK_S = 5.0  # a PeerID without a proof is looked up again after this long (it may have just joined)


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
    """For hivemind's DecentralizedAverager (as its first base): matchmaking, all-reduce parts and state downloads
    are answered only for PeerIDs with a valid proof in `<prefix>.members`, and a group with any other member is
    refused. No `swarm_key`: an open swarm, everyone is answered (standalone peers without --swarm_key)."""

    swarm_key: bytes | None = None
    anomalies: Anomalies | None = None

    async def _admits(self, peer_id: PeerID, what: str) -> bool:
        if self.swarm_key is None or peer_id == self.peer_id:
            return True
        known = self.__dict__.setdefault("_known", {})  # PeerID -> True (a member), or when to look it up again
        if known.get(peer_id) is not True and time.monotonic() >= known.get(peer_id, 0.0):
            known[peer_id] = time.monotonic() + REFUSED_RECHECK_S  # until the members' proofs say otherwise
            found = await self.dht.get(members_key(self.prefix), latest=True, return_future=True)
            for subkey, proof in found.value.items() if found is not None and isinstance(found.value, dict) else ():
                if is_member(self.swarm_key, subkey, proof.value):
                    known[PeerID(subkey)] = True
        if known[peer_id] is True:
            return True
        if self.anomalies is None or self.anomalies.report(f"refused {what}", str(peer_id)):
            logger.warning("refused %s: %s holds no key of this run", what, peer_id)
        return False

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        if not await self._admits(context.remote_id, "matchmaking"):
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for response in super().rpc_join_group(request, context):
            yield response

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        if not await self._admits(context.remote_id, "an all-reduce part"):
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in super().rpc_aggregate_part(stream, context):
            yield message

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        if not await self._admits(context.remote_id, "a state download"):
            return
        async for message in super().rpc_download_state(request, context):
            yield message

    async def _aggregate_with_group(self, group_info, min_vector_size: int, **kwargs):
        for peer_id in group_info.peer_ids:
            if not await self._admits(peer_id, "a group with a stranger"):
                raise AllreduceException(f"group refused: {peer_id} is no member of this run")
        return await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)
