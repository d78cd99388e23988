"""`gossip.method: optimizer`: hivemind.Optimizer the way the original scripts used it, with its averagers' buffers
made contiguous (so that a channels_last model can be averaged) and admitting only the run's members
(workers/averaging/admission.py) as the gossip averager does.

hivemind splits every averaged tensor with `view(-1)`, which raises on channels_last strides. The state averager
copies the parameters with `.to(copy=True)` and the gradient averager the gradients with `.clone()`, and both keep
the model's strides: without these subclasses every round of a channels_last model fails. They live at module level
(not built inside a function) because hivemind may start its averager processes with `spawn`, which pickles them.
"""

from __future__ import annotations

import logging
import re
import threading
import time

import hivemind
import torch
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.state_averager import TrainingStateAverager

from workers.averaging.admission import AdmittingAverager
from workers.averaging.base import AveragingStrategy
from workers.core.config import GossipConfig

logger = logging.getLogger(__name__)


class ContiguousStateAverager(AdmittingAverager, TrainingStateAverager):
    def _make_host_tensor(self, source_tensor: torch.Tensor, force_copy: bool = False) -> torch.Tensor:
        tensor = super()._make_host_tensor(source_tensor, force_copy)
        if tensor is source_tensor or tensor.is_contiguous():
            return tensor  # a CPU parameter that hivemind reuses in place must stay the parameter itself
        return tensor.detach().contiguous().share_memory_().requires_grad_(tensor.requires_grad)


class ContiguousGradientAverager(AdmittingAverager, GradientAverager):
    """hivemind.Optimizer takes it as `grad_averager_factory` (used without local updates)."""

    def __init__(self, parameters, **kwargs):
        parameters = tuple(parameters)
        buffers = tuple(torch.zeros(tuple(p.shape), dtype=p.dtype) for p in parameters)  # hivemind shares them
        super().__init__(parameters, averaged_grads=buffers, **kwargs)


class ContiguousOptimizer(hivemind.Optimizer):
    """hivemind offers no hook for its state averager but this method; the arguments are hivemind 1.1.12's own.
    `admission`: AdmittingAverager's keywords (swarm_key, anomalies, members_prefix), for both averagers."""

    def __init__(self, *args, admission: dict | None = None, **kwargs):
        self.admission = admission or {}  # before hivemind.Optimizer's __init__ makes the averagers
        super().__init__(*args, **kwargs)

    def _make_gradient_averager(self, factory, **kwargs) -> GradientAverager:
        return super()._make_gradient_averager(factory or ContiguousGradientAverager, **kwargs, **self.admission)

    def _make_state_averager(self, **kwargs) -> TrainingStateAverager:
        return ContiguousStateAverager(
            dht=self.dht,
            prefix=f"{self.run_id}_state_averager",
            min_matchmaking_time=self.matchmaking_time,
            allreduce_timeout=self.allreduce_timeout,
            shutdown_timeout=self.shutdown_timeout,
            offload_optimizer=self.offload_optimizer,
            custom_gradients=self.offload_optimizer,
            status_loglevel=self.status_loglevel,
            next_chunk_timeout=self.next_chunk_timeout,
            client_mode=self.client_mode,
            auxiliary=self.auxiliary,
            start=True,
            **kwargs,
            **self.admission,
        )


class OptimizerAveraging(AveragingStrategy):
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
        """`swarm_key`, `anomalies`: hivemind's averagers admit only the run's members
        (workers/averaging/admission.py)."""
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
        """Rounds of the state averager whose all-reduce lost a part, since the last call
        (workers/averaging/admission.py)."""
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
            logger.log(record.levelno, "hivemind: %s", message)

    def detach(self) -> None:
        self.logger.removeHandler(self)
