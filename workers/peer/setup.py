"""A peer's training setup: the model, optimizer, data and where training stands. Its own module, because the
training loop, the checkpoints and the state shared with newcomers all read and write it."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader

from workers.peer.guard import DivergenceGuard
from workers.peer.sketch import ParameterSketch


@dataclass
class Progress:
    """Where a peer's training stands. A checkpoint stores it; a resumed run starts from it and continues it."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    samples_seen: int = 0
    wall_time_s: float = 0.0  # seconds of training so far, the runs before a resume included
    best_acc: float = -math.inf  # best test accuracy after any epoch so far
    epoch_step: int = 0  # steps taken into the current epoch (a peer that takes over this state skips them)


@dataclass
class TrainSetup:
    run_id: str
    peer: int
    node: str  # host name
    epochs: int  # the last epoch to train; the first is progress.epoch + 1
    model: nn.Module
    optimizer: torch.optim.Optimizer  # what the loop steps (a strategy may wrap the scheduler's optimizer)
    scheduler: LRScheduler  # stepped once per epoch
    train_loader: DataLoader  # its `generator` orders the shard: checkpoints store its state
    test_loader: DataLoader
    sketch: ParameterSketch
    device: torch.device
    amp: bool = False  # bf16 autocast of forward passes (CUDA only)
    channels_last: bool = False  # NHWC inputs (the model is converted by whoever builds it)
    checkpoint_dir: Path | None = None  # where peer-<i>_{best,final}.pt go; None: no checkpoints
    checkpoint_uri: str | None = None  # the storage folder each checkpoint is uploaded to once saved; None: local
    identity: dict[str, Any] = field(default_factory=dict)  # the config's identity, recorded in the checkpoints
    node_id: str = ""  # the Ray node the peer runs on ("" outside Ray)
    restarts: int = 0  # this peer's incarnation: how many times it was restarted before
    progress: Progress = field(default_factory=Progress)
    # Held while the parameters change (a step, an averaging result): a snapshot for another peer is never half one.
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_progress: float = field(default_factory=time.monotonic)  # heartbeat: monotonic time of the last step/round
    leave_after: int | None = None  # stop gracefully after this epoch (a scripted leave)
    slowdown: float = 1.0  # a scripted straggler: every step takes this many times longer
    lr_factor: float = 1.0  # a scripted learning-rate change (scenario event `lr`), on top of the schedule
    epoch_ending: bool = False  # between an epoch's last step and its report (its round, its evaluation)
    epoch_steps: int = 0  # steps in the epoch in progress (for the driver's progress display)
    guard: DivergenceGuard = field(default_factory=DivergenceGuard)  # its own history, kept across reloads

    def took_state(self) -> None:
        """The parameters were just replaced (a donor's state, a checkpoint): the guard's history starts there."""
        self.guard.seed(float(flat_parameters(self.model).float().norm()))

    def is_last(self, epoch: int) -> bool:
        """No epoch follows `epoch` on this peer: the run's end, or its scripted leave."""
        return epoch >= self.epochs or (self.leave_after is not None and epoch >= self.leave_after)


def flat_parameters(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])
