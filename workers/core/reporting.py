"""What a run writes and says as it goes, the same for the driver and for a standalone peer: CSV rows appended and on
disk one by one (a crash, a killed peer or Ctrl-C keeps every row written so far), and the epoch log line."""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
from pathlib import Path

from workers.core.csvfile import DurableCsv
from workers.core.metrics import CSV_COLUMNS, MetricsRow

logger = logging.getLogger(__name__)


class RowWriter:
    """Appends rows (dataclasses: metrics rows, events) to a CSV, each on disk before the next. A row that cannot be
    written (a full disk) raises MetricsWriteError naming the file; the rows before it stay. `append`: continue an
    existing file (a resumed standalone peer) under that file's own header (an older version's may have fewer
    columns)."""

    def __init__(self, path: Path, columns: tuple[str, ...] = CSV_COLUMNS, append: bool = True):
        exists = path.exists() and path.stat().st_size > 0
        if exists and append:
            with path.open(newline="") as file:
                columns = tuple(next(csv.reader(file)))
        elif exists:
            logger.warning("replacing %s", path)
        self.path, self.rows_written = path, 0
        self._csv = DurableCsv(path, columns, append=append)

    def write(self, rows: list) -> None:
        for row in rows:
            self._csv.write(dataclasses.asdict(row))
            self.rows_written += 1

    def close(self) -> None:
        self._csv.close()

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def epoch_line(rows: list[MetricsRow], epochs: int, elapsed_s: float) -> str:
    """`epoch E/EPOCHS | N peers | test_acc mean M [MIN, MAX] | rounds so far (all peers) ok A failed B partial C |
    consensus D | T s`: an epoch's rows (the swarm's, or a standalone peer's own); the round counts are the peers'
    cumulative ones summed, the consensus the swarm's (empty for a standalone peer, which sees no other's)."""
    accs = [row.test_acc for row in rows]
    ok, failed = sum(r.averaging_rounds_ok for r in rows), sum(r.averaging_rounds_failed for r in rows)
    partial, consensus = sum(r.averaging_rounds_partial for r in rows), rows[0].consensus_dist
    return (f"epoch {rows[0].epoch}/{epochs} | {len(rows)} peer{'s' if len(rows) > 1 else ''} | test_acc mean "
            f"{sum(accs) / len(accs):.3f} [{min(accs):.3f}, {max(accs):.3f}] | rounds so far (all peers) ok {ok} "
            f"failed {failed} partial {partial} | consensus {'-' if math.isnan(consensus) else f'{consensus:.2e}'} | "
            f"{elapsed_s:.0f} s")  # fmt: skip
