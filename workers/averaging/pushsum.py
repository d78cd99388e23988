"""Push-sum mixing, the communication of Stochastic Gradient Push (Assran et al., ICML 2019), over the peer's own
hivemind P2P daemon (workers/averaging/pushsum_wire.py) and a live set kept in the DHT (workers/averaging/liveness.py).

Each peer holds a push-sum weight w (1 at the start) and its de-biased parameters z (the model's tensors, mixed in
place); its numerator is x = w·z. In round k, with the n live members sorted by PeerID bytes and this peer at position
i, m = ceil(log2 n), it sends to (i + 2^(k mod m)) mod n (the one-peer directed exponential graph): it keeps half of x
and w, sends the other half in one message, then adds what it receives and de-biases, z = x / w. The map i -> i + c
(mod n) is a permutation for any n, so when the peers' views agree each gets exactly one message per round: weights
stay 1, and for n a power of two m consecutive rounds average exactly (other n mix, not exactly).

A message carries z itself and the weight it sends, w/2 (x/2 = (w/2)·z): the receiver adds (w/2)·z to its numerator
and w/2 to its weight. z's scale is the parameters', which suits float16; halving is exact.

Modes: synchronous (`overlap=False`) sends, then waits up to `timeout` for the message of round k (less when its view of
the live set changes, or its in-neighbour shows it moved on: a message of its, taken or refused, or the answer to one of
this peer's, which carries the receiver's round; or when this peer is more than `max_staleness` rounds behind a member:
it catches up without waiting; a second of silence re-reads the live set); a message of a
later round is held until that round, one more than `max_staleness` rounds late is refused (its sender takes its mass
back); the parameters change only inside `round()`. Overlapped (`overlap=True`): the send runs in the background, and a
message is added when it arrives (in a thread of its own, under `lock`; `hold` defers it to the next round), whatever
round this peer is in; a round waits only while this peer is more than `max_staleness` rounds ahead of the peer that
sends to it (no message of round k - max_staleness from it yet): the paper's bounded delay, which keeps the peers within
a few rounds of each other. With MAX_IN_FLIGHT sends still in flight an overlapped round sends nothing (keeps its mass):
sends never queue up behind a slow link.

Mass: a send that provably did not land (no stream, or a refusal: too late, a receiver outside the graph) is taken
back, as a message to itself; mass is lost only when a send fails after its bytes left (a timeout, a receiver that
died mid-message) or with a peer that dies: push-sum then stays an average of the survivors (weights < 1 somewhere).

Admission: with `swarm_key`, the header carries the sender's proof HMAC(key, PeerID); libp2p authenticates the
sender's PeerID, so a proof is worthless to any other PeerID. A message without a valid proof, or with a part or a
weight that is not finite, is refused, reported to `anomalies`, and never applied.

Threads: `round()` runs in the caller's (training) thread and must not be called holding `lock` (not re-entrant); the
network runs on an asyncio loop in a daemon thread, `pushsum-loop`; overlapped additions in `pushsum-apply`. Do not
fork a process holding a PushSum (threads, unix sockets to p2pd).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from hivemind.compression import CompressionBase, NoCompression
from hivemind.dht import DHT
from hivemind.p2p import P2P, PeerID
from hivemind.utils.serializer import MSGPackSerializer

from workers.averaging import pushsum_wire as wire
from workers.averaging.liveness import LIVENESS_TTL_S, LiveSet
from workers.core.membership import is_member

logger = logging.getLogger(__name__)

MAX_AHEAD = 16  # synchronous: a message more rounds ahead of this peer than this is refused (bounds what is held)
SEEN = 1024  # (sender, round) pairs remembered to refuse a duplicate
MAX_IN_FLIGHT = 2  # overlapped: a round with this many sends still in flight skips its own send (keeps its mass)
SILENT_S = 1.0  # a round whose in-neighbour stays silent this long re-reads the live set (it may have left)


class NonFiniteParameters(ValueError):
    """This peer's own parameters are not finite: it sent nothing."""


@dataclass
class RoundResult:
    k: int
    target: PeerID | None
    sent: bool  # this round started a send
    delivered: bool | None  # synchronous: the target accepted it; overlapped: None (counted when the send ends)
    send_status: str | None
    seconds: float  # wall time of round()
    weight: float  # after the round
    members: int  # the live set the round used


@dataclass
class Counts:
    """What happened since the last `take_counts()`."""

    sends: int = 0  # sends that ended, delivered or not
    accepted: int = 0  # of which the target accepted
    skipped: int = 0  # rounds that sent nothing: no other member, or (overlapped) sends still in flight
    received: int = 0  # messages added to the parameters
    dropped: int = 0  # messages addressed to this peer that it refused (stranger, non-finite, late, ...)
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass
class _Message:
    k: int
    sender: PeerID
    weight: float
    flat: torch.Tensor
    nbytes: int
    own: bool = False  # this peer's own mass back from a send that did not land


class PushSum:
    def __init__(self, dht: DHT, prefix: str, tensors: list[torch.Tensor], *, swarm_key: bytes | None = None,
                 anomalies=None, codec: CompressionBase | None = None, overlap: bool = False, timeout: float = 5.0,
                 max_staleness: int = 2, liveness_ttl: float = LIVENESS_TTL_S, lean_dht: bool = False,
                 lock: threading.Lock | None = None):  # fmt: skip
        if not tensors or not all(t.is_floating_point() for t in tensors):
            raise ValueError("push-sum mixes floating-point tensors")
        self.dht, self.tensors, self.lock = dht, list(tensors), lock
        self.swarm_key, self.anomalies, self.codec = swarm_key, anomalies, codec or NoCompression()
        self.overlap, self.timeout, self.max_staleness = overlap, timeout, max_staleness
        self.live = LiveSet(dht, prefix, swarm_key, liveness_ttl, lean=lean_dht)
        self.peer_id: PeerID = dht.peer_id
        self.handler_name = f"{prefix}.PushSum.push"
        self._dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
        self._slices, offset = [], 0
        for t in self.tensors:
            self._slices.append((offset, t.numel()))
            offset += t.numel()
        self._numel, self._parts = offset, wire.part_count(offset)
        self._state = threading.Condition()  # w, the inbox, the counts, the flags (held briefly, also by the loop)
        self._mass = threading.Lock()  # serialises what moves mass (apply, a send's halving, reset): never the loop
        self._w, self._k = 1.0, None  # the weight; the latest round started here
        self._sent: torch.Tensor | None = None  # the parameters as last sent, mixed since (apply_due)
        self._inbox: list[_Message] = []
        self._seen: dict[tuple[bytes, int], None] = {}  # (sender, round) of accepted messages, oldest first
        self._heard: dict[bytes, int] = {}  # per member, the latest round it is known to have sent in (its messages,
        # taken or refused, and the answers to this peer's)
        self._first_k: int | None = None  # the first round since this peer entered the graph
        self._counts = Counts()
        self._in_flight: list[concurrent.futures.Future] = []
        self._joined = self._held = self._closed = False
        self._tasks: list[asyncio.Task] = []
        self._refreshing: asyncio.Task | None = None
        self._p2p: P2P | None = None
        self._applier = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pushsum-apply")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pushsum-loop", daemon=True)
        self._thread.start()
        try:
            self._call(self._start(), timeout=60)
        except BaseException:
            self.shutdown()
            raise

    # ---- the caller's side -------------------------------------------------------------------------------------

    @property
    def weight(self) -> float:
        with self._state:
            return self._w

    def reset_weight(self) -> None:
        """After the parameters were replaced by another peer's (or a checkpoint's): they count as one peer's."""
        with self._mass, self._state:
            self._w, self._sent = 1.0, None

    def members(self) -> list[PeerID]:
        return list(self.live.members)

    def target_for(self, k: int, members: list[PeerID] | None = None) -> PeerID | None:
        members = self.live.members if members is None else members
        n = len(members)
        if n < 2 or self.peer_id not in members:
            return None
        return members[(members.index(self.peer_id) + 2 ** (k % math.ceil(math.log2(n)))) % n]

    def expect(self, peers: int, dht_nodes: int = 0, gone: Sequence[str] = ()) -> None:
        """What the driver saw: `peers` running (`dht_nodes` DHTs up) and the PeerIDs of incarnations that died. The
        dead leave the view at once: a killed peer's record keeps it there up to a ttl, and a synchronous round whose
        in-neighbour it is waits out its timeout (seen: a whole 4-peer swarm stalled 5.8 s after a kill). A view with
        fewer members than `peers` is re-read now: a newcomer's record is stored before the driver counts it, and the
        periodic read (every ttl/3, 3 s) would leave it without a message that long."""
        with self._state:
            version = self.live.version
            lacking = self.live.expect(peers, dht_nodes, gone)
            if self.live.version != version:
                self._state.notify_all()  # a round waiting for a message from the dead ends
        if lacking:
            self._read_locally_soon()

    def join(self, expected: int = 1, wait: float = 10.0) -> list[PeerID]:
        """Enter the graph: publish this peer's liveness record (renewed in the background from now on), accept
        messages, and wait up to `wait` s until the live set holds `expected` members; the live set."""
        if not self._joined:
            self._call(self._enter(), timeout=30)
        return self.wait_members(expected, wait)

    def leave(self) -> None:
        """Leave the graph: messages are refused from now on (their senders keep their mass), and the liveness record
        is replaced by a tombstone, so the others drop this peer at their next read."""
        with self._state:
            joined, self._joined = self._joined, False
            self._state.notify_all()
        if joined:
            with contextlib.suppress(Exception):
                self._call(self._exit(), timeout=5.0)

    def round(self, k: int) -> RoundResult:
        """Round k (never below the last one): send to its out-neighbour and add what arrived (synchronous: after
        waiting for round k's message). Mixes the tensors in place under `lock`: never call it holding that lock.
        Raises NonFiniteParameters, before anything is sent or changed, if this peer's parameters are not finite."""
        started = time.perf_counter()
        if self._closed:
            raise RuntimeError("PushSum is shut down")
        with self._state:
            self._k = k if self._k is None else max(self._k, k)
            self._first_k = k if self._first_k is None else self._first_k
            version = self.live.version
        members = self.live.members
        target = self.target_for(k, members) if self._joined else None
        future = None
        if target is not None and not (self.overlap and self._busy()):
            future = self._start_send(k, target)
        else:
            with self._state:
                self._counts.skipped += 1
        heard_from = k - (self.max_staleness if self.overlap else 0)  # the round whose message must be here
        if target is not None and heard_from >= self._first_k:
            self._wait_for_message(heard_from, members, version, started + self.timeout)
        outcome = None if self.overlap else self._outcome(future, started + self.timeout + 0.5)
        self.apply_due()
        status = wire.STATUS.get(outcome.status) if outcome is not None else None
        delivered = None if self.overlap else outcome is not None and outcome.status == wire.ACCEPTED
        return RoundResult(k, target, future is not None, delivered, status, time.perf_counter() - started,
                           self.weight, len(members))  # fmt: skip

    def settle(self) -> None:
        """Overlapped: wait, as a synchronous round would, for the message of this peer's latest round, and add what
        came (before an evaluation: it sees the last round whole)."""
        started = time.perf_counter()
        with self._state:
            k, version = self._k, self.live.version
        members = self.live.members
        if k is not None and self._joined and self.target_for(k, members) is not None:
            self._wait_for_message(k, members, version, started + self.timeout)
        self.apply_due()

    def take_counts(self) -> Counts:
        with self._state:
            counts, self._counts = self._counts, Counts()
        return counts

    def hold(self, held: bool) -> None:
        """Overlapped: while held, arriving messages wait for the next round (e.g. over an evaluation)."""
        with self._state:
            self._held = held
        if not held:
            self._schedule_apply()

    def discard(self) -> None:
        """Forget the messages not added yet (the parameters are about to be replaced)."""
        with self._mass, self._state:
            self._inbox, self._sent = [], None

    def flush(self, timeout: float | None = None) -> None:
        """Wait for this peer's sends in flight, then for the additions scheduled so far (overlapped mode)."""
        deadline = time.perf_counter() + (self.timeout + 1 if timeout is None else timeout)
        for future in list(self._in_flight):
            with contextlib.suppress(Exception):
                future.result(timeout=max(0.0, deadline - time.perf_counter()))
        with contextlib.suppress(Exception):
            self._applier.submit(lambda: None).result(timeout=max(0.0, deadline - time.perf_counter()))

    def wait_members(self, count: int, timeout: float) -> list[PeerID]:
        """Re-read the live set until it has at least `count` members (a start, tests); the live set either way."""
        deadline, full = time.monotonic() + timeout, False
        while len(self.live.members) < count and time.monotonic() < deadline:
            with contextlib.suppress(Exception):  # (lean: a local read first, then full ones)
                self._call(self._refresh(full), timeout=max(0.1, deadline - time.monotonic()))
            full = True
            if len(self.live.members) < count:
                time.sleep(0.2)
        return self.members()

    def shutdown(self) -> None:
        """Before the DHT's shutdown: leaves the graph (a tombstone), stops the background tasks, closes this P2P
        client. Safe after the DHT died (every wait is bounded)."""
        if self._closed:
            return
        self.leave()
        with self._state:
            self._closed = True
            self._state.notify_all()
        if self._p2p is not None:
            with contextlib.suppress(Exception):
                self._call(self._stop(), timeout=5.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5.0)
        if not self._thread.is_alive():
            self._loop.close()
        self._applier.shutdown(wait=False)

    # ---- mass --------------------------------------------------------------------------------------------------

    def _flat(self) -> torch.Tensor:
        """The parameters as one flat CPU tensor (the caller holds `lock`)."""
        with torch.no_grad():
            return torch.cat([t.detach().reshape(-1).to("cpu", self._dtype) for t in self.tensors])

    def _snapshot(self) -> torch.Tensor:
        with self.lock or contextlib.nullcontext():
            return self._flat()

    def _start_send(self, k: int, target: PeerID) -> concurrent.futures.Future:
        with self._mass:
            flat = self._snapshot()
            if not torch.isfinite(flat).all():
                raise NonFiniteParameters("this peer's parameters are not finite: it sent nothing")
            with self._state:
                sent_weight = self._w / 2
                self._w -= sent_weight
            self._sent = flat  # (never changed in place: the send reads it)
        future = asyncio.run_coroutine_threadsafe(self._send(k, target, flat, sent_weight), self._loop)
        self._in_flight = [f for f in self._in_flight if not f.done()] + [future]
        return future

    def _busy(self) -> bool:
        self._in_flight = [f for f in self._in_flight if not f.done()]
        return len(self._in_flight) >= MAX_IN_FLIGHT

    def _wait_for_message(self, k: int, members: list[PeerID], version: int, deadline: float) -> None:
        """Until round k's in-neighbour (by this view of the live set) is known to have made its send of round k (a
        message of round k or later from it, taken or refused; the answer to one of this peer's, from a later round),
        a message of round k came from another peer (synchronous: views that disagree), this peer is more than
        `max_staleness` rounds behind a member (synchronous: it catches up), this peer's view changed (the
        in-neighbour may be gone), or `deadline`."""
        n = len(members)
        source = members[(members.index(self.peer_id) - 2 ** (k % math.ceil(math.log2(n)))) % n].to_bytes()

        def heard() -> bool:
            if self._closed or not self._joined or self.live.version != version or self._heard.get(source, -1) >= k:
                return True
            if self.overlap:
                return False
            # (synchronous) a message of round k from another peer came: views that disagree. Or this peer is more
            # than its window behind a member: its messages are refused as late, and the in-neighbour may have passed
            # round k before this peer was in its view, never to send it (while the swarm waits for this peer's
            # messages of its rounds): catch up without waiting
            return any(m.k == k and not m.own for m in self._inbox) or self._swarm_round() > k + self.max_staleness

        with self._state:
            if self._state.wait_for(heard, timeout=max(0.0, min(SILENT_S, deadline - time.perf_counter()))):
                return
        # silent: the in-neighbour may have left (its tombstone is in this node's storage with the lean DHT) or died;
        # the periodic read would come up to ttl/3 later
        if self.live.lean:  # (a local read; without the lean DHT the periodic full reads serve)
            self._read_locally_soon()
        with self._state:
            self._state.wait_for(heard, timeout=max(0.0, deadline - time.perf_counter()))

    def _swarm_round(self) -> int:
        """The latest round heard of any member of this view (the caller holds `_state`)."""
        return max((self._heard.get(member.to_bytes(), -1) for member in self.live.members), default=-1)

    @staticmethod
    def _outcome(future: concurrent.futures.Future | None, deadline: float) -> wire.SendOutcome | None:
        if future is None:
            return None
        with contextlib.suppress(concurrent.futures.TimeoutError):
            return future.result(timeout=max(0.0, deadline - time.perf_counter()))
        return None

    def apply_due(self) -> None:
        """Add every held message that is due (synchronous: its round <= this peer's round) to the parameters. The
        mix is of the parameters as this peer last sent them, s: s' = (w s + sum w_j z_j) / (w + sum w_j), and the
        local steps taken since the send are kept: z <- z + (s' - s) (SGP steps the numerator, so a step taken while
        half the weight is out counts whole; overlapped rounds take steps between a send and the messages; in a
        synchronous round z = s). Staleness is judged on arrival only (synchronous: answered LATE, so that the
        sender takes its mass back): a message accepted early is added whenever its round comes."""
        with self._mass:
            with self._state:
                due = [m for m in self._inbox if m.own or self._due(m.k)]
                if not due:
                    return
                self._inbox = [m for m in self._inbox if not any(m is d for d in due)]
                total = self._w + sum(m.weight for m in due)
            with self.lock or contextlib.nullcontext(), torch.no_grad():
                sent = self._sent if self._sent is not None else self._flat()
                change = sum((m.weight / total) * (m.flat - sent) for m in due)
                for t, (offset, numel) in zip(self.tensors, self._slices, strict=True):
                    t.add_(change[offset : offset + numel].view(t.shape).to(t.device, t.dtype))
                self._sent = sent + change
            with self._state:
                self._w = total
                self._counts.received += sum(not m.own for m in due)
                self._counts.bytes_received += sum(m.nbytes for m in due)

    def _due(self, k: int) -> bool:
        """Whether a message of round k may be added now (overlapped: always; synchronous: from round k on)."""
        return self.overlap or (self._k is not None and k <= self._k)

    def _schedule_apply(self) -> None:
        if self.overlap and not self._held and not self._closed:
            with contextlib.suppress(RuntimeError):  # (the executor is shut down)
                self._applier.submit(self.apply_due)

    # ---- the event loop's side ---------------------------------------------------------------------------------

    def _call(self, coro, timeout: float):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=timeout)

    async def _start(self) -> None:
        # this peer's own client of the DHT's daemon (not dht.replicate_p2p()'s shared one, which belongs to
        # whichever loop first asked for it)
        daemon = await self.dht.run_coroutine(DHT._get_p2p_daemon_listen_maddr, return_future=True)
        self._p2p = await P2P.replicate(daemon)
        await self._p2p.add_binary_stream_handler(self.handler_name, self._handle)

    async def _enter(self) -> None:
        await self.live.publish(live=True)
        with self._state:
            self._joined, self._first_k = True, None
        await self._refresh()
        ttl = self.live.ttl
        self._tasks = [asyncio.create_task(self._every(self.live.publish, ttl / self.live.publishes_per_ttl)),
                       asyncio.create_task(self._every(self._refresh, ttl / self.live.reads_per_ttl))]  # fmt: skip

    async def _exit(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        if self.dht.is_alive():
            await asyncio.wait_for(self.live.publish(live=False), 2.0)

    async def _stop(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._p2p.remove_binary_stream_handler(self.handler_name), 2.0)
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._p2p.shutdown()

    async def _every(self, action, period: float) -> None:
        while True:
            await asyncio.sleep(period)
            try:
                await asyncio.wait_for(action(), timeout=period)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 (a DHT hiccup: the cached state stays, tried again later)
                logger.debug("push-sum %s failed: %r", getattr(action, "__name__", action), err)

    async def _refresh(self, full: bool = False) -> None:
        if await self.live.refresh(full):
            with self._state:
                self._state.notify_all()  # a synchronous wait for a message from a member that left ends

    def _refresh_soon(self, full: bool = True) -> None:
        """Re-read the live set now (a message from a peer this one does not know yet, a send that found nobody: in
        full; an in-neighbour silent for SILENT_S: lean, locally): views then agree sooner than the periodic read
        would make them."""
        if self._joined and (self._refreshing is None or self._refreshing.done()):
            self._refreshing = asyncio.create_task(self._every_once(partial(self._refresh, full=full)))

    def _read_locally_soon(self) -> None:
        """`_refresh_soon(full=False)` from a thread other than the loop's."""
        with contextlib.suppress(RuntimeError):  # (the loop is closed: shut down)
            self._loop.call_soon_threadsafe(self._refresh_soon, False)

    @staticmethod
    async def _every_once(action) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(action(), timeout=5.0)

    async def _send(self, k: int, target: PeerID, flat: torch.Tensor, weight: float) -> wire.SendOutcome:
        proof = self.live.proof if self.swarm_key else None
        outcome = await wire.push(self._p2p, target, self.handler_name, k=k, weight=weight, flat=flat, proof=proof,
                                  codec=self.codec, timeout=self.timeout)  # fmt: skip
        with self._state:
            self._counts.sends += 1
            self._counts.accepted += outcome.status == wire.ACCEPTED
            self._counts.bytes_sent += outcome.nbytes
            if outcome.taken_back:  # provably not applied there: the mass comes back
                self._inbox.append(_Message(k, self.peer_id, weight, flat, 0, own=True))
            if not self.overlap and outcome.round >= 1:  # the target is in that round: it made its sends of the rounds
                # before (a synchronous round waits for its send, up to its timeout), and one it did not make to this
                # peer it never will (e.g. it made it before this peer was in its view). One still on its way lands
                # later: added a round late, or refused as late and taken back by its sender
                self._moved_on(target.to_bytes(), outcome.round - 1)
                self._state.notify_all()
        if outcome.taken_back:
            self._schedule_apply()
        if outcome.status in (wire.UNREACHABLE, wire.CLOSED):
            self._refresh_soon()
        if outcome.status != wire.ACCEPTED:
            logger.debug("push-sum round %d: send to %s %s", k, target, wire.STATUS.get(outcome.status))
        return outcome

    async def _handle(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status = await self._receive(info.peer_id, reader)
        except Exception as err:  # noqa: BLE001 (cut short, unreadable: nothing was added)
            logger.debug("push-sum: message from %s failed: %r", info.peer_id, err)
            self._drop()
            status = wire.MALFORMED
        await wire.answer(writer, status, self.timeout, -1 if self._k is None else self._k)

    def _drop(self) -> None:
        with self._state:
            self._counts.dropped += 1

    def _refuse(self, what: str, sender: PeerID) -> None:
        self._drop()
        if self.anomalies is None or self.anomalies.report(f"refused {what}", str(sender)):
            logger.warning("push-sum refused %s from %s", what, sender)

    async def _receive(self, sender: PeerID, reader: asyncio.StreamReader) -> int:
        header = MSGPackSerializer.loads(await wire.read_frame(reader, wire.HEADER_MAX, self.timeout))
        refused = self._check_header(sender, header)
        if refused is None and (refused := self._check_round(sender, header["k"])) is not None:
            self._heard_from(sender, header["k"])
        if refused is not None:  # the parts are read (and dropped) first: a refusal answered mid-message could be lost
            if isinstance(header, dict) and isinstance(header.get("parts"), int):
                await wire.skip_parts(reader, min(header["parts"], self._parts), self.timeout)
            return refused
        flat, nbytes = await wire.read_parts(reader, self._parts, self._dtype, self.timeout)
        if flat.numel() != self._numel:
            self._refuse("a malformed push-sum message", sender)
            return wire.MALFORMED
        if not (math.isfinite(header["w"]) and header["w"] > 0) or not torch.isfinite(flat).all():
            self._refuse("a non-finite push-sum part", sender)
            return wire.NOT_FINITE
        return self._accept(sender, header["k"], header["w"], flat, nbytes)

    def _check_header(self, sender: PeerID, header: object) -> int | None:
        """The refusal a message's header earns (a stranger's is refused before anything else is read), or None."""
        if not isinstance(header, dict):
            self._refuse("a malformed push-sum message", sender)
            return wire.MALFORMED
        if self.swarm_key is not None and not is_member(self.swarm_key, sender.to_bytes(), header.get("proof")):
            self._refuse("a push-sum message from a stranger", sender)
            return wire.STRANGER
        if not (isinstance(header.get("k"), int) and isinstance(header.get("w"), float)
                and header.get("numel") == self._numel and header.get("parts") == self._parts):  # fmt: skip
            self._refuse("a malformed push-sum message", sender)
            return wire.MALFORMED
        return None

    def _check_round(self, sender: PeerID, k: int) -> int | None:
        """Not in the graph, too late or too early, or a duplicate: refused (counted, no anomaly); else None."""
        with self._state:
            if not self._joined or self._closed:
                status = wire.CLOSED
            elif self._out_of_window(k):
                status = wire.LATE
            elif (sender.to_bytes(), k) in self._seen:
                status = wire.DUPLICATE
            else:
                return None
            self._counts.dropped += 1
            return status

    def _out_of_window(self, k: int) -> bool:
        """Synchronous: more than `max_staleness` rounds late, or MAX_AHEAD early (overlapped: any round is taken)."""
        if self.overlap or self._k is None:
            return False
        return self._k - k > self.max_staleness or k - self._k > MAX_AHEAD

    def _accept(self, sender: PeerID, k: int, weight: float, flat: torch.Tensor, nbytes: int) -> int:
        if (refused := self._check_round(sender, k)) is not None:  # (again: the parts took time)
            return refused
        with self._state:
            self._seen[(sender.to_bytes(), k)] = None
            self._moved_on(sender.to_bytes(), k)  # (with the inbox: at once)
            if len(self._seen) > SEEN:
                del self._seen[next(iter(self._seen))]
            self._inbox.append(_Message(k, sender, weight, flat, nbytes))
            due = self._due(k)
            self._state.notify_all()
        if due:
            self._schedule_apply()
        if sender not in self.live.members:
            self._refresh_soon()
        return wire.ACCEPTED

    def _moved_on(self, member: bytes, k: int) -> None:
        """`member` is known to have made its send of round k (the caller holds `_state`)."""
        self._heard[member] = max(self._heard.get(member, k), k)

    def _heard_from(self, sender: PeerID, k: int) -> None:
        """A member's message of round k that was refused (too late or early, a duplicate, this peer outside the
        graph): its sender has moved on to round k all the same, so a round waiting for its message of an earlier
        round waits no longer (a newcomer behind the swarm catches up instead of waiting out its timeout every round).
        A member this peer's view lacks: the view is re-read now."""
        with self._state:
            self._moved_on(sender.to_bytes(), k)
            self._state.notify_all()
        if sender not in self.live.members:
            self._refresh_soon()
