"""Turn the peers' reports into finished metrics rows: the swarm's consensus distance at an epoch needs every
live peer's parameter sketch for that epoch, so rows wait here until their epoch is complete (seconds, since
peers evaluate together) or until the run ends, when whatever is pending is finished with the peers there are.

Pure logic, no I/O: the driver feeds reports and peer deaths in and writes out what comes back."""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np

from workers.metrics import MetricsRow
from workers.sketch import consensus_distance
from workers.train import Report


class EpochCollector:
    def __init__(self, peers: range | list[int]):
        self.live = set(peers)
        self.pending: dict[int, dict[int, Report]] = defaultdict(dict)  # epoch -> peer -> report

    def add(self, report: Report) -> list[list[MetricsRow]]:
        self.pending[report.row.epoch][report.row.peer] = report
        return self._complete_epochs()

    def drop_peer(self, peer: int) -> list[list[MetricsRow]]:
        """A peer died: stop waiting for it."""
        self.live.discard(peer)
        return self._complete_epochs()

    def flush(self) -> list[list[MetricsRow]]:
        """Finish every pending epoch with the reports it has (at shutdown or after an interrupt)."""
        return [self._finish(epoch) for epoch in sorted(self.pending)]

    def _complete_epochs(self) -> list[list[MetricsRow]]:
        done = [epoch for epoch, reports in self.pending.items() if self.live <= reports.keys()]
        return [self._finish(epoch) for epoch in sorted(done)]

    def _finish(self, epoch: int) -> list[MetricsRow]:
        reports = self.pending.pop(epoch)
        distance = swarm_distance([r.sketch for r in reports.values()])
        before = swarm_distance([r.sketch_before for r in reports.values()])
        return [
            dataclasses.replace(r.row, consensus_dist=distance, consensus_before=before, consensus_peers=len(reports))
            for _, r in sorted(reports.items())
        ]


def swarm_distance(sketches: list[np.ndarray | None]) -> float:
    """The consensus distance over the peers' sketches; nan for a single peer or when a peer sent none (no round)."""
    if len(sketches) < 2 or any(sketch is None for sketch in sketches):
        return float("nan")
    return consensus_distance(sketches)
