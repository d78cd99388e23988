"""The results folder: metrics.csv and events.csv appended and flushed row by row, summary.csv and the printed
table."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from workers.core.metrics import RENAMED


@dataclass
class Event:
    """One thing that happened to a peer: events.csv's row."""

    time_s: float  # seconds since the run started (the driver's clock)
    peer: int
    restarts: int  # the peer's incarnation when it happened
    event: str  # started, killed, died, wedged, state_downloaded, restarted, joined, left, slow, gave_up
    detail: str = ""
    seconds: float = math.nan  # how long it took: detection after a scripted kill, time to rejoin after a death
    epoch: int = 0  # the swarm's last finished epoch when it happened


EVENT_COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Event))


def read_metrics(run_dir: Path) -> pd.DataFrame:
    """A run's metrics.csv, columns under their current names (runs written before a rename read alike)."""
    return pd.read_csv(Path(run_dir) / "metrics.csv").rename(columns=RENAMED)


def read_events(run_dir: Path) -> pd.DataFrame:
    """The run's events.csv (an empty table for runs without one)."""
    path = Path(run_dir) / "events.csv"
    return pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=list(EVENT_COLUMNS))


ROUND_COUNTS = {"rounds_ok": "averaging_rounds_ok", "rounds_failed": "averaging_rounds_failed",
                "rounds_partial": "averaging_rounds_partial"}  # fmt: skip


def round_totals(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per peer, its averaging rounds that succeeded, failed and lost a part, over all its incarnations: the counters
    are cumulative within an incarnation and start again with each restart, so each incarnation's last row holds
    its share. The one count that summary.csv, `analyze` and the run's verdict use."""
    last = metrics.sort_values("epoch").groupby(["peer", "restarts"] if "restarts" in metrics else "peer").tail(1)
    present = {name: column for name, column in ROUND_COUNTS.items() if column in last}  # older runs: no partial
    totals = last.groupby("peer")[list(present.values())].sum().rename(columns={v: k for k, v in present.items()})
    return totals.reindex(columns=list(ROUND_COUNTS), fill_value=0).astype(int)


MOSTLY_FAILED = 0.5  # a run whose peers averaged in fewer than this share of their rounds did not really average


def averaging_verdict(totals: pd.DataFrame, method: str) -> str | None:
    """Why the run's averaging cannot be trusted (most of its rounds failed or lost a part), or None."""
    rounds = int(totals.to_numpy().sum())
    ok = int(totals["rounds_ok"].sum())
    if method == "none" or rounds == 0 or ok >= MOSTLY_FAILED * rounds:
        return None
    return (f"averaging mostly failed: {ok} of {rounds} rounds succeeded ({totals['rounds_failed'].sum()} failed, "
            f"{totals['rounds_partial'].sum()} partial): the peers did not really average")  # fmt: skip


def summarize(metrics: pd.DataFrame, events: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per peer: its last evaluation, its best accuracy, its averaging record (summed over its
    incarnations: the round counters start again with each), and its deaths, restarts and time to rejoin."""
    by_peer = metrics.sort_values(["peer", "epoch"]).groupby("peer")
    last = by_peer.tail(1).set_index("peer")
    rounds = round_totals(metrics)
    events = events if events is not None else pd.DataFrame(columns=list(EVENT_COLUMNS))
    per_event = events.groupby(["peer", "event"]).size().unstack(fill_value=0) if len(events) else pd.DataFrame()
    rejoin = events[events.event == "restarted"].groupby("peer").seconds.mean() if len(events) else pd.Series()
    summary = pd.DataFrame(
        {
            "node": last["node"],
            "epochs": last["epoch"],
            "final_test_acc": last["test_acc"],
            "best_test_acc": by_peer["test_acc"].max(),
            "final_test_loss": last["test_loss"],
            "final_train_loss": last["train_loss"],
            "rounds_ok": rounds["rounds_ok"],
            "rounds_failed": rounds["rounds_failed"],
            "rounds_partial": rounds["rounds_partial"],
            "mean_group_size": by_peer["averaging_group_size"].mean(),
            "samples_per_s": by_peer["samples_per_s"].mean(),
            "wall_time_s": last["wall_time_s"],
            "final_consensus_dist": last["consensus_dist"],
            "deaths": _count(per_event, ("died", "wedged"), last.index),
            "restarts": last["restarts"],
            "mean_rejoin_s": rejoin.reindex(last.index),
        }
    )
    return summary.reset_index()


def _count(per_event: pd.DataFrame, events: tuple[str, ...], peers: pd.Index) -> pd.Series:
    present = [e for e in events if e in per_event.columns]
    counts = per_event[present].sum(axis=1) if present else pd.Series(dtype=int)
    return counts.reindex(peers, fill_value=0).astype(int)


def format_summary(summary: pd.DataFrame) -> str:
    table = summary.drop(columns=["node"]).to_string(index=False, float_format=lambda v: f"{v:.4g}")
    mean_acc = summary["final_test_acc"].mean()
    return f"{table}\n\nmean final test_acc across peers: {mean_acc:.4f}"
