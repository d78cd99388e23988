"""Turn the peers' reports into finished metrics rows: the swarm's consensus distance at an epoch needs the
parameter sketch of every peer expected at that epoch, so rows wait here until their epoch is complete (seconds,
since peers evaluate together) or until the run ends, when whatever is pending is finished with the peers there are.

Peers come and go: a dead peer is no longer waited for, a restarted or joining peer is expected from the first
epoch it trains. A report for an epoch that was already finished (a newcomer that took over a state from before
it) is finished at once, its consensus measured against the rows that epoch already had.

Pure logic, no I/O: the driver feeds reports and peer changes in and writes out what comes back."""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np

from workers.core.metrics import MetricsRow, consensus_distance
from workers.core.protocol import Report


class EpochCollector:
    def __init__(self, peers: range | list[int]):
        self.expected: dict[int, int] = {peer: 1 for peer in peers}  # peer -> the first epoch it reports
        self.pending: dict[int, dict[int, Report]] = defaultdict(dict)  # epoch -> peer -> report
        self.finished: dict[int, list[Report]] = {}  # epoch -> the reports its rows were finished with
        self.swarm_epoch = 0  # the last epoch finished

    def add(self, report: Report) -> list[list[MetricsRow]]:
        epoch = report.row.epoch
        if epoch in self.finished:
            self.finished[epoch].append(report)
            return [self._rows({report.row.peer: report}, self.finished[epoch])]
        self.pending[epoch][report.row.peer] = report
        return self._complete_epochs()

    def take(self, peer: int, outbox: list) -> list[list[MetricsRow]]:
        """A peer's reports and events (PeerEvent) in the order they happened: a report written before an event is
        finished before the event changes what the collector waits for (a reload that skips epochs)."""
        epochs = []
        for item in outbox:
            if isinstance(item, Report):
                epochs += self.add(item)
            elif item.first_epoch is not None:
                epochs += self.expect(peer, item.first_epoch)
        return epochs

    def expect(self, peer: int, first_epoch: int) -> list[list[MetricsRow]]:
        """A peer (re)joined, or took a live peer's state: wait for its reports from `first_epoch` on (the
        epochs before, which it skipped, are no longer waiting for it)."""
        self.expected[peer] = first_epoch
        return self._complete_epochs()

    def drop_peer(self, peer: int) -> list[list[MetricsRow]]:
        """A peer died or left: stop waiting for it."""
        self.expected.pop(peer, None)
        return self._complete_epochs()

    def flush(self) -> list[list[MetricsRow]]:
        """Finish every pending epoch with the reports it has (at shutdown or after an interrupt)."""
        return [self._finish(epoch) for epoch in sorted(self.pending)]

    def _complete_epochs(self) -> list[list[MetricsRow]]:
        done = [
            epoch
            for epoch, reports in self.pending.items()
            if all(peer in reports for peer, first in self.expected.items() if first <= epoch)
        ]
        return [self._finish(epoch) for epoch in sorted(done)]

    def _finish(self, epoch: int) -> list[MetricsRow]:
        reports = self.pending.pop(epoch)
        self.finished[epoch] = list(reports.values())
        self.swarm_epoch = max(self.swarm_epoch, epoch)
        return self._rows(reports, self.finished[epoch])

    @staticmethod
    def _rows(reports: dict[int, Report], finished: list[Report]) -> list[MetricsRow]:
        """`reports`' rows, with the distances over every report `finished` of their epoch."""
        distance = swarm_distance([r.sketch for r in finished])
        before = swarm_distance([r.sketch_before for r in finished])
        return [
            dataclasses.replace(r.row, consensus_dist=distance, consensus_before=before, consensus_peers=len(finished))
            for _, r in sorted(reports.items())
        ]


def swarm_distance(sketches: list[np.ndarray | None]) -> float:
    """The consensus distance over the peers' sketches; nan for a single peer or when a peer sent none (no round)."""
    if len(sketches) < 2 or any(sketch is None for sketch in sketches):
        return float("nan")
    return consensus_distance(sketches)
