"""DiLoCo (Douillard et al., 2023) on gossip's hivemind rounds: every H = `gossip.every_steps` local steps (or once
per epoch) of the inner optimizer (the `optim` section's), the group averages its parameters through hivemind (gossip's
round: the same group knobs, admission, compression, byte counts, RoundStats), then an outer SGD step with Nesterov
momentum moves the parameters of the last sync:

    Δ      = θ_sync − avg_group(θ)                         the pseudo-gradient: minus the group's mean progress
    θ_sync ← SGD(lr=outer_lr, momentum=outer_momentum, nesterov) step on θ_sync with gradient Δ
    θ      ← θ_sync                                         the next H inner steps start from there

Choices:
- The round averages the parameters, not the deltas: with one θ_sync in the group that is the same Δ, and where the
  members' θ_sync differ (after a failed round, a smaller group) every member's Δ points at the same group mean, so
  the round also pulls their θ_sync together. `gossip.alpha` < 1 moves each member that fraction of the way, as gossip.
- A round that fails (no group in time, an all-reduce error, a result that is not finite) is a group of one: Δ is this
  peer's own θ_sync − θ, and the round is counted as failed, as gossip counts it.
- Float buffers (BatchNorm statistics) are averaged with the parameters but take no outer step: they are statistics,
  not optimized; they take the group's mean (their own values after a failed round).
- outer_momentum 0 is plain SGD (torch refuses Nesterov without momentum; it would be the same step), so outer_lr 1
  with outer_momentum 0 is exactly gossip's θ ← avg_group(θ).
- The inner optimizer's state (e.g. SGD momentum) carries on across the outer steps, as in DiLoCo.
- No `gossip.overlap` (refused when the config is loaded): the outer step replaces the parameters, so local steps taken
  while a round is in flight would be lost.
- θ_sync and the outer momentum are part of what a newcomer downloads from a live peer (`method_state`); a peer that
  resumes from a checkpoint starts θ_sync at the checkpoint's parameters, with no outer momentum.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.averaging.base import all_finite
from workers.averaging.gossip import GossipAveraging, host_copy
from workers.core.config import GossipConfig


class OuterOptimizer:
    """θ_sync and the outer SGD on it (pure torch: the hivemind round is the caller's)."""

    def __init__(self, params: list[torch.Tensor], lr: float, momentum: float):
        self.sync = [p.detach().clone() for p in params]
        self.sgd = torch.optim.SGD(self.sync, lr=lr, momentum=momentum, nesterov=momentum > 0)

    @torch.no_grad()
    def step(self, averaged: list[torch.Tensor], params: list[torch.Tensor]) -> None:
        """θ_sync ← outer step with Δ = θ_sync − `averaged`; then `params` (the model's) ← θ_sync."""
        for sync, mean in zip(self.sync, averaged, strict=True):
            sync.grad = sync - mean
        self.sgd.step()
        for param, sync in zip(params, self.sync, strict=True):
            param.copy_(sync)

    def state(self) -> list[torch.Tensor]:
        """θ_sync, then the momentum buffers, on the CPU (zeros before the first step: with no dampening, torch's SGD
        starting a buffer at Δ is the same as starting it from zeros)."""
        momentum = []
        for sync in self.sync:
            buffer = self.sgd.state.get(sync, {}).get("momentum_buffer")
            momentum.append(torch.zeros(sync.shape, dtype=sync.dtype) if buffer is None else host_copy(buffer))
        return [host_copy(sync) for sync in self.sync] + momentum

    @torch.no_grad()
    def load(self, tensors: list[torch.Tensor]) -> None:
        """Take another peer's `state()`."""
        if len(tensors) != 2 * len(self.sync):
            raise ValueError(f"an outer state of {len(tensors)} tensors for a model of {len(self.sync)} parameters")
        for sync, src in zip(self.sync, tensors[: len(self.sync)], strict=True):
            sync.copy_(src.to(sync.device).view_as(sync))
        for sync, momentum in zip(self.sync, tensors[len(self.sync) :], strict=True):
            self.sgd.state[sync]["momentum_buffer"] = momentum.to(sync.device).view_as(sync).clone()


class DiLoCoAveraging(GossipAveraging):
    def __init__(self, model: nn.Module, dht, cfg: GossipConfig, prefix: str, **gossip_options):
        """`gossip_options`: GossipAveraging's (lock, swarm_key, anomalies, swarm_size, levers)."""
        super().__init__(model, dht, cfg, prefix, **gossip_options)
        self.params = sum(1 for _ in model.parameters())  # averaged_tensors: the parameters first, then the buffers
        self.outer = OuterOptimizer(self.tensors[: self.params], cfg.outer_lr, cfg.outer_momentum)

    def finish_round(self) -> int | None:
        """gossip's round and, on success, the outer step on the group's mean (`_take_result`); a round that failed
        steps on this peer's own Δ."""
        group_size = super().finish_round()
        if group_size is None:
            with self.lock:
                self.outer.step(self.tensors[: self.params], self.tensors[: self.params])
        return group_size

    def _take_result(self, sent: list[torch.Tensor]) -> bool:
        """The outer step on the round's result, under the setup's lock: a state snapshot for a newcomer sees the
        parameters and θ_sync of one moment. A result that is not finite is refused (the round fails)."""
        with torch.no_grad(), self.lock, self.averager.get_tensors() as shared:
            if not all_finite(shared):
                self._anomaly("a round's average that is not finite", "stepped on its own parameters")
                return False
            averaged = [src.to(dst.device) for dst, src in zip(self.tensors, self._views(shared), strict=True)]
            for dst, src in zip(self.tensors[self.params :], averaged[self.params :], strict=True):
                dst.copy_(src)  # buffers: the group's mean
            self.outer.step(averaged[: self.params], self.tensors[: self.params])
        return True

    def method_state(self) -> list[torch.Tensor]:
        """θ_sync and the outer momentum (read under the setup's lock, with the parameters)."""
        return self.outer.state()

    def load_method_state(self, tensors: list[torch.Tensor] | None) -> None:
        """A donor's θ_sync and outer momentum; None: θ_sync from the current parameters (e.g. just resumed from a
        checkpoint), no outer momentum."""
        if tensors is None:
            self.outer = OuterOptimizer(self.tensors[: self.params], self.cfg.outer_lr, self.cfg.outer_momentum)
        else:
            self.outer.load(tensors)
