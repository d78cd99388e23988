"""Averaging strategies. Each is called after every local step and at the end of every epoch, and keeps
counts that prove (or disprove) that averaging happened: rounds that succeeded or failed, group sizes, time."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from workers.config import GossipConfig

logger = logging.getLogger(__name__)


@dataclass
class RoundStats:
    ok: int = 0
    failed: int = 0
    seconds: float = 0.0
    _window_groups: list[int] = field(default_factory=list)
    _window_seconds: float = 0.0

    def record(self, group_size: int | None, seconds: float) -> None:
        """One round: its group size on success, None on failure."""
        if group_size is None:
            self.failed += 1
        else:
            self.ok += 1
            self._window_groups.append(group_size)
        self.seconds += seconds
        self._window_seconds += seconds

    def take_window(self) -> tuple[float, float]:
        """(mean group size, seconds averaging) since the previous call; NaN size when no round succeeded."""
        groups, seconds = self._window_groups, self._window_seconds
        self._window_groups, self._window_seconds = [], 0.0
        return (sum(groups) / len(groups) if groups else float("nan")), seconds


def averaged_tensors(model: nn.Module) -> list[torch.Tensor]:
    """What a round averages: every parameter and every floating-point buffer (e.g. BatchNorm statistics)."""
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    return [p.data for p in model.parameters()] + [b.data for b in buffers]


class NoAveraging:
    """The baseline: the same harness with no communication."""

    def __init__(self) -> None:
        self.stats = RoundStats()

    def after_step(self, step: int) -> None:
        pass

    def after_epoch(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


class GossipAveraging(NoAveraging):
    """hivemind's DecentralizedAverager over the model's tensors: every H steps (or once per epoch) the peer
    joins a DHT-matched group and moves its tensors `alpha` of the way to the group's mean."""

    def __init__(self, model: nn.Module, dht, cfg: GossipConfig, prefix: str):
        from hivemind.averaging import DecentralizedAverager

        super().__init__()
        self.cfg = cfg
        self.tensors = averaged_tensors(model)
        self.averager = DecentralizedAverager(
            [t.detach().to("cpu", copy=True) for t in self.tensors],
            dht,
            prefix=prefix,
            target_group_size=cfg.group_size,
            min_group_size=cfg.min_group_size,
            averaging_alpha=cfg.alpha,
            min_matchmaking_time=cfg.matchmaking_time,
            request_timeout=min(3.0, cfg.matchmaking_time / 2),  # hivemind: must be below matchmaking time
            allreduce_timeout=cfg.round_timeout,
            start=True,
        )

    def after_step(self, step: int) -> None:
        if self.cfg.every_steps != "epoch" and step % self.cfg.every_steps == 0:
            self.average()

    def after_epoch(self) -> None:
        if self.cfg.every_steps == "epoch":
            self.average()

    def average(self) -> int | None:
        """One round; returns the group size, or None when the round failed (training goes on either way)."""
        started = time.perf_counter()
        with torch.no_grad(), self.averager.get_tensors() as shared:
            for dst, src in zip(shared, self.tensors, strict=True):
                dst.copy_(src)
        try:
            gathered = self.averager.step(timeout=self.cfg.matchmaking_time + self.cfg.round_timeout)
        except Exception as err:  # hivemind raises on no group / all-reduce failure / timeout
            logger.warning("averaging round failed: %r", err)
            gathered = None
        if gathered:
            with torch.no_grad(), self.averager.get_tensors() as shared:
                for dst, src in zip(self.tensors, shared, strict=True):
                    dst.copy_(src)
        group_size = len(gathered) if gathered else None
        self.stats.record(group_size, time.perf_counter() - started)
        return group_size

    def shutdown(self) -> None:
        self.averager.shutdown()
