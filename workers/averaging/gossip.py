"""Gossip averaging: hivemind's DecentralizedAverager over the model's tensors. Every H steps (or once per epoch)
the peer joins a DHT-matched group and moves its tensors `alpha` of the way to the group's mean.

A round has two phases: `start_round` (snapshot the tensors, hand them to hivemind) and `finish_round` (apply the
result, record it). Blocking gossip calls both at once. With `gossip.overlap` the round runs in the background
while local steps go on, and lands as a correction that keeps those steps: θ ← θ + (avg(θ_sent) − θ_sent), as
Stochastic Gradient Push's overlap and hivemind's delayed averaging do; at most one round is in flight (the next
one waits for it). A round per epoch lands before the epoch's evaluation; a round every H steps may carry over an
epoch's end, but not past the peer's last epoch.

Matchmaking is paced (`paced_matchmaking`): hivemind re-read the DHT back to back while a peer waited for its group.
A round costs what it must (workers/averaging/levers.py, `Levers`): once a group is the whole swarm, its members run
the next rounds through a gloo process group of their own (gloo.py; without it, hivemind keeps the group: sticky.py),
the DHT is asked only what a small swarm needs, and the tensors travel as one flat buffer per dtype, a part per
reducer (flat.py). `levers=Levers.off()` (or `gossip.cheap_rounds: false`) is plain hivemind.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing as mp
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from torch import nn

from workers.averaging.allreduce import ring_bytes
from workers.averaging.base import AveragingStrategy, Diverged, all_finite, averaged_tensors
from workers.averaging.flat import FlatLayout
from workers.averaging.gloo import GlooRounds, ip4_host
from workers.averaging.levers import Levers
from workers.averaging.matchmaking import live_target_matchmaking, paced_matchmaking
from workers.core.config import GossipConfig
from workers.peer.state import DONOR_WAIT_S

logger = logging.getLogger(__name__)

# the all-reduce's parts: 4 MiB instead of hivemind's 512 KiB. A 100 MB round of 4 peers on 2 cores took 2.0 s
# instead of 2.5-2.8 s (1.0 s of CPU per peer instead of 1.3-1.5 s: fewer messages through protobuf and p2pd)
PART_SIZE_BYTES = 2**22


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy for hivemind in the default (contiguous) layout. hivemind splits every averaged tensor with
    `view(-1)`, which raises on channels_last strides, and `.to(copy=True)` keeps them: every round would fail."""
    return tensor.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)


def compression(name: str):
    """hivemind's codec for the averager's parts: `none`, `float16` (half the bytes), `uint8` (a quarter)."""
    from hivemind.compression import Float16Compression, NoCompression

    return {"none": NoCompression, "float16": Float16Compression, "uint8": uniform_8bit}[name]()


def uniform_8bit():
    """hivemind's Uniform8BitQuantization, decodable with numpy 2.4: hivemind 1.1.12 reads the codebook's size with
    int() of a one-element array, a TypeError since then, so every uint8 part failed. Registered as the decoder
    hivemind looks up by a part's compression type (in this process and the averager's, forked from it)."""
    import numpy as np
    from hivemind.compression import serialization
    from hivemind.compression.quantization import Uniform8BitQuantization

    class Uniform8Bit(Uniform8BitQuantization):
        def extract(self, serialized_tensor) -> torch.Tensor:
            buffer, size = serialized_tensor.buffer, tuple(serialized_tensor.size)
            codebook_size = int(np.frombuffer(buffer, count=1, dtype=np.int64)[0])
            codebook = np.frombuffer(buffer, offset=8, count=codebook_size, dtype=self.codebook_dtype)
            indices = np.frombuffer(buffer, offset=8 + codebook.nbytes, dtype=self.indices_dtype)
            values = torch.as_tensor(codebook).to(dtype=getattr(torch, serialized_tensor.dtype))
            indices = torch.as_tensor(indices, dtype=torch.int64).reshape(size)
            return values[indices].requires_grad_(serialized_tensor.requires_grad)

    codec = Uniform8Bit()
    serialization._BASE_COMPRESSION_TYPES["UNIFORM_8BIT"] = codec
    return codec


@dataclass
class Round:
    """A round in flight: the tensors as they were sent, its handle, the training thread's time so far."""

    sent: list[torch.Tensor]
    control: object  # hivemind's StepControl, or a Future of a round through gloo: result() is its members
    blocked_s: float
    started: float  # perf_counter


class GossipAveraging(AveragingStrategy):
    shares_state = True
    skips_rounds = True

    def __init__(self, model: nn.Module, dht, cfg: GossipConfig, prefix: str, lock: threading.Lock | None = None,
                 swarm_key: bytes | None = None, anomalies=None, swarm_size: int | None = None,
                 levers: Levers | None = None):  # fmt: skip
        """`swarm_size`: the most peers the swarm can have (the run's peers and scripted joiners; None: unknown, an
        open swarm). A group aims at min(group_size, the peers in the swarm now: `set_swarm_size`, at first
        `swarm_size`): a round starts as soon as they are all there, not after matchmaking_time. `swarm_key`: only
        the run's members take part (workers/averaging/admission.py); `anomalies` hears of refusals and of a group
        larger than the swarm can be. `levers`: what a round may skip of hivemind's fixed cost (None: `Levers.of(cfg)`,
        all on unless `cfg.cheap_rounds` is off; the peers of a swarm must agree on them)."""
        super().__init__()
        self.levers = levers or Levers.of(cfg)
        self.cfg, self.lock = cfg, lock or threading.Lock()
        self.anomalies, self.swarm_size = anomalies, swarm_size
        # the group target, read by hivemind's matchmaking in the averager's process (live_target_matchmaking)
        self.target = mp.get_context("fork").Value("i", min(cfg.group_size, swarm_size or cfg.group_size), lock=False)
        # the peers whose DHT is up, read by the DHT's lean path in the averager's process (levers.small_swarm; 0: not
        # known, until the driver tells)
        self.dht_nodes = mp.get_context("fork").Value("i", 0, lock=False)
        self.swarm_now: int | None = None  # the running peers, as the driver last told (None: not told)
        self.tensors = averaged_tensors(model)
        # with `flat`, hivemind averages one buffer per dtype, each tensor a slice of it (`_views`)
        self.layout = FlatLayout(self.tensors) if self.levers.flat else None
        averaged = self.layout.buffers(self.tensors) if self.layout else [host_copy(t) for t in self.tensors]
        self.averaged_bytes = sum(t.numel() * t.element_size() for t in averaged)
        self.in_flight: Round | None = None
        self.bytes_seen = self.partial_seen = 0
        self.step_s, self.last_round_s = 0.0, 0.0  # a local step's and the last round's wall time (overlap's lead)
        self.longest_epoch = 0  # the most steps an epoch had so far
        self.early_epoch_round_started = False  # overlap, a round per epoch: this epoch's round was started early
        self._previous_step: float | None = None
        request_timeout = min(3.0, cfg.matchmaking_time / 2)  # hivemind: must be below matchmaking time
        # hivemind's step(timeout) is the deadline for *finding* a group, and it retries matchmaking until then:
        # one matchmaking_time, plus request_timeout for the leader's go-ahead to reach its followers. The all-reduce
        # after it is bounded by allreduce_timeout. A round without a partner thus costs about matchmaking_time.
        self.matchmaking_deadline = cfg.matchmaking_time + request_timeout
        self.averager = swarm_averager_class()(
            averaged,
            dht,
            prefix=prefix,
            target_group_size=self.target,
            min_group_size=cfg.min_group_size,
            averaging_alpha=cfg.alpha,
            min_matchmaking_time=cfg.matchmaking_time,
            request_timeout=request_timeout,
            allreduce_timeout=cfg.round_timeout,
            compression=compression(cfg.compression),
            part_size_bytes=PART_SIZE_BYTES,
            allow_state_sharing=False,  # until share_state: a newcomer must not serve its fresh initialisation
            # a donor answers a state download once its epoch has ended (workers/peer/state.py): wait that long for it
            next_chunk_timeout=DONOR_WAIT_S + 30.0,
            sender_timeout=cfg.round_timeout,  # (it would default to next_chunk_timeout)
            swarm_key=swarm_key,
            anomalies=anomalies,
            levers=self.levers,
            dht_nodes=self.dht_nodes,
            start=True,
        )
        # a group of the whole swarm moves onto gloo (gloo.py) once the driver has told the swarm's size; until
        # then, without it (standalone peers), or where gloo gave up, hivemind keeps the group (sticky.py). Made
        # after the averager's process is forked: a gloo object's threads do not survive a fork, and one the child
        # collected as garbage crashed it
        host = ip4_host(dht.get_visible_maddrs()) if self.levers.gloo else None
        self.gloo = GlooRounds(host, self.matchmaking_deadline, swarm_key) if host else None

    @property
    def bytes_source(self) -> str:
        return "modelled" if self.gloo is not None else "measured"  # (a gloo round's bytes: its ring's, modelled)

    def set_swarm_size(self, peers: int, dht_nodes: int = 0, gone: Sequence[str] = ()) -> None:
        self.target.value = min(self.cfg.group_size, max(peers, self.cfg.min_group_size))
        self.dht_nodes.value = dht_nodes
        self.swarm_now = peers  # (a gloo group of another size is left after its next round)

    def drop_round(self) -> None:
        """Forget the round in flight (a diverged peer's: never applied), and leave the gloo group: its groupmates'
        next collective fails at once, and they matchmake without this peer while it reloads."""
        flight, self.in_flight = self.in_flight, None
        if flight is not None and not flight.control.cancel() and isinstance(flight.control, Future):
            with contextlib.suppress(Exception):  # a gloo round already running: let it end, unapplied
                flight.control.result()
        if self.gloo is not None and self.gloo.ready():
            self.gloo.leave()
        self.early_epoch_round_started = False

    def share_state(self, provider, priority) -> None:
        self.averager.state_provider, self._priority = provider, priority
        self.averager.state_sharing_priority = priority()  # re-declared in the DHT whenever it changes
        self.averager.allow_state_sharing = True

    def download_state(self, timeout: float) -> tuple[dict, list[torch.Tensor]] | None:
        return self.averager.load_state_from_peers(timeout=timeout)

    def withhold_state(self) -> None:
        self.averager.allow_state_sharing = False

    def averages_after_step(self, step: int) -> bool:
        return self.cfg.every_steps != "epoch" and step % self.cfg.every_steps == 0

    def averages_at_epoch_end(self) -> bool:
        return self.cfg.every_steps == "epoch"

    def after_step(self, step: int, left: int = 0) -> None:
        self._time_step()
        if self.in_flight is not None and self.in_flight.control.done():
            self.finish_round()
        early_epoch_round = (self.cfg.overlap and self.averages_at_epoch_end() and not self.early_epoch_round_started
                           and left <= self.lead_steps(left))  # fmt: skip
        if self.averages_after_step(step) or early_epoch_round:
            self.average()
            self.early_epoch_round_started = early_epoch_round

    def _time_step(self) -> None:
        now, previous = time.perf_counter(), self._previous_step
        if previous is not None:
            self.step_s = 0.8 * self.step_s + 0.2 * (now - previous) if self.step_s else now - previous
        self._previous_step = now

    def lead_steps(self, left: int) -> int:
        """With overlap and one round per epoch, the round starts this many steps before the epoch ends, so that it
        lands by then (the epoch's row and evaluation see it): as many steps as the last round took, at least one,
        and at most a quarter of the epoch (the steps it overlaps are drift that the round does not repair; what
        the round takes beyond them is waited for at the epoch's end)."""
        self.longest_epoch = max(self.longest_epoch, left + 1)
        if not self.step_s or not self.last_round_s:
            return 1
        return max(1, min(math.ceil(self.last_round_s / self.step_s), self.longest_epoch // 4))

    def after_epoch(self, last: bool = True) -> None:
        """A round in flight lands first, so that the epoch's row and evaluation see the rounds started in it; with
        overlap and a round every H steps it carries over into the next epoch instead (the training thread never
        waits for it there; the row counts it when it lands), but not past the peer's last epoch."""
        if self.averages_at_epoch_end() and not self.early_epoch_round_started:  # (with overlap it started `lead_steps`
            self.start_round(last=last)  # before the end, unless the epoch was too short; it may have landed already)
        self.early_epoch_round_started = False
        carry_over = self.cfg.overlap and not self.averages_at_epoch_end() and not last
        if self.in_flight is not None and not carry_over:
            self.finish_round()
        if last and self.gloo is not None and self.gloo.ready():  # (a round per epoch left it with its last round)
            self.gloo.leave()  # the others' next collective fails at once: they matchmake instead of waiting
        self._previous_step = None  # the evaluation is no step
        if self.averager.allow_state_sharing:
            self.averager.state_sharing_priority = self._priority()

    def average(self) -> int | None:
        """One round, blocking (its group size, or None when it failed: training goes on either way). With
        overlap it starts one and returns None; a round still in flight from the last time lands first, so the
        peers' rounds stay matched (the same steps, the same count as blocking gossip)."""
        if self.in_flight is not None:
            self.finish_round()
        self.start_round()
        return None if self.cfg.overlap else self.finish_round()

    def start_round(self, last: bool = False) -> None:
        """Hand the tensors to hivemind, or to the gloo group (`last`: this peer's last round, after which it leaves
        the group). Parameters that are not finite are never shared: Diverged."""
        started = time.perf_counter()
        try:  # a skipped round is no averaging round (neither ok nor failed): the `diverged` event says it
            if not all_finite(self.tensors):
                raise Diverged("its parameters are not finite")
            self.round_starts()  # the training loop's guard: a finite blow-up raises Diverged too
        except Diverged as err:
            raise Diverged(f"{err}: it skipped the round") from None
        sent = [host_copy(t) for t in self.tensors] if self.cfg.overlap else []
        self._hand_over(self.tensors)
        if self.gloo is not None and self.gloo.ready():
            leave = last or self.swarm_now != self.gloo.group.size()
            control = self.gloo.thread.submit(self._through_gloo, sent, leave)
        else:
            control = self._matchmade()
        self.in_flight = Round(sent, control, time.perf_counter() - started, started)

    def _matchmade(self):
        """A hivemind round (matchmaking, or the sticky group), offering this peer's gloo rendezvous if it has one."""
        offer = self.gloo.offer(self.swarm_now) if self.gloo is not None else None
        return self.averager.step(gather=offer, timeout=self.matchmaking_deadline, wait=False)

    def _through_gloo(self, sent: list[torch.Tensor], leave: bool):
        """On the gloo thread: the round through the group (its members' ranks), or, if it failed (a member died or
        left, or did not come within the timeout), a hivemind round at once from the same tensors (its gathered
        data)."""
        try:
            with self.averager.get_tensors() as shared:
                size = self.gloo.run(shared, self.cfg.alpha, leave)
                self.averager.part_bytes.value += ring_bytes(self.averaged_bytes, size)
            return range(size)
        except RuntimeError as err:
            logger.warning("gloo round failed, matchmaking instead: %s", str(err)[:200])
        self._hand_over(sent or self.tensors)  # (the failed collective left them half reduced)
        return self._matchmade().result()

    def _hand_over(self, tensors: list[torch.Tensor]) -> None:
        """`tensors` (the model's, or a snapshot of them) into the averager's buffers, which a round averages."""
        with torch.no_grad(), self.averager.get_tensors() as shared:
            for dst, src in zip(self._views(shared), tensors, strict=True):
                dst.copy_(src)

    def finish_round(self) -> int | None:
        """Wait for the round in flight, apply its result, record it; the group size, or None if it failed or was
        partial."""
        started, flight = time.perf_counter(), self.in_flight
        self.in_flight = None
        try:
            gathered = flight.control.result()  # hivemind's gathered data, or the gloo group's ranks
        except Exception as err:  # hivemind raises on no group / all-reduce failure / timeout
            logger.warning("averaging round failed: %r", err)
            gathered = None
        if gathered and not self._take_result(flight.sent):
            gathered = None
        group_size = len(gathered) if gathered else None
        partial = self._partial_since_last()
        if isinstance(gathered, dict) and not partial and self.gloo is not None:  # a complete matchmade round
            offers = {peer.to_bytes(): data for peer, data in gathered.items()}
            self.gloo.form(offers, self.averager.peer_id.to_bytes())
        if partial and group_size:
            logger.warning("averaging round with %d peers lost part of its all-reduce (counted as partial)", group_size)
        self.last_round_s = time.perf_counter() - flight.started
        if group_size and self.swarm_size and group_size > self.swarm_size:
            self._anomaly("a group larger than the swarm", f"{group_size} peers, {self.swarm_size} known")
        seconds = flight.blocked_s + time.perf_counter() - started
        self.stats.record(group_size, seconds, partial=bool(partial and group_size))
        self.stats.add_bytes(self._bytes_since_last())
        return None if partial else group_size

    def _take_result(self, sent: list[torch.Tensor]) -> bool:
        """Copy the round's result into the model (with overlap, as a correction that keeps the steps taken since
        `sent`), unless it is not finite (a member's reducer averaged in its NaN or Inf): then the model keeps its
        own parameters and the round counts as failed."""
        with torch.no_grad(), self.lock, self.averager.get_tensors() as shared:
            if not all_finite(shared):
                self._anomaly("a round's average that is not finite", "kept its own parameters")
                return False
            for index, (dst, src) in enumerate(zip(self.tensors, self._views(shared), strict=True)):
                if sent:
                    dst.add_(src.to(dst.device) - sent[index].to(dst.device))
                else:
                    dst.copy_(src)
        return True

    def _views(self, shared: list[torch.Tensor]) -> list[torch.Tensor]:
        """The model's tensors as hivemind's averager holds them (slices of its flat buffers, or copies)."""
        return self.layout.views(shared) if self.layout else list(shared)

    def _partial_since_last(self) -> int:
        """Rounds whose all-reduce lost a part since the last call (counted in the averager's process)."""
        total = self.averager.partial_rounds.value
        delta, self.partial_seen = total - self.partial_seen, total
        return delta

    def _bytes_since_last(self) -> int:
        total = self.averager.part_bytes.value
        delta, self.bytes_seen = total - self.bytes_seen, total
        return delta

    def _anomaly(self, what: str, detail: str) -> None:
        logger.warning("%s: %s", what, detail)
        if self.anomalies is not None:
            self.anomalies.report(what, detail)

    def shutdown(self) -> None:
        if self.in_flight is not None:
            self.in_flight.control.cancel()
        if self.gloo is not None:
            self.gloo.shutdown()
        self.averager.shutdown()


def swarm_averager_class():
    """hivemind's DecentralizedAverager serving `state_provider()` to peers that download the state (it calls
    get_current_state in this process, from its background thread, when another peer asks), answering only the
    run's members (workers/averaging/admission.py), counting the bytes of the parts its reducer handles, with the
    levers given as `levers=` (workers/averaging/levers.py; default: all on) and SaferRunner's all-reduce."""
    from hivemind.averaging import DecentralizedAverager

    from workers.averaging.admission import AdmittingAverager
    from workers.averaging.flat import FlatParts
    from workers.averaging.levers import LeanMatchmaking, OneThreadAverager, QuietStateDeclarations
    from workers.averaging.runner import SaferAllReduce
    from workers.averaging.sticky import StickyGroups

    paced_matchmaking()
    live_target_matchmaking()

    class StateSharingAverager(AdmittingAverager, StickyGroups, QuietStateDeclarations, LeanMatchmaking, FlatParts,
                               OneThreadAverager, SaferAllReduce, DecentralizedAverager):  # fmt: skip
        state_provider = None

        def get_current_state(self):
            if self.state_provider is None:
                return super().get_current_state()
            metadata, tensors = self.state_provider()
            return metadata, tensors, None

    return StateSharingAverager
