"""The divergence guard (workers/peer/guard.py), a pure function of a peer's own history, and the training loop's
side of it (RoundWatch): the step size it measures around real optimizer steps. The swarms in which a peer blows up
are in test_divergence.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workers.averaging.base import Diverged, NoAveraging
from workers.peer.guard import MIN_HISTORY, STEP_FACTOR, DivergenceGuard
from workers.peer.sketch import ParameterSketch
from workers.peer.train import RoundWatch, scaled_lr, train_epoch


def steady(guard: DivergenceGuard, rounds: int = 5, step: float = 0.1) -> None:
    for index in range(rounds):
        assert guard.check(loss=1.0 - 0.01 * index, norm=10.0 + 0.01 * index, step=step) is None


def test_a_step_far_beyond_the_recent_ones_is_a_blow_up_even_where_the_norm_hides_it():
    guard = DivergenceGuard()
    steady(guard)
    reason = guard.check(loss=1.0, norm=11.0, step=0.1 * 100)  # lr x100 for one step; the norm grew 10 %
    assert reason is not None and "one step moved its parameters 10" in reason and "100x" in reason


def test_steps_that_grow_as_a_schedule_or_noise_makes_them_raise_nothing():
    guard = DivergenceGuard()
    steady(guard)
    for step in (0.2, 0.4, 0.8, 1.6):  # a warmup doubling the rate every round: each time a few x the median
        assert guard.check(loss=1.0, norm=10.0, step=step) is None
    assert 3.0 > STEP_FACTOR * 0.1  # a blow-up against the steady steps (0.1) ...
    assert guard.check(loss=1.0, norm=10.0, step=3.0) is None  # ... but the median has followed the ramp


def test_no_step_history_no_step_check_and_a_rate_of_zero_compares_with_nothing():
    fresh = DivergenceGuard()
    for _ in range(MIN_HISTORY - 1):
        assert fresh.check(loss=1.0, norm=10.0, step=0.1) is None
    assert fresh.check(loss=1.0, norm=10.0, step=100.0) is None, "too little history: the first rounds move fast"
    idle = DivergenceGuard()
    steady(idle, step=0.0)  # the end of a cosine schedule
    assert idle.check(loss=1.0, norm=10.0, step=1e-3) is None


def test_a_step_that_is_not_finite_is_caught_by_the_finite_check():
    guard = DivergenceGuard()
    assert "not finite" in guard.check(loss=1.0, norm=10.0, step=float("nan"))
    assert "not finite" in guard.check(loss=1.0, norm=10.0, step=float("inf"))


def test_a_reloaded_peer_keeps_its_step_history_so_its_first_bad_step_is_caught_at_once():
    guard = DivergenceGuard()
    steady(guard)
    guard.seed(norm=12.0)  # it took the swarm's state: losses and norms start there
    assert not guard.losses and list(guard.norms) == [12.0] * MIN_HISTORY
    assert "one step moved" in guard.check(loss=None, norm=12.5, step=50.0)


class Anchored(nn.Module):
    """A linear model next to a large parameter that no loss reaches (no gradient, never stepped): the parameter norm
    barely moves whatever the steps do, so only the step size can show a blow-up."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 3)
        self.anchor = nn.Parameter(torch.full((1000,), 10.0))

    def forward(self, x):
        return self.linear(x)


def test_the_watch_measures_real_optimizer_steps_and_stops_the_round_after_one_step_at_a_rate_x100():
    torch.manual_seed(0)
    model = Anchored()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    setup = SimpleNamespace(model=model, guard=DivergenceGuard(), sketch=ParameterSketch(1027, 0))
    watch = RoundWatch(setup)
    inputs, targets = torch.randn(64, 8), torch.randint(3, (64,))

    def step(factor: float = 1.0) -> None:
        loss = F.cross_entropy(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with scaled_lr(optimizer, factor):
            watch.before_step()
            optimizer.step()
            watch.step(loss, len(targets))

    for _ in range(6):  # rounds every 2 steps
        step(), step()
        watch()
    steps = list(setup.guard.steps)
    assert len(steps) == 5 and all(0 < s < 1 for s in steps)
    before = model.linear.weight.detach().clone(), model.linear.bias.detach().clone()
    step(), step(100.0)
    moved = torch.cat([(model.linear.weight - before[0]).flatten(), model.linear.bias - before[1]]).detach().norm()
    with pytest.raises(Diverged, match="one step moved its parameters"):
        watch()
    assert float(moved) / 2 < watch.last_step_size() < float(moved), "the last step: most of the two together"
    norm = float(torch.cat([p.detach().flatten() for p in model.parameters()]).norm())
    assert norm < 1.1 * setup.guard.norms[-1], "the norm alone would have let it share"


class EveryTwoSteps(NoAveraging):
    """A strategy that may skip its rounds, one every 2 steps, each started with the guard's check; at step 4 it
    notes how far the loop measured the last step to be, and how far SGD moved (lr times its momentum buffer)."""

    skips_rounds = True

    def __init__(self, optimizer):
        super().__init__()
        self.optimizer, self.seen = optimizer, None

    def after_step(self, step: int, left: int = 0) -> None:
        if step == 4:
            group = self.optimizer.param_groups[0]
            buffers = [self.optimizer.state[p]["momentum_buffer"] for p in group["params"]]
            moved = group["lr"] * float(torch.cat([b.flatten() for b in buffers]).norm())
            self.seen = (self.before_round.last_step_size(), moved)
        if step % 2 == 0:
            self.round_starts()


def test_the_training_loop_measures_each_step_for_the_guard(torch_threads):
    """The real loop (a peer's setup: digits, SGD with momentum 0.9, no weight decay): the step size the guard is
    given is the optimizer's own step, lr x |momentum buffer|, and every round's joins the guard's history."""
    import threading

    from tests.conftest import quick_config
    from workers.peer.peer import Peer

    setup = Peer(quick_config("peers=2", "gossip.method=none", "optim.epochs=1"), 0, "steps").setup
    strategy = EveryTwoSteps(setup.optimizer)
    strategy.before_round = RoundWatch(setup, measure_steps=strategy.skips_rounds)
    assert train_epoch(setup, strategy, threading.Event()) is not None
    measured, moved = strategy.seen
    assert measured == pytest.approx(moved, rel=1e-4) and moved > 0
    assert len(setup.guard.steps) == 5 and all(step > 0 for step in setup.guard.steps)
