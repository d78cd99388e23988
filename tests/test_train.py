"""The training loop in one process (a peer without Ray or hivemind): what its rows measure."""

from __future__ import annotations

import threading
import time

import pytest

from tests.conftest import quick_config
from workers.averaging import NoAveraging
from workers.peer import Peer
from workers.train import train


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

    def after_epoch(self) -> None:
        time.sleep(self.seconds)
        self.stats.record(2, self.seconds)


def test_throughput_counts_training_and_averaging_but_not_evaluation(torch_threads):
    peer = Peer(quick_config("peers=2", "gossip.method=none", "optim.epochs=1"), 0, "timing")
    peer.setup.test_loader = SlowEvaluation(peer.setup.test_loader, delay=1.5)
    started = time.perf_counter()
    (report,) = train(peer.setup, EpochEndRound(0.3), threading.Event())
    elapsed = time.perf_counter() - started
    row = report.row
    assert row.eval_s >= 1.5 and row.avg_seconds == pytest.approx(0.3)
    assert row.samples_per_s == pytest.approx(row.samples_seen / (row.train_s + row.avg_seconds))
    assert row.train_s + row.avg_seconds + row.eval_s <= elapsed
    assert row.samples_seen / row.samples_per_s < elapsed - 1.5, "the evaluation is not in the throughput"
