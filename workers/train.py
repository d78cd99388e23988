"""The one training loop: local SGD on this peer's shard, averaging via a strategy, one report per epoch."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from workers.averaging import NoAveraging
from workers.metrics import MetricsRow
from workers.sketch import ParameterSketch


@dataclass
class Report:
    """What a peer sends the driver per evaluation: the row, and a sketch of its parameters for consensus."""

    row: MetricsRow
    sketch: np.ndarray


@dataclass
class TrainSetup:
    run_id: str
    peer: int
    node: str
    epochs: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: DataLoader
    test_loader: DataLoader
    sketch: ParameterSketch
    device: torch.device


def train(setup: TrainSetup, averaging: NoAveraging, stop: threading.Event) -> Iterator[Report]:
    model, device = setup.model, setup.device
    started = time.perf_counter()
    step = samples = 0
    for epoch in range(1, setup.epochs + 1):
        epoch_started, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
        model.train()
        for inputs, targets in setup.train_loader:
            if stop.is_set():
                return
            inputs, targets = inputs.to(device), targets.to(device)
            logits = model(inputs)
            loss = F.cross_entropy(logits, targets)
            setup.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            setup.optimizer.step()
            step, samples, seen = step + 1, samples + len(targets), seen + len(targets)
            loss_sum += loss.item() * len(targets)
            correct += (logits.argmax(1) == targets).sum().item()
            averaging.after_step(step)
        averaging.after_epoch()
        test_loss, test_acc = evaluate(model, setup.test_loader, device)
        group_size, avg_seconds = averaging.stats.take_window()
        row = MetricsRow(
            run_id=setup.run_id,
            peer=setup.peer,
            epoch=epoch,
            step=step,
            samples_seen=samples,
            wall_time_s=time.perf_counter() - started,
            train_loss=loss_sum / max(seen, 1),
            train_acc=correct / max(seen, 1),
            test_loss=test_loss,
            test_acc=test_acc,
            samples_per_s=seen / (time.perf_counter() - epoch_started),
            avg_rounds_ok=averaging.stats.ok,
            avg_rounds_failed=averaging.stats.failed,
            avg_group_size=group_size,
            avg_seconds=avg_seconds,
            node=setup.node,
        )
        yield Report(row, setup.sketch(flat_parameters(model)))


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        logits = model(inputs)
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        correct += (logits.argmax(1) == targets).sum().item()
        count += len(targets)
    return (loss_sum / count, correct / count) if count else (math.nan, math.nan)


def flat_parameters(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])
