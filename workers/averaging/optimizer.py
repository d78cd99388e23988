"""hivemind.Optimizer's averagers with contiguous buffers, so that a channels_last model can be averaged, admitting
only the run's members (workers/averaging/admission.py) as the gossip averager does.

hivemind splits every averaged tensor with `view(-1)`, which raises on channels_last strides. The state averager
copies the parameters with `.to(copy=True)` and the gradient averager the gradients with `.clone()`, and both keep
the model's strides: without these subclasses every round of a channels_last model fails. They live at module level
(not built inside a function) because hivemind may start its averager processes with `spawn`, which pickles them.
"""

from __future__ import annotations

import hivemind
import torch
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.state_averager import TrainingStateAverager

from workers.averaging.admission import AdmittingAverager


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
