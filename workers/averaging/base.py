"""Averaging strategies. Each is called after every local step and at the end of every epoch, and keeps
counts that prove (or disprove) that averaging happened: rounds that succeeded or failed, group sizes, time."""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
from torch import nn

from workers.core.config import GossipConfig

logger = logging.getLogger(__name__)


@dataclass
class RoundStats:
    ok: int = 0
    failed: int = 0
    partial: int = 0  # rounds that ran, but whose all-reduce lost a part: not averaged through (not in `ok`)
    seconds: float = 0.0
    _window_groups: list[int] = field(default_factory=list)
    _window_seconds: float = 0.0
    _window_bytes: int = 0

    def record(self, group_size: int | None, seconds: float, partial: bool = False) -> None:
        """One round: its group size on success, None on failure; `partial`: it ran, but lost a part."""
        if partial:
            self.partial += 1
        elif group_size is None:
            self.failed += 1
        else:
            self.ok += 1
            self._window_groups.append(group_size)
        self.add_seconds(seconds)

    def add_seconds(self, seconds: float) -> None:
        """Time spent averaging (also for rounds that were recorded without it)."""
        self.seconds += seconds
        self._window_seconds += seconds

    def add_bytes(self, sent: int) -> None:
        self._window_bytes += sent

    def take_window(self) -> tuple[float, float, int]:
        """(mean group size, seconds averaging, bytes sent) since the previous call; NaN size when no round
        succeeded."""
        groups, seconds, sent = self._window_groups, self._window_seconds, self._window_bytes
        self._window_groups, self._window_seconds, self._window_bytes = [], 0.0, 0
        return (sum(groups) / len(groups) if groups else float("nan")), seconds, sent


class Diverged(RuntimeError):
    """A peer's loss or parameters are no longer finite: it must not share them (FaultsConfig.on_divergence)."""


def all_finite(tensors: list[torch.Tensor]) -> bool:
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())  # one device sync


def averaged_tensors(model: nn.Module) -> list[torch.Tensor]:
    """What a round averages: every parameter and every floating-point buffer (e.g. BatchNorm statistics)."""
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    return [p.data for p in model.parameters()] + [b.data for b in buffers]


class NoAveraging:
    """The baseline: the same harness with no communication."""

    shares_state = False  # whether its peers serve their state to newcomers (share_state, download_state)
    # where its averaging_bytes come from: "measured" (counted on the wire: hivemind's parts; nothing, for `none`) or
    # "modelled" (gloo counts no bytes: its ring's traffic, 2 (n - 1) / n of the tensors per peer)
    bytes_source = "measured"

    def __init__(self) -> None:
        self.stats = RoundStats()
        # the training loop's check before this peer shares anything in a round (workers/peer/train.py: RoundWatch): a
        # peer whose training blew up raises Diverged there; None outside the loop
        self.before_round = None

    def take_window(self) -> tuple[float, float, int]:
        """(mean group size, seconds averaging, bytes) since the last call: an epoch's row (RoundStats)."""
        return self.stats.take_window()

    def round_starts(self, check: bool = True) -> None:
        """Call as a round starts, before anything is shared; `check`: skipping is possible (not in a collective)."""
        if self.before_round is not None:
            self.before_round(check)

    def set_swarm_size(self, peers: int) -> None:
        """How many peers are in the swarm now (the driver's count of running peers): a group aims at that many."""

    def drop_round(self) -> None:
        """Forget a round in flight without applying it (the parameters are about to be replaced)."""

    def share_state(self, provider, priority) -> None:
        """Let newcomers download this peer's state from `provider()` -> (metadata, tensors), preferring the peer
        with the highest `priority()` (its progress); a no-op for methods without a hivemind averager (a restarted
        peer of theirs resumes from its own checkpoint)."""

    def download_state(self, timeout: float) -> tuple[dict, list[torch.Tensor]] | None:
        """The state of the most advanced live peer that shares one, or None."""
        return None

    def withhold_state(self) -> None:
        """Serve no state to newcomers until the next `share_state` (this peer's diverged)."""

    def method_state(self) -> list[torch.Tensor]:
        """The method's own tensors that a newcomer takes over with the parameters (DiLoCo's θ_sync and outer
        momentum), read under the setup's lock with the parameters they belong to; none for the other methods."""
        return []

    def load_method_state(self, tensors: list[torch.Tensor] | None) -> None:
        """Take a donor's `method_state`; None: start it from this peer's current parameters (after a resume)."""

    def epoch_steps(self, local_steps: int) -> int:
        """How many steps to take this epoch (strategies that need lockstep peers agree on one number)."""
        return local_steps

    def round_after_step(self, step: int) -> bool:
        """Whether `after_step(step)` will average the parameters (False where hivemind decides, in `optimizer`)."""
        return False

    def round_after_epoch(self) -> bool:
        """Whether `after_epoch` will average the parameters."""
        return False

    def before_step(self) -> None:
        pass

    def after_step(self, step: int, left: int = 0) -> None:
        """After optimizer step `step` (counted over the run); `left`: steps left in this epoch."""

    def after_epoch(self, final: bool = True) -> None:
        """After an epoch's last step, before its evaluation; `final`: no epoch follows on this peer."""

    def shutdown(self) -> None:
        pass


class AllReduceAveraging(NoAveraging):
    """The all-reduce baseline: every H steps (or once per epoch) every peer takes the exact mean of all peers'
    tensors through torch.distributed (gloo on CPU, NCCL on GPU). With `on: gradients` it averages gradients
    before every optimizer step instead, which is data-parallel SGD."""

    bytes_source = "modelled"

    def __init__(self, model: nn.Module, cfg: GossipConfig, address: str, rank: int, world_size: int):
        import torch.distributed as dist

        super().__init__()
        self.cfg, self.model, self.world_size = cfg, model, world_size
        self.tensors = averaged_tensors(model)
        backend = "nccl" if self.tensors[0].is_cuda else "gloo"
        timeout = timedelta(seconds=cfg.matchmaking_time + cfg.round_timeout)
        dist.init_process_group(backend, init_method=address, rank=rank, world_size=world_size, timeout=timeout)

    def epoch_steps(self, local_steps: int) -> int:
        """Collectives inside the epoch must be matched by every peer: all take the smallest shard's steps."""
        if self.cfg.allreduce_on == "parameters" and self.cfg.every_steps == "epoch":
            return local_steps
        import torch.distributed as dist

        steps = torch.tensor([local_steps], device=self.tensors[0].device)
        dist.all_reduce(steps, op=dist.ReduceOp.MIN)
        return int(steps.item())

    def before_step(self) -> None:
        if self.cfg.allreduce_on == "gradients":
            self._all_reduce_mean([p.grad for p in self.model.parameters() if p.grad is not None])

    def round_after_step(self, step: int) -> bool:
        every = self.cfg.every_steps
        return self.cfg.allreduce_on == "parameters" and every != "epoch" and step % every == 0

    def round_after_epoch(self) -> bool:
        return self.cfg.allreduce_on == "parameters" and self.cfg.every_steps == "epoch"

    def after_step(self, step: int, left: int = 0) -> None:
        if self.round_after_step(step):
            self._all_reduce_mean(self.tensors)

    def after_epoch(self, final: bool = True) -> None:
        if self.round_after_epoch():
            self._all_reduce_mean(self.tensors)

    @torch.no_grad()
    def _all_reduce_mean(self, tensors: list[torch.Tensor]) -> None:
        import torch.distributed as dist

        started = time.perf_counter()
        if tensors is self.tensors:  # the parameters (not the gradients): the drift this round repairs
            self.round_starts(check=False)  # every peer must enter the collective: no skipping here
        flat = torch.cat([t.reshape(-1) for t in tensors])  # one collective instead of one per tensor
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for tensor in tensors:
            tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()
        self.stats.record(self.world_size, time.perf_counter() - started)
        self.stats.add_bytes(ring_bytes(flat.numel() * flat.element_size(), self.world_size))

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def ring_bytes(size: int, peers: int) -> int:
    """A ring all-reduce's traffic per peer, counted as hivemind's is (workers/averaging/admission.py: part_bytes): the parts
    this peer reduces in and sends out, 2 (n - 1) / n of the tensor. gloo does not count bytes, so this is the model
    of its ring; summed over the peers it is the swarm's 2 (n - 1) tensors, as for a hivemind group of n."""
    return round(2 * (peers - 1) * size / peers)


class OptimizerAveraging(NoAveraging):
    """hivemind.Optimizer, as the original scripts used it: it wraps the local optimizer and averages parameters
    whenever the swarm has processed `target_batch_size` samples together (inside the step that crosses it, or in
    the background with `background_averaging`).

    hivemind reports those rounds only through its log ("Averaged parameters with N peers" / "Averaging failed
    with ..."), so a log handler on its state averager counts them; a blocking round's time is that step's time."""

    ROUND_OK = re.compile(r"Averaged parameters with (\d+) peers")
    ROUND_FAILED = re.compile(r"Averaging failed with")

    def __init__(self, optimizer: torch.optim.Optimizer, dht, cfg: GossipConfig, prefix: str, batch_size: int,
                 target_batch_size: int, peers: int, stop: threading.Event, join_timeout: float = 60.0,
                 swarm_key: bytes | None = None, anomalies=None):  # fmt: skip
        """`swarm_key`, `anomalies`: hivemind's averagers admit only the run's members (workers/averaging/admission.py)."""
        from workers.averaging.optimizer import ContiguousGradientAverager, ContiguousOptimizer

        super().__init__()
        self.peers, self.stop, self.join_timeout, self._joined = peers, stop, join_timeout, False
        self.background = cfg.background_averaging
        self._step_started, self._rounds_before, self._partial_seen, self._bytes_seen = 0.0, 0, 0, 0
        self._counter = _RoundLogCounter(self)
        self.optimizer = ContiguousOptimizer(  # hivemind.Optimizer, its averagers' copies made contiguous
            dht=dht,
            run_id=prefix,
            optimizer=optimizer,
            target_batch_size=target_batch_size,
            batch_size_per_step=batch_size,
            use_local_updates=cfg.local_updates,
            matchmaking_time=cfg.matchmaking_time,  # hivemind passes it on as min_matchmaking_time
            averaging_timeout=cfg.round_timeout,
            averager_opts=dict(
                target_group_size=cfg.group_size,
                min_group_size=cfg.min_group_size,
                averaging_alpha=cfg.alpha,
                request_timeout=min(3.0, cfg.matchmaking_time / 2),
            ),
            delay_state_averaging=cfg.background_averaging,
            grad_averager_factory=None if cfg.local_updates else ContiguousGradientAverager,
            admission=dict(swarm_key=swarm_key, anomalies=anomalies, members_prefix=prefix),
            verbose=True,  # hivemind logs round outcomes at INFO only when verbose; the counter needs them
        )

    def before_step(self) -> None:
        self._step_started, self._rounds_before = time.perf_counter(), self.stats.ok + self.stats.failed

    def after_step(self, step: int, left: int = 0) -> None:
        if not self.background and self.stats.ok + self.stats.failed > self._rounds_before:
            self.stats.add_seconds(time.perf_counter() - self._step_started)  # this step held a blocking round
        if not self._joined:
            self._wait_for_swarm()

    def _wait_for_swarm(self) -> None:
        """After its first step (a peer publishes its progress only once it has samples), wait until this peer's
        progress tracker sees every peer: until then hivemind counts the swarm as empty and skips averaging."""
        tracker, deadline = self.optimizer.tracker, time.monotonic() + self.join_timeout
        while tracker.global_progress.num_peers < self.peers and time.monotonic() < deadline:
            if self.stop.wait(0.1):
                return
        self._joined = True
        if tracker.global_progress.num_peers < self.peers:
            logger.warning("hivemind sees %d of %d peers after %.0f s; training anyway",
                           tracker.global_progress.num_peers, self.peers, self.join_timeout)  # fmt: skip

    def take_window(self) -> tuple[float, float, int]:
        """hivemind.Optimizer's averagers count the bytes through their reducers (workers/averaging/admission.py)."""
        averagers = [self.optimizer.state_averager, self.optimizer.grad_averager]
        total = sum(averager.part_bytes.value for averager in averagers if averager is not None)
        self.stats.add_bytes(total - self._bytes_seen)
        self._bytes_seen = total
        return self.stats.take_window()

    def partial_since_last(self) -> int:
        """Rounds of the state averager whose all-reduce lost a part, since the last call (workers/averaging/admission.py)."""
        total = self.optimizer.state_averager.partial_rounds.value
        delta, self._partial_seen = total - self._partial_seen, total
        return delta

    def shutdown(self) -> None:
        self.optimizer.shutdown()
        self._counter.detach()


class _RoundLogCounter(logging.Handler):
    LOGGER = "hivemind.optim.state_averager"

    def __init__(self, owner: OptimizerAveraging):
        super().__init__(logging.INFO)
        self.owner = owner
        self.logger = logging.getLogger(self.LOGGER)
        self.logger.addHandler(self)
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False  # keep hivemind's chatter out of the peer's log; we count, not print

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()  # the time is added by OptimizerAveraging.after_step (blocking rounds only)
        if match := OptimizerAveraging.ROUND_OK.search(message):
            self.owner.stats.record(int(match.group(1)), 0.0, partial=self.owner.partial_since_last() > 0)
        elif OptimizerAveraging.ROUND_FAILED.search(message):
            self.owner.stats.record(None, 0.0)
        elif record.levelno >= logging.WARNING:
            logging.getLogger("workers.averaging.base").log(record.levelno, "hivemind: %s", message)

    def detach(self) -> None:
        self.logger.removeHandler(self)
