"""The results folder: metrics.csv appended and flushed row by row, summary.csv and the printed table."""

from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path

import pandas as pd

from workers.metrics import CSV_COLUMNS, MetricsRow


class MetricsWriter:
    """Appends rows to a CSV and flushes after every batch, so an interrupted run keeps what it reported."""

    def __init__(self, path: Path):
        self.path = path
        new = not path.exists() or path.stat().st_size == 0
        self._file = path.open("a", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=CSV_COLUMNS)
        if new:
            self._csv.writeheader()
        self.rows_written = 0

    def write(self, rows: list[MetricsRow]) -> None:
        for row in rows:
            self._csv.writerow(dataclasses.asdict(row))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.rows_written += len(rows)

    def close(self) -> None:
        self._file.close()


def read_metrics(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "metrics.csv")


def summarize(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per peer: its last evaluation, its best accuracy, and its averaging record."""
    by_peer = metrics.sort_values(["peer", "epoch"]).groupby("peer")
    last = by_peer.tail(1).set_index("peer")
    summary = pd.DataFrame(
        {
            "node": last["node"],
            "epochs": last["epoch"],
            "final_test_acc": last["test_acc"],
            "best_test_acc": by_peer["test_acc"].max(),
            "final_test_loss": last["test_loss"],
            "final_train_loss": last["train_loss"],
            "rounds_ok": last["avg_rounds_ok"],
            "rounds_failed": last["avg_rounds_failed"],
            "mean_group_size": by_peer["avg_group_size"].mean(),
            "samples_per_s": by_peer["samples_per_s"].mean(),
            "wall_time_s": last["wall_time_s"],
            "final_consensus_dist": last["consensus_dist"],
        }
    )
    return summary.reset_index()


def format_summary(summary: pd.DataFrame) -> str:
    table = summary.drop(columns=["node"]).to_string(index=False, float_format=lambda v: f"{v:.4g}")
    mean_acc = summary["final_test_acc"].mean()
    return f"{table}\n\nmean final test_acc across peers: {mean_acc:.4f}"
