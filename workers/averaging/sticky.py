"""Sticky groups: when the group that formed is the whole live swarm, the next rounds skip DHT matchmaking and run the
all-reduce in that same group at once (the `sticky` lever). In a swarm that fits in one group every matchmade round
forms the same group anyway, and matchmaking was most of a small round's cost.

Protocol (each member runs it alone; nothing is exchanged beyond what hivemind's all-reduce sends):
1. Forming. A matchmade round completes at this member (no part lost: `lost_a_part`), its group has >= 2 members, all
   in NODE mode, equals the live set read in full from the DHT, and will not run its next rounds through gloo
   (workers/averaging/gloo.py `plan`, from the same gathered data). The member keeps G = (base id = the matchmade
   group_id, the ordered peer ids, the gathered data, counter 0).
2. A sticky round. Where hivemind's step would look for a group (`Matchmaking.look_for_group`), the member checks
   locally that the live set still equals G's peers and that its mode and bandwidth are unchanged (its gathered user
   data may change: a sticky round hands out G's copy, and the project's, gloo's offer, planned no gloo group there,
   nor does it from that copy; a member told a new swarm size before the others must not leave G alone, or the
   others' sticky round loses its parts); then counter += 1 and the group is GroupInfo(sha256(base id, counter), G's
   peers in G's order, G's gathered data), at once. hivemind's step then runs its all-reduce as for any group;
   hivemind accepts a part only for the runner's group_id, so only members running the same attempt of the same
   group average together. Senders must come within `sticky_wait` (min_matchmaking_time + request_timeout, what a
   plain round waits for its group).
3. Arrivals apart. A part for this member's next attempt that arrives before the member registered it waits for the
   registration (at most sticky_wait), instead of hivemind's immediate BAD_GROUP_ID.
4. Failure. A sticky all-reduce gives up at the first reducer or sender it loses (SaferRunner's `fail_fast`: its
   tensors, one flat buffer, are then left as they were), and anything but a complete round drops G; so does a change
   of the live set, or of the member's mode or bandwidth. hivemind's step then retries, by matchmaking, within the
   step's deadline: members whose views of the live set differed, or the survivors of a dead member, meet there in
   the same round. A member without G answers parts for G's next attempt with BAD_GROUP_ID at once, so its
   groupmates give up at once.
   Counters cannot drift: a sticky round completes at a member only if every member sent it parts for the same
   group_id and reduced its parts in it, i.e. every member ran the same attempt. A member that failed or left drops
   G; the others' next attempt then fails (its parts never come, or are refused) and they drop G too. A new G starts
   from a new matchmade group_id.
5. Liveness. Each member keeps a record under `<prefix>.live` (subkey: its PeerID, value True, expiring after
   live_ttl s), refreshed every live_ttl/3 s, and turned False on shutdown. Only members count (`_counts_as_live`:
   in a closed swarm, a PeerID whose membership proof is published). A newcomer's record changes the live set: the
   others drop G and meet it in matchmaking. A dead member costs the survivors one failed round; its record expires
   within live_ttl, and the first matchmade group equal to the remaining live set sticks again.
Limits: step(scheduled_time=...) is ignored in sticky rounds (they start at once); the gathered data a sticky round
returns is G's; a group smaller than the live swarm never sticks, so gossip mixing across groups is untouched.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
from dataclasses import dataclass
from typing import AsyncIterator  # noqa: UP035 (hivemind's ServicerBase finds streams by typing's _name)

from hivemind.averaging.allreduce import AllreduceException, AveragingMode
from hivemind.averaging.control import StepControl
from hivemind.averaging.group_info import GroupInfo
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import MPFuture
from hivemind.utils.asyncio import achain, anext, as_aiter
from hivemind.utils.timed_storage import get_dht_time

from workers.averaging.gloo import plan as gloo_plan
from workers.averaging.levers import LeverAware, dht_read, dht_store
from workers.averaging.matchmaking import hivemind_internals
from workers.averaging.runner import lost_a_part

logger = logging.getLogger(__name__)


def sticky_group_id(base_id: bytes, counter: int) -> bytes:
    """The group_id of attempt `counter` of the sticky group that matchmaking formed as `base_id`."""
    return hashlib.sha256(b"sticky/" + base_id + counter.to_bytes(8, "big")).digest()[:20]


@dataclass
class StickyGroup:
    base_id: bytes
    peer_ids: tuple
    gathered: tuple
    my_node: list  # this member's gathered [bandwidth, mode], as the group formed
    counter: int = 0

    def group_info(self) -> GroupInfo:
        return GroupInfo(sticky_group_id(self.base_id, self.counter), self.peer_ids, self.gathered)


class StickyGroups(LeverAware):
    """Mixin for hivemind's DecentralizedAverager (before it in the bases). See the module's docstring."""

    def run(self):
        """In the averager's (forked) process: its state, and hivemind's Matchmaking with the sticky group first."""
        from hivemind.averaging import averager

        self._sticky_group: StickyGroup | None = None
        self._sticky_waiters: dict[bytes, asyncio.Future] = {}
        self._sticky_counts = collections.Counter()
        self._live_task = None
        if self.levers.sticky:
            hivemind_internals("StickyGroups")
            averager.Matchmaking = sticky_matchmaking(averager.Matchmaking, self)
        super().run()

    def _wait_s(self) -> float:
        waits = self.matchmaking_kwargs
        return waits["min_matchmaking_time"] + (waits["request_timeout"] or 0)

    async def _counts_as_live(self, peer_id: PeerID) -> bool:
        """Whether a liveness record's PeerID counts (the closed swarm's averager: only members)."""
        return True

    # -- liveness ------------------------------------------------------------------------------------------------

    async def _declare_for_download_periodically(self):
        if self.levers.sticky and self._live_task is None:  # the averager's process has just started its loop
            self._live_task = asyncio.create_task(self._live_periodically())
        return await super()._declare_for_download_periodically()

    async def _live_periodically(self) -> None:
        while True:
            try:
                await self._declare_live(True)
            except Exception as err:  # noqa: BLE001 (the next refresh tries again)
                logger.debug("liveness record not stored: %r", err)
            await asyncio.sleep(self.levers.live_ttl / 3)

    async def _declare_live(self, live: bool) -> None:
        expires = get_dht_time() + self.levers.live_ttl
        await dht_store(
            self.dht,
            f"{self.prefix}.live",
            self.peer_id.to_bytes(),
            live,
            expires,
            self.levers.lean_dht,
            self.swarm_nodes(),
        )

    async def _live_set(self, full: bool) -> frozenset:
        local = self.levers.lean_dht and not full
        read = dht_read(self.dht, f"{self.prefix}.live", local=local, swarm=self.swarm_nodes())
        result = await asyncio.wait_for(read, timeout=self._wait_s())
        if result is None or not isinstance(result.value, dict):
            return frozenset()
        now = get_dht_time()
        records = result.value.items()
        live = [PeerID(key) for key, entry in records if entry.value is True and entry.expiration_time > now]
        return frozenset([peer for peer in live if await self._counts_as_live(peer)])

    async def _shutdown(self, timeout: float | None) -> None:
        if self.levers.sticky:
            with contextlib.suppress(Exception):  # (the record expires anyway)
                await asyncio.wait_for(self._declare_live(False), timeout=1.0)
        await super()._shutdown(timeout)

    # -- rounds --------------------------------------------------------------------------------------------------

    async def _sticky_attempt(self, step: StepControl) -> GroupInfo | None:
        """The sticky group's next attempt, or None (matchmaking)."""
        group = self._sticky_group
        if group is None:
            return None
        if reason := await self._reason_to_drop(group, step):
            self._drop(reason)
            return None
        group.counter += 1
        return group.group_info()

    async def _reason_to_drop(self, group: StickyGroup, step: StepControl) -> str | None:
        if self.serializer.loads(step.data_for_gather)[:2] != group.my_node:
            return "mode or bandwidth changed"
        try:
            live = await self._live_set(full=False)
        except Exception as err:  # noqa: BLE001
            return f"live set unreadable: {err!r}"
        if live != frozenset(group.peer_ids):
            return f"live set changed ({len(live)} live, {len(group.peer_ids)} in the group)"
        return None

    def _drop(self, reason: str) -> None:
        if self._sticky_group is not None:
            logger.info("sticky group dropped: %s", reason)
            self._sticky_counts["dropped"] += 1
        self._sticky_group = None
        for waiter in self._sticky_waiters.values():
            if not waiter.done():
                waiter.set_result(False)
        self._sticky_waiters.clear()

    def _is_sticky(self, group_info: GroupInfo) -> bool:
        group = self._sticky_group
        return group is not None and group_info.group_id == sticky_group_id(group.base_id, group.counter)

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs):
        sticky = self._is_sticky(group_info)
        if sticky:  # registered by now: the parts that came early go on
            waiter = self._sticky_waiters.pop(group_info.group_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(True)
            wait_s = self._wait_s()
            kwargs.update(sender_timeout=wait_s, reducer_timeout=2 * wait_s, fail_fast=True)
        try:
            gathered = await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)
            future = self._running_groups.get(group_info.group_id)
            complete = future is not None and future.done() and not lost_a_part(future.result())
            if sticky and not complete:
                raise AllreduceException(f"sticky round {self._sticky_group.counter} lost a part")
        except BaseException as err:
            if sticky:
                self._sticky_counts["sticky_failed"] += 1
                self._drop(f"sticky round failed: {err!r:.200}")
            raise
        if sticky:
            self._sticky_counts["sticky"] += 1
        elif self.levers.sticky and complete:  # a matchmade round: decided before hivemind hands out its result
            await self._maybe_form(group_info)
        return gathered

    async def _maybe_form(self, info: GroupInfo) -> None:
        """Keep a complete matchmade group that equals the live swarm."""
        try:
            modes = [AveragingMode(self.serializer.loads(data)[1]) for data in info.gathered]
            live = await self._live_set(full=True)
        except Exception as err:  # noqa: BLE001
            logger.debug("no sticky group: %r", err)
            return
        nodes = all(mode == AveragingMode.NODE for mode in modes)
        if info.group_size >= 2 and nodes and live == frozenset(info.peer_ids) and not self._moves_onto_gloo(info):
            my_node = self.serializer.loads(info.gathered[info.peer_ids.index(self.peer_id)])[:2]
            self._sticky_group = StickyGroup(info.group_id, info.peer_ids, info.gathered, my_node)
            self._sticky_counts["formed"] += 1

    def _moves_onto_gloo(self, info: GroupInfo) -> bool:
        """Whether the group's members run the next rounds through gloo (workers/averaging/gloo.py: every member
        offered it in its gathered data, and counted the swarm as this group): then hivemind keeps no group."""
        try:
            offers = {peer.to_bytes(): self.serializer.loads(self.serializer.loads(data)[2])
                      for peer, data in zip(info.peer_ids, info.gathered, strict=True)}  # fmt: skip
        except Exception:  # noqa: BLE001 (not the project's gathered data)
            return False
        return gloo_plan(offers, self.peer_id.to_bytes(), None) is not None

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        request = await anext(stream)
        if self.levers.sticky and request.group_id not in self._running_groups:
            await self._await_registration(request.group_id)
        async for message in super().rpc_aggregate_part(achain(as_aiter(request), stream), context):
            yield message

    async def _await_registration(self, group_id: bytes) -> None:
        """A part for the attempt this member is starting, or its next one, waits until the member registers that
        attempt, drops its group, or sticky_wait passes."""
        group = self._sticky_group
        if group is None or group_id not in (sticky_group_id(group.base_id, group.counter),
                                             sticky_group_id(group.base_id, group.counter + 1)):  # fmt: skip
            return
        waiter = self._sticky_waiters.setdefault(group_id, asyncio.get_event_loop().create_future())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(waiter), timeout=self._wait_s())

    # -- a report for the host process ---------------------------------------------------------------------------

    def sticky_report(self, timeout: float = 30) -> dict:
        """This averager's sticky counts (formed, sticky, sticky_failed, dropped) and its group, None or (base id,
        counter, size)."""
        future = MPFuture()
        self._outer_pipe.send(("_sticky_report", [], dict(future=future)))
        return future.result(timeout=timeout)

    async def _sticky_report(self, future: MPFuture) -> None:
        group = self._sticky_group
        where = None if group is None else (group.base_id.hex(), group.counter, len(group.peer_ids))
        future.set_result(dict(counts=dict(self._sticky_counts), group=where))


def sticky_matchmaking(base: type, averager: StickyGroups) -> type:
    """hivemind's Matchmaking (as the project adjusted it), whose group is the averager's sticky group when it has one:
    hivemind's step then runs, registers, retries and times out a sticky round as any other."""

    class StickyMatchmaking(base):
        async def look_for_group(self, step: StepControl) -> GroupInfo | None:
            group_info = await averager._sticky_attempt(step)
            return group_info if group_info is not None else await super().look_for_group(step)

    return StickyMatchmaking
