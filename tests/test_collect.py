"""The driver's pure bookkeeping: when rows are complete, what they say about consensus, what the CSV keeps."""

import math

import numpy as np
import pandas as pd

from launcher.driver.collect import EpochCollector
from launcher.results.summary import read_metrics, summarize
from workers.core.metrics import CSV_COLUMNS, MetricsRow
from workers.core.protocol import Report
from workers.core.reporting import RowWriter


def make_row(peer: int, epoch: int, test_acc: float = 0.5, rounds_ok: int = 0) -> MetricsRow:
    return MetricsRow(
        run_id="r", peer=peer, epoch=epoch, step=10 * epoch, samples_seen=100 * epoch, wall_time_s=float(epoch),
        train_loss=1.0, train_acc=0.5, test_loss=1.0, test_acc=test_acc, samples_per_s=100.0, train_s=1.0, eval_s=0.5,
        averaging_rounds_ok=rounds_ok, averaging_rounds_failed=0, averaging_group_size=2.0, averaging_seconds=0.1,
        node="n",
    )  # fmt: skip


def report(peer: int, epoch: int, position: float, before: float | None = None) -> Report:
    """A peer at `position` after the epoch, at `before` just before its last round (None: it had no round)."""
    return Report(make_row(peer, epoch), np.array([position, 0.0]), None if before is None else np.array([before, 0]))


def test_rows_wait_for_every_live_peer_then_carry_the_swarm_distance():
    collector = EpochCollector(range(2))
    assert collector.add(report(0, 1, 0.0)) == []
    assert collector.add(report(0, 2, 0.0)) == []  # a peer may run ahead
    (epoch1,) = collector.add(report(1, 1, 2.0))
    assert [r.peer for r in epoch1] == [0, 1]
    assert all(r.consensus_dist == 1.0 and r.consensus_peers == 2 for r in epoch1)
    assert collector.pending.keys() == {2}


def test_consensus_before_the_round_comes_from_the_sketches_taken_before_it():
    collector = EpochCollector(range(2))
    collector.add(report(0, 1, 0.0, before=-3.0))
    (epoch1,) = collector.add(report(1, 1, 2.0, before=3.0))
    assert all(r.consensus_before == 3.0 and r.consensus_dist == 1.0 for r in epoch1)
    collector.add(report(0, 2, 0.0))
    (epoch2,) = collector.add(report(1, 2, 2.0))  # no round, no sketch before one
    assert all(math.isnan(r.consensus_before) and r.consensus_dist == 1.0 for r in epoch2)
    collector.add(report(0, 3, 0.0, before=1.0))
    (epoch3,) = collector.add(report(1, 3, 2.0))  # a distance over a subset of the peers would be another swarm's
    assert math.isnan(epoch3[0].consensus_before)


def test_a_lost_peer_is_no_longer_waited_for():
    collector = EpochCollector(range(3))
    collector.add(report(0, 1, 0.0))
    collector.add(report(1, 1, 2.0))
    (epoch1,) = collector.drop_peer(2)
    assert [r.peer for r in epoch1] == [0, 1] and epoch1[0].consensus_dist == 1.0


def test_flush_finishes_partial_epochs_with_what_is_there():
    collector = EpochCollector(range(4))
    collector.add(report(0, 1, 0.0))
    collector.add(report(1, 1, 2.0))
    collector.add(report(3, 2, 0.0))
    epoch1, epoch2 = collector.flush()
    assert epoch1[0].consensus_peers == 2 and epoch1[0].consensus_dist == 1.0
    assert epoch2[0].consensus_peers == 1 and math.isnan(epoch2[0].consensus_dist)  # one peer: no swarm figure
    assert collector.pending == {}


def test_writer_flushes_each_batch_and_appends(tmp_path):
    path = tmp_path / "metrics.csv"
    writer = RowWriter(path)
    writer.write([make_row(0, 1)])
    assert len(pd.read_csv(path)) == 1  # readable before close: already on disk
    writer.write([make_row(1, 1)])
    writer.close()
    writer = RowWriter(path)  # reopening appends without a second header
    writer.write([make_row(0, 2)])
    writer.close()
    frame = read_metrics(tmp_path)
    assert tuple(frame.columns) == CSV_COLUMNS and len(frame) == 3


def test_summary_takes_each_peers_last_row_and_best_accuracy(tmp_path):
    writer = RowWriter(tmp_path / "metrics.csv")
    writer.write([make_row(0, 1, 0.9, 1), make_row(0, 2, 0.8, 2), make_row(1, 1, 0.3, 1), make_row(1, 2, 0.6, 3)])
    writer.close()
    summary = summarize(read_metrics(tmp_path)).set_index("peer")
    assert summary.loc[0, "final_test_acc"] == 0.8 and summary.loc[0, "best_test_acc"] == 0.9
    assert summary.loc[1, "rounds_ok"] == 3 and summary.loc[1, "epochs"] == 2


def test_a_report_before_a_reload_is_finished_before_the_reload_skips_epochs():
    """Peer 1 reported epoch 2, then diverged and reloaded a state of epoch 3 (its next report is epoch 4). Taken in
    that order, epoch 2 waits for its report and gets the consensus over both peers; the reload only stops epoch 3
    from waiting for peer 1. (Taken event first, epoch 2 would finish without it and its row come late, alone.)"""
    from workers.core.protocol import PeerEvent

    collector = EpochCollector(range(2))
    assert collector.add(report(0, 2, 0.0)) == []
    assert collector.add(report(0, 3, 0.0)) == []
    reloaded = PeerEvent("reloaded", "state from peer 0, training on from epoch 4", first_epoch=4)
    epoch2, epoch3 = collector.take(1, [report(1, 2, 2.0), reloaded])
    assert [r.peer for r in epoch2] == [0, 1] and all(r.consensus_peers == 2 for r in epoch2)
    assert epoch2[0].consensus_dist == 1.0
    assert [r.peer for r in epoch3] == [0] and epoch3[0].consensus_peers == 1
