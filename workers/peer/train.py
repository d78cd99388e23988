"""The one training loop: local SGD on this peer's shard, averaging via a strategy, one report per epoch."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from workers.averaging.base import AveragingStrategy, Diverged
from workers.core.metrics import MetricsRow
from workers.core.protocol import Report
from workers.peer.checkpoint import save_epoch
from workers.peer.setup import TrainSetup, flat_parameters


@dataclass
class EpochTotals:
    """Sums kept on the device, read once per epoch: a `.item()` per step would wait for the GPU at every step."""

    loss_sum: torch.Tensor | float = 0.0
    correct: torch.Tensor | int = 0
    seen: int = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.loss_sum = self.loss_sum + loss.detach().float() * len(targets)
        self.correct = self.correct + (logits.argmax(1) == targets).sum()
        self.seen += len(targets)


class RoundWatch:
    """What the training loop does as a round starts (the strategy calls it before this peer shares anything): the
    divergence guard, so that a peer whose loss, parameters or last step blew up shares nothing (Diverged), and a
    sketch of the parameters as they were sent, for consensus_before (the drift each round repairs).

    The step size: how far the last optimizer step before the round moved the parameters (a blow-up in an earlier
    step shows in the losses of the steps after it), measured where the strategy may skip a round. It costs a copy of
    the parameters before each step and a subtraction after it (for ResNet-50, 100 MB more per peer); a round's
    result, landing between steps under the setup's lock, is never in it."""

    def __init__(self, setup: TrainSetup, measure_steps: bool = True):
        self.setup, self.guard = setup, setup.guard
        self.loss_sum: torch.Tensor | float = 0.0  # the steps' losses since the last round, on the device
        self.steps = 0
        self.sketch_before: np.ndarray | None = None  # at the epoch's last round start (None: no round yet)
        self.params = [p for p in setup.model.parameters() if p.requires_grad] if measure_steps else []
        self.last_step = [torch.empty_like(p) for p in self.params]  # the parameters before the step; then its change

    @torch.no_grad()
    def before_step(self) -> None:
        if self.params:
            torch._foreach_copy_(self.last_step, self.params)

    @torch.no_grad()
    def step(self, loss: torch.Tensor, samples: int) -> None:
        """After the optimizer's step on `samples` (`before_step` came before it)."""
        self.loss_sum, self.steps = self.loss_sum + loss.detach().float(), self.steps + 1
        if self.params:
            torch._foreach_sub_(self.last_step, self.params)

    def last_step_size(self) -> float | None:
        """None: not measured. (A short batch's step is compared too: skipping it let a round right after an epoch's
        last step at lr x100 through, test_divergence.)"""
        if not (self.params and self.steps):
            return None
        return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(self.last_step)).float()))

    def __call__(self, check: bool = True) -> None:
        """`check`: False where a peer cannot skip a round (an all-reduce collective every peer must enter)."""
        flat = flat_parameters(self.setup.model)
        if check:
            loss = float(self.loss_sum) / self.steps if self.steps else None
            step = self.last_step_size()
            if reason := self.guard.check(loss, float(flat.float().norm()), step):
                raise Diverged(reason)
        self.loss_sum, self.steps = 0.0, 0
        self.sketch_before = self.setup.sketch(flat)


def train(setup: TrainSetup, averaging: AveragingStrategy, stop: threading.Event) -> Iterator[Report]:
    """Train from the epoch after `setup.progress.epoch` to `setup.epochs`; one report per epoch."""
    progress = setup.progress
    started = time.perf_counter() - progress.wall_time_s
    watch = averaging.before_round = RoundWatch(setup, measure_steps=averaging.skips_rounds)
    for epoch in range(progress.epoch + 1, setup.epochs + 1):
        epoch_started, watch.sketch_before = time.perf_counter(), None
        totals = train_epoch(setup, averaging, stop)
        if totals is None:
            return
        if not math.isfinite(float(totals.loss_sum)):
            raise Diverged(f"its training loss in epoch {epoch} is not finite")
        setup.last_progress, setup.epoch_ending = time.monotonic(), True
        averaging.after_epoch(last=setup.is_last(epoch))
        trained = time.perf_counter()
        test_loss, test_acc = evaluate(setup.model, setup.test_loader, setup.device, setup.amp, setup.channels_last,
                                       heartbeat=lambda: setattr(setup, "last_progress", time.monotonic()))  # fmt: skip
        seconds = (trained - epoch_started, time.perf_counter() - trained)  # throughput must not count evaluation
        improved = test_acc > progress.best_acc
        with setup.lock:  # the epoch's end as one change: a snapshot sees it all or none of it
            progress.epoch, progress.epoch_step, progress.wall_time_s = epoch, 0, time.perf_counter() - started
            setup.scheduler.step()
            setup.epoch_ending = False
        progress.best_acc = test_acc if improved else progress.best_acc
        row = epoch_row(setup, averaging, totals, (test_loss, test_acc), seconds)
        save_epoch(setup, row, improved)
        yield Report(row, setup.sketch(flat_parameters(setup.model)), watch.sketch_before)
        if setup.is_last(epoch):
            return


def train_epoch(setup: TrainSetup, averaging: AveragingStrategy, stop: threading.Event) -> EpochTotals | None:
    """One pass over the shard (as many steps as the strategy allows); None when `stop` cut it short. A peer that
    took over another's state mid-epoch starts at that peer's step into the epoch."""
    model, progress, totals, watch = setup.model, setup.progress, EpochTotals(), averaging.before_round
    steps = setup.epoch_steps = averaging.epoch_steps(len(setup.train_loader))
    model.train()
    for inputs, targets in islice(setup.train_loader, progress.epoch_step, steps):
        if stop.is_set():
            return None
        step_started = time.perf_counter()
        inputs, targets = to_device(inputs, targets, setup.device, setup.channels_last)
        with autocast(setup.device, setup.amp):
            logits = model(inputs)
            loss = F.cross_entropy(logits, targets)
        setup.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        averaging.before_step()
        with setup.lock, scaled_lr(setup.optimizer, setup.lr_factor):
            watch.before_step()  # (under the lock: a round's result lands before or after the step, never in it)
            setup.optimizer.step()
            watch.step(loss, len(targets))
            progress.step, progress.samples_seen = progress.step + 1, progress.samples_seen + len(targets)
            progress.epoch_step += 1
        totals.add(loss, logits, targets)
        if setup.slowdown > 1:  # a straggler: its step takes `slowdown` times as long
            stop.wait((setup.slowdown - 1) * (time.perf_counter() - step_started))
        averaging.after_step(progress.step, steps - progress.epoch_step)
        setup.last_progress = time.monotonic()
    return totals


@contextmanager
def scaled_lr(optimizer: torch.optim.Optimizer, factor: float) -> Iterator[None]:
    """The step with every learning rate times `factor`; the schedule's own rates are back afterwards."""
    if factor == 1.0:
        yield
        return
    rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] *= factor
    try:
        yield
    finally:  # restored, not divided back: exact, also for an infinite factor
        for group, rate in zip(optimizer.param_groups, rates, strict=True):
            group["lr"] = rate


def epoch_row(
    setup: TrainSetup,
    averaging: AveragingStrategy,
    totals: EpochTotals,
    test: tuple[float, float],
    seconds: tuple[float, float],
) -> MetricsRow:
    """`seconds`: (training with its averaging rounds, evaluation) of this epoch."""
    group_size, averaging_seconds, averaging_bytes = averaging.take_window()
    received, dropped = averaging.stats.take_messages()
    progress, (trained_s, eval_s) = setup.progress, seconds
    return MetricsRow(
        run_id=setup.run_id,
        peer=setup.peer,
        epoch=progress.epoch,
        step=progress.step,
        samples_seen=progress.samples_seen,
        wall_time_s=progress.wall_time_s,
        train_loss=float(totals.loss_sum) / max(totals.seen, 1),
        train_acc=int(totals.correct) / max(totals.seen, 1),
        test_loss=test[0],
        test_acc=test[1],
        samples_per_s=totals.seen / trained_s,
        train_s=max(trained_s - averaging_seconds, 0.0),  # a blocking hivemind.Optimizer round counts its whole step
        eval_s=eval_s,
        averaging_rounds_ok=averaging.stats.ok,
        averaging_rounds_failed=averaging.stats.failed,
        averaging_group_size=group_size,
        averaging_seconds=averaging_seconds,
        averaging_bytes=averaging_bytes,
        bytes_source=averaging.bytes_source,
        averaging_rounds_partial=averaging.stats.partial,
        messages_received=received,
        messages_dropped=dropped,
        node=setup.node,
        node_id=setup.node_id,
        restarts=setup.restarts,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp: bool = False,
    channels_last: bool = False,
    heartbeat: Callable[[], None] = lambda: None,
) -> tuple[float, float]:
    """(loss, accuracy) on `loader`; `heartbeat` after every batch (a long evaluation is progress, not a stall)."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for inputs, targets in loader:
        heartbeat()
        inputs, targets = to_device(inputs, targets, device, channels_last)
        with autocast(device, amp):
            logits = model(inputs)
        loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum").item()
        correct += (logits.argmax(1) == targets).sum().item()
        count += len(targets)
    return (loss_sum / count, correct / count) if count else (math.nan, math.nan)


def to_device(
    inputs: torch.Tensor, targets: torch.Tensor, device: torch.device, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    layout = torch.channels_last if channels_last else torch.preserve_format
    return inputs.to(device, non_blocking=True, memory_format=layout), targets.to(device, non_blocking=True)


def autocast(device: torch.device, amp: bool) -> torch.autocast:
    """bf16 needs no loss scaling (unlike fp16), so the step itself is unchanged."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
