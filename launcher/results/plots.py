"""PNG plots of results tables from `launcher.analyze.load_runs`: per-peer curves of one run, per-run mean curves
with a min-max band across peers, and the consensus distance. Drawn on Agg Figures without pyplot, so they
neither need a display nor change a notebook's backend (a returned Figure still shows inline in Jupyter)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from launcher.results.expectations import slow_factors
from launcher.results.summary import read_events
from launcher.results.tables import epoch_curve, split_runs

METRICS = (("test_acc", "acc", "test accuracy (fraction)"), ("test_loss", "loss", "test loss (cross-entropy)"))
LEGEND_MAX = 12  # beyond this many lines a legend hides the plot


def _grid(title: str) -> tuple[Figure, np.ndarray]:
    """A 2x2 figure: rows are accuracy and loss, columns are wall time and epoch."""
    fig = Figure(figsize=(12, 8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, sharex="col", sharey="row")
    fig.suptitle(title)
    for row, (_, _, label) in enumerate(METRICS):
        axes[row, 0].set_ylabel(label)
        axes[row, 0].set_title(f"{label.split(' (')[0]} vs wall time")
        axes[row, 1].set_title(f"{label.split(' (')[0]} vs epoch")
    axes[1, 0].set_xlabel("wall time (s)")
    axes[1, 1].set_xlabel("epoch")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    return fig, axes


def _legend(ax: Axes, lines: int) -> None:
    if 0 < lines <= LEGEND_MAX:
        ax.legend(fontsize="small", ncol=1 if lines <= 6 else 2)


def plot_peers(run: pd.DataFrame, events: pd.DataFrame | None = None) -> Figure:
    """One run: test accuracy and loss of every peer against its wall time and against epoch, with the run's churn
    events (deaths, restarts, joins, leaves) marked where they happened."""
    peers = sorted(run["peer"].unique())
    fig, axes = _grid(f"{run['run_id'].iloc[0]}: per peer ({len(peers)} peers)")
    incarnation = run["restarts"] if "restarts" in run.columns else 0
    for number, peer in enumerate(peers):
        color = f"C{number % 10}"
        for lives, rows in run[run["peer"] == peer].assign(_life=incarnation).groupby("_life"):
            rows, label = rows.sort_values("epoch"), f"peer {peer}" if lives == 0 else None  # a gap at a restart
            for row, (column, _, _) in enumerate(METRICS):
                axes[row, 0].plot(rows["wall_time_s"], rows[column], marker=".", color=color, label=label)
                axes[row, 1].plot(rows["epoch"], rows[column], marker=".", color=color, label=label)
    _legend(axes[0, 0], len(peers))
    if events is not None:
        _mark_events(axes, events)
    return fig


EVENT_STYLE = {"died": "red", "wedged": "darkred", "gave_up": "black", "restarted": "green", "joined": "blue",
               "left": "gray"}  # fmt: skip


def _mark_events(axes: np.ndarray, events: pd.DataFrame) -> None:
    """A dashed line per event, at its time since training started and between the epochs it fell between."""
    started = events.loc[events["event"] == "started", "time_s"]
    offset = started.min() if len(started) else 0.0
    for event in events[events["event"].isin(list(EVENT_STYLE))].itertuples():
        color, label = EVENT_STYLE[event.event], f"peer {event.peer} {event.event}"
        for ax_row in axes:
            ax_row[0].axvline(event.time_s - offset, color=color, linestyle="--", linewidth=1)
            ax_row[1].axvline(event.epoch + 0.5, color=color, linestyle="--", linewidth=1)
        top = axes[0, 1].get_ylim()[1]
        axes[0, 1].annotate(label, (event.epoch + 0.5, top), rotation=90, va="top", ha="right", fontsize="x-small",
                            color=color)  # fmt: skip


def plot_runs(df: pd.DataFrame) -> Figure:
    """Several runs: each run's across-peer mean, with a band from the worst to the best peer. The wall time
    of an epoch is its slowest peer's, when the whole swarm had got there."""
    runs = split_runs(df)
    fig, axes = _grid(f"{len(runs)} runs: mean across peers, band = min to max peer, wall time = slowest peer")
    for run in runs:
        curve, label = epoch_curve(run), run["run_id"].iloc[0]
        for row, (_, short, _) in enumerate(METRICS):
            for col, x in enumerate((curve["wall_time_s"], curve.index)):
                (line,) = axes[row, col].plot(x, curve[f"{short}_mean"], marker=".", label=label)
                band = (curve[f"{short}_min"], curve[f"{short}_max"])
                axes[row, col].fill_between(x, *band, color=line.get_color(), alpha=0.2, linewidth=0)
    _legend(axes[0, 0], len(runs))
    return fig


def plot_consensus(df: pd.DataFrame) -> Figure | None:
    """Consensus distance of each run against wall time, log scale; None when no run has a positive value."""
    fig = Figure(figsize=(8, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    drawn = 0
    for run in split_runs(df):
        curve = epoch_curve(run)
        distance = pd.to_numeric(curve["consensus_dist"], errors="coerce")  # all-empty (a run cut short): object
        shown = curve[np.isfinite(distance) & (distance > 0)]
        if not shown.empty:
            ax.plot(shown["wall_time_s"], shown["consensus_dist"], marker=".", label=run["run_id"].iloc[0])
            drawn += 1
    if not drawn:
        return None
    ax.set_yscale("log")
    ax.set_title("Consensus distance: RMS distance of the peers' parameters from their mean")
    ax.set_xlabel("wall time (s), slowest peer")
    ax.set_ylabel("consensus distance (parameter units, log scale)")
    ax.grid(alpha=0.3, which="both")
    _legend(ax, drawn)
    return fig


def plot_bytes(df: pd.DataFrame) -> Figure | None:
    """Mean test accuracy of each run against the swarm's averaging traffic so far; None when no run sent any."""
    fig = Figure(figsize=(8, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    runs = [(run["run_id"].iloc[0], epoch_curve(run)) for run in split_runs(df)]
    runs = [(name, curve) for name, curve in runs if curve["swarm_mb"].iloc[-1] > 0]
    for name, curve in runs:
        ax.plot(curve["swarm_mb"], curve["acc_mean"], marker=".", label=name)
    if not runs:
        return None
    ax.set_title("Accuracy against bytes on the wire (the swarm's averaging traffic)")
    ax.set_xlabel("MB sent averaging, whole swarm")
    ax.set_ylabel("test accuracy, mean over peers")
    ax.grid(alpha=0.3)
    _legend(ax, len(runs))
    return fig


def plot_time_to_target(table: pd.DataFrame, condition: str) -> Figure | None:
    """An experiment's headline: the swarm's time to the target accuracy (the mean of every peer's latest accuracy, on
    the run's clock) against the condition, one line per method (and per group size where a method ran with several);
    a method that never got there is drawn at the top, marked "not reached". `table`: compare_runs' rows with a
    target."""
    column = "swarm_to_target_s" if "swarm_to_target_s" in table else "time_to_target_s"
    if column not in table or condition not in table or table["method"].isna().all():
        return None
    table = table.assign(series=series_labels(table), where=table[condition].map(condition_label))
    conditions = list(dict.fromkeys(table["where"]))
    fig = Figure(figsize=(9, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ceiling = np.nanmax(table[column].to_numpy(dtype=float), initial=1.0) * 1.15
    for label, rows in table.groupby("series", sort=False):
        times = rows.groupby("where", sort=False)[column].median()
        y = [times.get(c, np.nan) for c in conditions]
        shown = [ceiling if np.isnan(v) else v for v in y]
        (line,) = ax.plot(range(len(conditions)), shown, marker="o", label=label)
        for x, v in enumerate(y):
            if np.isnan(v) and conditions[x] in times.index:
                ax.annotate("not reached", (x, ceiling), fontsize="x-small", color=line.get_color(), ha="center",
                            va="bottom")  # fmt: skip
    ax.set_xticks(range(len(conditions)), conditions, fontsize="small")
    ax.set_xlabel(condition)
    ax.set_ylabel(f"{column.replace('_', ' ')} on the run's clock (s)")
    ax.set_title("time to target accuracy per condition (lower is better)")
    ax.grid(alpha=0.3)
    _legend(ax, table["series"].nunique())
    return fig


def series_labels(table: pd.DataFrame) -> pd.Series:
    """A line's name: the method, with its group size where the method ran with several."""
    labels = table["method"].astype(str)
    if "group_size" in table:
        several = table.groupby("method")["group_size"].transform("nunique") > 1
        labels = labels.where(~several, labels + ", groups of " + table["group_size"].astype("Int64").astype(str))
    return labels


def condition_label(value: object) -> str:
    """A condition as a tick label: a scenario as what it does (a straggler's factor, the number of kills), any
    other setting as its value, and one a run did not set (E2's slow link, empty in its control runs) as "unset"."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "unset"
    text = str(value)
    if not text.startswith("["):
        return text
    if text == "[]":
        return "no event"
    parts = [f"slow x{factor:g}" for factor in slow_factors(text)]
    if kills := text.count("kill"):
        parts.append(f"{kills} kill{'s' if kills > 1 else ''}")
    return ", ".join(parts) or textwrap_label(text)


def textwrap_label(text: str, width: int = 28) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or "(none)"


def write_plots(df: pd.DataFrame, out_dir: Path, table: pd.DataFrame | None = None,
                condition: str | None = None) -> list[Path]:  # fmt: skip
    """Per-peer curves for a single run or mean curves for several, plus consensus distance, and with a comparison
    `table` and the `condition` its runs differ in, time to target against it; the paths written."""
    several = len(split_runs(df)) > 1
    if several:
        curves = ("curves_runs.png", plot_runs(df))
    else:
        events = read_events(Path(df["run_dir"].iloc[0])) if "run_dir" in df.columns else None
        curves = ("curves_peers.png", plot_peers(df, events))
    figures = dict([curves, ("consensus.png", plot_consensus(df)), ("bytes.png", plot_bytes(df))])
    if table is not None and condition is not None:
        figures["time_to_target.png"] = plot_time_to_target(table, condition)
    written = []
    for name, fig in figures.items():
        if fig is not None:
            fig.savefig(out_dir / name, dpi=100)
            written.append(out_dir / name)
    return written
