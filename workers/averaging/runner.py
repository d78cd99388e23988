"""hivemind 1.1.12's all-reduce, made safe where a member dies mid-round; and the one test of a round that lost a part.

hivemind's bug (averaging/partition.py, TensorPartReducer): every sender's handler awaits the same future for the
average of the current part, unshielded. When a sender dies mid-round, p2p cancels its handler, the cancellation
cancels that shared future, and the last contribution then fails in `set_result` (InvalidStateError). When that last
contribution is the peer's own (allreduce.py: its own parts have no error handling), its averaged parts are never
registered and the round hangs until allreduce_timeout (30 s with the project's round_timeout, against 4.6 s with
the fix, measured with a member SIGKILLed 0.12 s into a round). Shielded, the others' average completes and the
dead sender is banned as hivemind means it to be.
"""

from __future__ import annotations

import asyncio
import math

from hivemind.averaging.allreduce import AllreduceException, AllReduceRunner
from hivemind.averaging.partition import TensorPartReducer
from hivemind.p2p import PeerID

from workers.averaging.matchmaking import hivemind_internals


def lost_a_part(runner: AllReduceRunner) -> bool:
    """Whether a finished all-reduce lost a part, which hivemind still reports as a success: a reducer failed for some
    of this peer's parts (they kept their local values), or a sender's parts never reached this peer's reducer (its
    part was averaged without them)."""
    senders_failed = any(after != math.inf for after in runner.tensor_part_reducer.sender_failed_after)
    return bool(runner.tensor_part_container.failed_size or senders_failed)


class ShieldedPartReducer(TensorPartReducer):
    """A sender's handler cancelled while it waits for a part's average no longer cancels that average for all."""

    async def accumulate_part(self, sender_index: int, part_index: int, tensor_part, weight: float = 1.0):
        return await asyncio.shield(super().accumulate_part(sender_index, part_index, tensor_part, weight=weight))


class SaferRunner(AllReduceRunner):
    """hivemind's AllReduceRunner with a ShieldedPartReducer, and part streams that must open within `open_timeout` s
    (hivemind opens them with no timeout; one that does not open counts as a failed reducer, as any stream error).
    `fail_fast`: the round gives up at the first reducer or sender it loses, before any of its results is handed out
    (hivemind would finish it without them, keeping local values: a round that lost a part)."""

    open_timeout: float = 10.0

    def __init__(self, *args, fail_fast: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.tensor_part_reducer.__class__ = ShieldedPartReducer  # the same state, one method more careful
        self.fail_fast = fail_fast

    async def _communicate_with_peer(self, peer_id: PeerID):
        try:
            await super()._communicate_with_peer(peer_id)
        except BaseException as err:
            self._lost(f"reducer {peer_id}: {err!r:.120}")  # (at once: no output is handed out in between)
            raise

    async def _ban_sender(self, peer_id: PeerID):
        await super()._ban_sender(peer_id)
        self._lost(f"sender {peer_id}")

    def _lost(self, what: str) -> None:
        if self.fail_fast:
            self.finalize(exception=AllreduceException(f"gave up the round, it lost {what}"))

    def _get_peer_stub(self, peer: PeerID):
        return _BoundedOpenStub(super()._get_peer_stub(peer), self.open_timeout)


class _BoundedOpenStub:
    def __init__(self, stub, timeout: float):
        self._stub, self._timeout = stub, timeout

    async def rpc_aggregate_part(self, inputs):
        return await asyncio.wait_for(self._stub.rpc_aggregate_part(inputs), timeout=self._timeout)


class SaferAllReduce:
    """Mixin for a hivemind averager (before DecentralizedAverager): its rounds run with SaferRunner. hivemind builds
    the runner by the name in its averager module; that name is substituted in the averager's (forked) process only."""

    def run(self):
        from hivemind.averaging import averager

        hivemind_internals("SaferRunner")
        waits = self.matchmaking_kwargs
        SaferRunner.open_timeout = waits["min_matchmaking_time"] + (waits["request_timeout"] or 0)
        averager.AllReduceRunner = SaferRunner
        super().run()
