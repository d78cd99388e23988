import numpy as np
import torch

from workers.core.metrics import consensus_distance
from workers.peer.sketch import ParameterSketch


def test_consensus_distance_known_answers():
    assert consensus_distance([np.zeros(3), np.zeros(3)]) == 0.0
    # two points at distance 2: each is 1 from the mean
    assert np.isclose(consensus_distance([np.array([0.0, 0.0]), np.array([2.0, 0.0])]), 1.0)
    # four corners of a square of side 2: each sqrt(2) from the centre
    corners = [np.array(c, dtype=float) for c in [(0, 0), (0, 2), (2, 0), (2, 2)]]
    assert np.isclose(consensus_distance(corners), np.sqrt(2))


def test_small_models_are_sent_exactly():
    sketch = ParameterSketch(num_params=10, dim=64)
    flat = torch.arange(10, dtype=torch.float32)
    assert sketch.exact and np.array_equal(sketch(flat), flat.double().numpy())


def test_sketch_is_shared_linear_and_preserves_distance():
    num_params, peers = 200_000, 4
    sketch = ParameterSketch(num_params, dim=1024, seed=7)
    again = ParameterSketch(num_params, dim=1024, seed=7)
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(num_params, generator=gen) for _ in range(peers)]
    assert np.array_equal(sketch(params[0]), again(params[0]))  # same seed on every peer
    exact = consensus_distance([p.double().numpy() for p in params])
    estimate = consensus_distance([sketch(p) for p in params])
    assert abs(estimate - exact) / exact < 0.15  # relative std ~ sqrt(2/1024) per peer term
    shifted = [p + 5.0 for p in params]  # a common shift does not move anyone from consensus
    assert np.isclose(consensus_distance([sketch(p) for p in shifted]), estimate)
