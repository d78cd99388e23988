"""`gossip.method: allreduce`, the baseline with exact averaging: torch.distributed (gloo on CPU, NCCL on GPU) inside
the same actors, with the same shards and metrics."""

from __future__ import annotations

import time
from datetime import timedelta

import torch
from torch import nn

from workers.averaging.base import AveragingStrategy, averaged_tensors
from workers.core.config import GossipConfig


class AllReduceAveraging(AveragingStrategy):
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

    def averages_after_step(self, step: int) -> bool:
        every = self.cfg.every_steps
        return self.cfg.allreduce_on == "parameters" and every != "epoch" and step % every == 0

    def averages_at_epoch_end(self) -> bool:
        return self.cfg.allreduce_on == "parameters" and self.cfg.every_steps == "epoch"

    def after_step(self, step: int, left: int = 0) -> None:
        if self.averages_after_step(step):
            self._all_reduce_mean(self.tensors)

    def after_epoch(self, last: bool = True) -> None:
        if self.averages_at_epoch_end():
            self._all_reduce_mean(self.tensors)

    @torch.no_grad()
    def _all_reduce_mean(self, tensors: list[torch.Tensor]) -> None:
        import torch.distributed as dist

        started = time.perf_counter()
        if tensors is self.tensors:  # the parameters (not the gradients): the drift this round repairs
            self.round_starts()  # (no check: every peer must enter the collective, no skipping here)
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
    """A ring all-reduce's traffic per peer, counted as hivemind's is (workers/averaging/admission.py: part_bytes): the
    parts this peer reduces in and sends out, 2 (n - 1) / n of the tensor. gloo does not count bytes, so this is the
    model of its ring; summed over the peers it is the swarm's 2 (n - 1) tensors, as for a hivemind group of n."""
    return round(2 * (peers - 1) * size / peers)
