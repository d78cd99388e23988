"""Admission to one run's swarm: only the peers that hold the run's secret key take part.

libp2p already proves who a peer is: its PeerID is authenticated by the connection's handshake. What hivemind lacks is
the rule "this PeerID belongs to this run". Here a peer's proof of membership is HMAC(key, PeerID), which nobody can
make for a PeerID of their own without the key, and which is worthless to anyone who copies it (it names one PeerID):
- DHT: every request and response carries an HMAC over the message with the key (`SwarmKeyAuthorizer`, hivemind's
  own authorizer hook), so a peer without the key gets no answer from any peer's DHT and its answers are ignored.
- Averaging: a member's proof is published under `<prefix>.members` in that closed DHT; the averager
  (`AdmittingAverager`, on every hivemind averager the project makes, hivemind.Optimizer's included) refuses
  matchmaking and state downloads from a PeerID without a valid proof there, and any group with such a member. It
  also refuses a member's part that is not finite (NaN, Inf).
A peer holding the key is trusted: admission keeps strangers out, it does not defend against a member gone rogue.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import multiprocessing as mp
import secrets
import time
from typing import AsyncIterator  # noqa: UP035 (hivemind's ServicerBase finds streams by typing's _name)

from hivemind.averaging.allreduce import AllreduceException
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.auth import AuthorizedRequestBase, AuthorizedResponseBase, AuthorizerBase
from hivemind.utils.timed_storage import TimedStorage, get_dht_time

from workers.averaging.flat import finite_part
from workers.averaging.runner import lost_a_part
from workers.core.anomalies import Anomalies
from workers.core.membership import MEMBERSHIP_S, is_member, members_key, membership_proof

logger = logging.getLogger(__name__)

MAX_CLOCK_SKEW_S = 60.0  # a signed DHT request older than this is a replay (hivemind's own limit too)
STRANGER_S = 10.0  # a PeerID with a liveness record but no membership proof is looked up again after this long


class MembershipError(RuntimeError):
    """A peer could not publish its proof: every other member would refuse its rounds and its state downloads."""


PUBLISH_TRIES = 5


def publish_membership(dht, prefix: str, key: bytes, tries: int = PUBLISH_TRIES) -> None:
    """Store this peer's proof in the (closed) DHT, where the other peers' averagers look it up; retried, and then
    MembershipError: a peer whose proof nobody can find is no member, and must not train as if it were."""
    peer_id = dht.peer_id.to_bytes()
    for attempt in range(tries):
        try:
            if dht.store(members_key(prefix), subkey=peer_id, value=membership_proof(key, peer_id),
                         expiration_time=get_dht_time() + MEMBERSHIP_S):  # fmt: skip
                return
            problem = "the DHT took it nowhere"
        except Exception as err:  # noqa: BLE001 (a DHT that is down, a timeout: all retried alike)
            problem = repr(err)
        logger.warning("could not publish this peer's membership (try %d of %d): %s", attempt + 1, tries, problem)
        time.sleep(0.5 * (attempt + 1))
    raise MembershipError(f"could not publish this peer's membership in the DHT after {tries} tries: {problem}")


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
        if abs(auth.time - now) > MAX_CLOCK_SKEW_S:  # a replay of an old request, or a machine whose clock is off
            return self._refuse(f"DHT request from a clock more than {MAX_CLOCK_SKEW_S:.0f} s off (clock skew: "
                                "synchronize the machines' clocks, e.g. with NTP; or a replayed request)",
                                f"{auth.time - now:+.0f} s")  # fmt: skip
        with self._recent_nonces.freeze():
            if auth.nonce in self._recent_nonces:
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

    def _refuse(self, what: str, who: str = "unknown") -> bool:
        if self.anomalies is not None:
            self.anomalies.report(what, who)
        return False


class AdmittingAverager:
    """For a hivemind averager (as its first base: DecentralizedAverager, or hivemind.Optimizer's state and gradient
    averagers). A PeerID is admitted when the (closed) DHT holds a valid proof for it under `<members_prefix>.members`
    (libp2p has authenticated the PeerID; `publish_membership` stored the proof); admitted PeerIDs are remembered.
    Refused: matchmaking and state downloads from a PeerID without a proof, and any group with such a member;
    all-reduce parts then come only from admitted members, since hivemind takes parts only from the members of a
    group the peer has entered. No `swarm_key`: an open swarm, everyone is answered (standalone peers without
    --swarm_key). It also counts the bytes through this peer's reducer and the rounds whose all-reduce lost a part."""

    def __init__(self, *args, swarm_key: bytes | None = None, anomalies: Anomalies | None = None,
                 members_prefix: str | None = None, **kwargs):  # fmt: skip
        """`members_prefix`: the run's prefix, where its proofs are published (None: this averager's own prefix;
        hivemind.Optimizer's averagers have prefixes of their own)."""
        self.swarm_key, self.anomalies, self.members_prefix = swarm_key, anomalies, members_prefix
        fork = mp.get_context("fork")  # set before hivemind forks the averager's process, which writes them
        self.part_bytes = fork.Value("q", 0, lock=False)  # bytes through this peer's reducer, both ways
        self.partial_rounds = fork.Value("q", 0, lock=False)  # rounds whose all-reduce lost a part
        self._admitted: set[PeerID] = set()
        self._strangers: dict[PeerID, float] = {}  # PeerIDs whose liveness records were refused: when
        super().__init__(*args, **kwargs)

    async def _is_member(self, peer_id: PeerID) -> bool:
        if self.swarm_key is None or peer_id in self._admitted:
            return True
        if await self._published(peer_id):
            self._admitted.add(peer_id)
            return True
        return False

    async def _counts_as_live(self, peer_id: PeerID) -> bool:
        """For sticky groups (workers/averaging/sticky.py): whether a liveness record's PeerID is a member. One look
        at the DHT, and a PeerID found to be none is not looked up again for STRANGER_S."""
        if self.swarm_key is None or peer_id in self._admitted:
            return True
        if time.monotonic() < self._strangers.get(peer_id, -math.inf) + STRANGER_S:
            return False
        if await self._published(peer_id, tries=1):
            self._admitted.add(peer_id)
            return True
        self._strangers[peer_id] = time.monotonic()
        return False

    async def _published(self, peer_id: PeerID, tries: int = 3) -> bool:
        """Whether the DHT holds a valid proof for `peer_id` (a newcomer's may take a moment to appear)."""
        key = members_key(self.members_prefix or self.prefix)
        for attempt in range(tries):
            found = await self.dht.get(key, latest=True, return_future=True)
            proofs = found.value if found is not None and isinstance(found.value, dict) else {}
            proof = proofs.get(peer_id.to_bytes())
            if proof is not None and is_member(self.swarm_key, peer_id.to_bytes(), proof.value):
                return True
            if attempt + 1 < tries:
                await asyncio.sleep(0.5 * (attempt + 1))
        return False

    def _refuse(self, what: str, peer_id: PeerID) -> None:
        if self.anomalies is None or self.anomalies.report(f"refused {what}", str(peer_id)):
            logger.warning("refused %s: %s holds no key of this run", what, peer_id)

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        if not await self._is_member(context.remote_id):
            self._refuse("matchmaking", context.remote_id)
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for response in super().rpc_join_group(request, context):
            yield response

    async def _aggregate_with_group(self, group_info, min_vector_size: int, **kwargs):
        for peer_id in group_info.peer_ids:
            if not await self._is_member(peer_id):
                self._refuse("a group with a stranger", peer_id)
                raise AllreduceException(f"group refused: {peer_id} is no member of this run")
        return await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id: bytes | None = None, **kwargs):
        """hivemind's all-reduce, which reports a round as a success even when a reducer failed for some of this
        peer's parts (it keeps their local values) or a sender's parts never reached this peer's reducer (its part
        is averaged without them): such a round is counted in `partial_rounds`."""
        group_id = group_info.group_id if group_id is None else group_id
        await super()._run_allreduce_inplace_(tensors, group_info, group_id, **kwargs)
        if lost_a_part(self._running_groups[group_id].result()):
            self.partial_rounds.value += 1

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
            if message.tensor_part.buffer and not finite_part(message.tensor_part):
                if self.anomalies is not None:
                    self.anomalies.report("refused a non-finite part", str(sender))
                raise AllreduceException(f"{sender} sent a part that is not finite")
            self._count(message)
            yield message

    def _count(self, message: averaging_pb2.AveragingData) -> None:
        """Bytes through this peer's reducer, both ways (the metrics' averaging_bytes)."""
        self.part_bytes.value += len(message.tensor_part.buffer)

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        if not await self._is_member(context.remote_id):
            self._refuse("a state download", context.remote_id)
            return
        async for message in super().rpc_download_state(request, context):
            yield message
