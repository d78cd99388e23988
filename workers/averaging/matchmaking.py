"""hivemind's matchmaking, adjusted where a launched swarm needs it, without forking hivemind: each change is a class
substituted in a hivemind module before the averager's process forks (the process inherits it), behind a version
guard. Paced key reads (a waiting peer re-read the DHT back to back) and a group target that follows the live swarm."""

from __future__ import annotations

import asyncio
import logging
import math
import time

logger = logging.getLogger(__name__)

MATCHMAKING_POLL_S = 0.1  # the least time between two reads of the group's key in the DHT while matchmaking


def paced_matchmaking(poll_s: float = MATCHMAKING_POLL_S) -> None:
    """hivemind 1.1.12's matchmaking reads the group's key from the DHT (`get_averagers`, a DHT get that asks every
    node holding it) back to back for as long as a peer waits for its group: a leader waiting for a partner 0.3 s
    late burnt 0.29 s of CPU in its averager, DHT and p2pd processes, against 0.055 s for a round whose peers
    arrive at once (4 peers, 250 KB): CPU that training loses where peers share cores. Paced, a peer reads at most once
    per `poll_s`; the first read of a round is at once, so a peer that arrives finds the waiting leader at once. Set
    in hivemind's matchmaking module, before hivemind forks the averager's process, which inherits it."""
    from hivemind.averaging import matchmaking
    from hivemind.averaging.key_manager import GroupKeyManager

    if getattr(matchmaking.GroupKeyManager, "poll_s", None) == poll_s:
        return
    hivemind_internals("paced_matchmaking")

    class PacedGroupKeyManager(GroupKeyManager):
        last_read = -math.inf

        async def get_averagers(self, group_key, only_active: bool):
            await asyncio.sleep(max(0.0, self.last_read + poll_s - time.monotonic()))
            try:
                return await self.read_averagers(group_key, only_active)
            finally:
                self.last_read = time.monotonic()

        async def read_averagers(self, group_key, only_active: bool):
            """One read of the key: hivemind's, from every node holding it (workers/averaging/levers.py: locally)."""
            return await super().get_averagers(group_key, only_active)

    PacedGroupKeyManager.poll_s = poll_s
    matchmaking.GroupKeyManager = PacedGroupKeyManager


TESTED_HIVEMIND = ("1.1.12",)  # the versions whose internals these substitutions were written against


def hivemind_internals(what: str) -> None:
    """A guard before touching one of hivemind's internals: a version it was not written for gets a warning."""
    import hivemind

    if hivemind.__version__ not in TESTED_HIVEMIND and what not in _warned:
        _warned.add(what)
        logger.warning("%s touches hivemind internals tested with hivemind %s only; this is hivemind %s",
                       what, ", ".join(TESTED_HIVEMIND), hivemind.__version__)  # fmt: skip


_warned: set[str] = set()


def live_target_matchmaking() -> None:
    """hivemind's Matchmaking takes its group target once, when the averager's process starts; the swarm's size
    changes as peers die, restart, join and leave. A leader whose target is a peer that is not there waits out
    `matchmaking_time` every round. Here the target may be a shared value (multiprocessing.Value) that the training
    process changes and the matchmaking reads each time. Set in hivemind's averager module before the averager's
    process forks. (hivemind 1.1.12 starts every group in one bucket, `initial_group_bits=""`, so the key manager's
    own target is unused.)"""
    from hivemind.averaging import averager, matchmaking

    if getattr(averager.Matchmaking, "follows_live_target", False):
        return
    hivemind_internals("live_target_matchmaking")

    class LiveTargetMatchmaking(matchmaking.Matchmaking):
        follows_live_target = True

        def __init__(self, *args, target_group_size=None, **kwargs):
            self._live = target_group_size if hasattr(target_group_size, "value") else None
            size = self._live.value if self._live is not None else target_group_size
            super().__init__(*args, target_group_size=size, **kwargs)

        @property
        def target_group_size(self) -> int | None:
            return self._live.value if self._live is not None else self._fixed

        @target_group_size.setter
        def target_group_size(self, size: int | None) -> None:
            self._fixed = size

    averager.Matchmaking = LiveTargetMatchmaking
