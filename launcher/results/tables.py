"""Tables of one run read back from its metrics rows: its rows apart from other runs', its per-epoch curve across the
peers, each peer's last row. Used by `analyze`, the plots and the sweep's trial reports alike."""

from __future__ import annotations

import numpy as np
import pandas as pd


def split_runs(df: pd.DataFrame) -> list[pd.DataFrame]:
    """The rows of each run, in order of first appearance (keyed by folder: a copied run keeps its run_id)."""
    key = "run_dir" if "run_dir" in df.columns else "run_id"
    return [run for _, run in df.groupby(key, sort=False)]


def epoch_curve(run: pd.DataFrame) -> pd.DataFrame:
    """Per epoch of one run, across its peers: test accuracy/loss mean, min and max; the slowest peer's wall
    time (when the swarm as a whole got there); mean samples per peer; the swarm's consensus distance."""
    bytes_known = run["averaging_bytes"] if "averaging_bytes" in run.columns else np.nan  # older runs: unknown
    run = run.assign(averaging_bytes=bytes_known, run_time_s=run.get("run_time_s", np.nan))
    by_epoch = run.groupby("epoch")
    curve = by_epoch.agg(
        acc_mean=("test_acc", "mean"),
        acc_min=("test_acc", "min"),
        acc_max=("test_acc", "max"),
        loss_mean=("test_loss", "mean"),
        loss_min=("test_loss", "min"),
        loss_max=("test_loss", "max"),
        wall_time_s=("wall_time_s", "max"),
        run_time_s=("run_time_s", "max"),
        samples_seen=("samples_seen", "mean"),
        consensus_dist=("consensus_dist", "max"),  # one value per epoch, on every row of it
        swarm_bytes=("averaging_bytes", lambda values: values.sum(min_count=1)),  # NaN where no bytes are known
    ).sort_index()
    curve["swarm_mb"] = curve.pop("swarm_bytes").cumsum(skipna=False) / 1e6  # the swarm's averaging traffic so far
    return curve


def final_rows(run: pd.DataFrame) -> pd.DataFrame:
    """Each peer's last row (an interrupted run's peers may have stopped at different epochs)."""
    return run.sort_values(["peer", "epoch"]).groupby("peer").tail(1)
