"""Consensus distance: how far the peers' parameters are from their mean.

Each peer sends a CountSketch of its flattened parameters (a linear random projection with a seed that every
peer shares), so the driver can estimate sqrt(mean_i ||theta_i - mean||^2) from a few hundred floats per peer.
Because the sketch is linear, sketch(theta_i) - mean_j sketch(theta_j) = sketch(theta_i - mean), and a CountSketch
preserves squared norms in expectation (relative std about sqrt(2 / dim)). Small models are sent exactly.
"""

from __future__ import annotations

import numpy as np
import torch


class ParameterSketch:
    def __init__(self, num_params: int, dim: int, seed: int = 0):
        self.exact = dim == 0 or num_params <= dim
        if not self.exact:
            gen = torch.Generator().manual_seed(seed)
            self.dim = dim
            self.bucket = torch.randint(dim, (num_params,), generator=gen)
            self.sign = torch.randint(0, 2, (num_params,), generator=gen, dtype=torch.int8) * 2 - 1

    def __call__(self, flat: torch.Tensor) -> np.ndarray:
        flat = flat.detach().to("cpu", torch.float64)
        if self.exact:
            return flat.numpy().copy()
        out = torch.zeros(self.dim, dtype=torch.float64)
        out.index_add_(0, self.bucket, flat * self.sign)
        return out.numpy()
