"""The training loop in one process (a peer without Ray or hivemind): what its rows measure."""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pytest
import torch

from tests.conftest import quick_config
from workers.averaging.base import NoAveraging
from workers.peer.peer import Peer
from workers.peer.setup import flat_parameters
from workers.peer.train import train


class SlowEvaluation:
    """The test loader, `delay` seconds slower: an evaluation long enough to show up in any throughput that
    counts it."""

    def __init__(self, loader, delay: float):
        self.loader, self.delay = loader, delay

    def __iter__(self):
        time.sleep(self.delay)
        yield from self.loader


class EpochEndRound(NoAveraging):
    """A stand-in for an epoch-end averaging round that takes `seconds`."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def after_epoch(self, last: bool = True) -> None:
        time.sleep(self.seconds)
        self.stats.record(2, self.seconds)


def test_throughput_counts_training_and_averaging_but_not_evaluation(torch_threads):
    peer = Peer(quick_config("peers=2", "gossip.method=none", "optim.epochs=1"), 0, "timing")
    peer.setup.test_loader = SlowEvaluation(peer.setup.test_loader, delay=1.5)
    started = time.perf_counter()
    (report,) = train(peer.setup, EpochEndRound(0.3), threading.Event())
    elapsed = time.perf_counter() - started
    row = report.row
    assert row.eval_s >= 1.5 and row.averaging_seconds == pytest.approx(0.3)
    assert row.samples_per_s == pytest.approx(row.samples_seen / (row.train_s + row.averaging_seconds))
    assert row.train_s + row.averaging_seconds + row.eval_s <= elapsed
    assert row.samples_seen / row.samples_per_s < elapsed - 1.5, "the evaluation is not in the throughput"


class HalvingRounds(NoAveraging):
    """A stand-in for averaging that halves the parameters in each round (every `every` steps, or after the epoch),
    and keeps the parameters it found before each round. `early`: a round per epoch that starts this many steps
    before the epoch's end and lands at its end (overlap): what it shares are the parameters at its start."""

    def __init__(self, model: torch.nn.Module, every: int | None, early: int = 0):
        super().__init__()
        self.model, self.every, self.early = model, every, early
        self.before: dict[int | str, torch.Tensor] = {}  # step, or "epoch <n>" -> parameters before that round

    def averages_after_step(self, step: int) -> bool:
        return self.every is not None and step % self.every == 0

    def averages_at_epoch_end(self) -> bool:
        return self.every is None

    def after_step(self, step: int, left: int = 0) -> None:
        if self.averages_after_step(step):
            self._start(step)
            self._land()
        elif self.averages_at_epoch_end() and self.early and left == self.early:
            self._start(f"epoch {len(self.before) + 1}")

    def after_epoch(self, last: bool = True) -> None:
        if self.averages_at_epoch_end():
            if not self.early:
                self._start(f"epoch {len(self.before) + 1}")
            self._land()

    def _start(self, key: int | str) -> None:
        self.round_starts()
        self.before[key] = flat_parameters(self.model).clone()

    @torch.no_grad()
    def _land(self) -> None:
        for parameter in self.model.parameters():
            parameter.mul_(0.5)


@pytest.mark.parametrize("every, early", [(4, 0), (None, 0), (None, 3)])
def test_the_sketch_before_is_taken_as_the_epochs_last_round_starts(torch_threads, every, early):
    peer = Peer(quick_config("peers=2", "gossip.method=none", "optim.epochs=2"), 0, "before")
    setup = peer.setup
    averaging = HalvingRounds(setup.model, every, early)
    steps = len(setup.train_loader)
    assert steps % 4 != 0, "rounds at steps 4, 8, ...: the epochs' last rounds are not at their last steps"
    reports = list(train(setup, averaging, threading.Event()))
    expected = [steps // 4 * 4, (2 * steps) // 4 * 4] if every else ["epoch 1", "epoch 2"]
    for report, key in zip(reports, expected, strict=True):
        np.testing.assert_array_equal(report.sketch_before, setup.sketch(averaging.before[key]))
        assert not np.array_equal(report.sketch_before, report.sketch)


def test_no_round_no_sketch_before(torch_threads):
    peer = Peer(quick_config("peers=2", "gossip.method=none", "optim.epochs=1"), 0, "none")
    (report,) = train(peer.setup, NoAveraging(), threading.Event())
    assert report.sketch_before is None


class FinishesWhenDrained(queue.Queue):
    """A peer's outbox whose training thread puts its last report and ends exactly when a poll has just drained
    it: the worst moment for a poll that read the state after draining."""

    def __init__(self, peer: Peer, last: object):
        super().__init__()
        self.peer, self.last = peer, last

    def get_nowait(self):
        try:
            return super().get_nowait()
        except queue.Empty:
            if self.last is not None:
                last, self.last = self.last, None
                self.put(last)
                self.peer._state = "done"
            raise


def test_a_poll_that_sees_a_finished_peer_has_every_report(torch_threads):
    """The driver stops polling a peer that says it is done: that poll must carry the peer's last report."""
    peer = Peer(quick_config("peers=2", "gossip.method=none", "optim.epochs=1"), 0, "last-report")
    (last,) = train(peer.setup, NoAveraging(), threading.Event())
    peer._state, peer._outbox = "running", FinishesWhenDrained(peer, last)
    taken = []
    for _ in range(3):
        status = peer.poll()
        taken += status.reports
        if status.state == "done":
            break
    assert status.state == "done" and taken == [last]


def test_one_state_download_timeout_from_the_states_bytes_and_the_link_rate(torch_threads):
    """ResNet-50's state (parameters and momentum, 188 MB) takes 301 s at 5 Mbit/s: a fixed 120 s would never let such
    a peer rejoin. The timeout is the donor's wait for its epoch's end plus 3x the transfer, plus 30 s."""
    from workers.peer.state import DONOR_WAIT_S, slowest_link_mbit, state_timeout_s

    assert state_timeout_s(188_000_000, 5.0) == pytest.approx(DONOR_WAIT_S + 3 * 300.8 + 30)
    assert state_timeout_s(188_000_000, None) == pytest.approx(DONOR_WAIT_S + 3 * 15.04 + 30), "100 Mbit/s unknown"
    emulated = quick_config("emulation.rate_mbit=50", "emulation.links={1: {up_mbit: 1}}").emulation
    assert slowest_link_mbit(emulated) == 1.0 and slowest_link_mbit(quick_config().emulation) is None
    peer = Peer(quick_config("peers=2", "gossip.method=none"), 0, "timeout")
    state_bytes = 2 * 4 * sum(t.numel() for t in peer.setup.model.state_dict().values() if t.is_floating_point())
    assert peer.state_timeout() == pytest.approx(state_timeout_s(state_bytes, None), rel=0.01)
