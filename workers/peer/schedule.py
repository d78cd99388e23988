"""The learning-rate schedule: a pure function of the epoch and the `optim` section, stepped once per epoch."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from workers.core.config import OptimConfig


def lr_factor(epochs_done: int, cfg: OptimConfig) -> float:
    """The learning rate of the epoch that follows `epochs_done` completed ones, as a fraction of `cfg.lr`."""
    if epochs_done < cfg.warmup_epochs:
        return (epochs_done + 1) / (cfg.warmup_epochs + 1)  # the first epoch already learns; then full lr
    done, length = epochs_done - cfg.warmup_epochs, cfg.epochs - cfg.warmup_epochs
    if cfg.schedule == "cosine":  # never 0 within the run: the last epoch still gets a small step
        return 0.5 * (1 + math.cos(math.pi * min(done, length) / length))
    if cfg.schedule == "step":
        return cfg.gamma ** (done // cfg.step_size)
    return 1.0


def build_optimizer(parameters, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The local (DiLoCo: inner) optimizer: SGD with momentum, or AdamW (which has no use for `momentum`)."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(parameters, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> LambdaLR:
    """Sets the first epoch's learning rate now; each `step()` (once per epoch) sets the next one's."""
    return LambdaLR(optimizer, lambda epochs_done: lr_factor(epochs_done, cfg))


def resume_schedule(optimizer: torch.optim.Optimizer, scheduler: LambdaLR, state: dict, cfg: OptimConfig) -> None:
    """Load a checkpoint's scheduler state (after the optimizer's): the checkpoint says how many epochs are done,
    this run's `optim` section says what comes next. So a cosine run of 2 epochs resumed with `epochs: 4` goes on
    along the 4-epoch curve, and a changed lr, momentum or weight decay applies from the first resumed epoch."""
    scheduler.load_state_dict(state)
    for group in optimizer.param_groups:
        group.update(initial_lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    scheduler.last_epoch -= 1
    scheduler.step()  # back at the checkpoint's epoch count, with the lr this run's schedule gives it
