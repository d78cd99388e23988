"""Load results folders into one long table and compare runs: the notebook API behind `gossip-launch analyze`.

    df = load_runs(["results/my-sweep"])          # metrics rows + each run's config as columns
    table = compare_runs(df, target_acc=0.9)      # one row per run

Imports only pandas, numpy and yaml (no torch, no Ray), so it loads in a notebook or the CLI in a second.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from launcher.results.summary import read_metrics, round_totals
from launcher.results.tables import epoch_curve, final_rows, split_runs
from workers.core.config import flatten_keys

GOSSIP_KNOBS = ("group_size", "min_group_size", "alpha", "matchmaking_time", "every_steps")


class MissingMetricsError(FileNotFoundError):
    """A folder given for analysis is neither a run folder nor a sweep folder of run folders."""


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders (those holding metrics.csv) named directly or found one level inside sweep folders."""
    run_dirs: list[Path] = []
    for path in map(Path, paths):
        if (path / "metrics.csv").is_file():
            run_dirs.append(path)
            continue
        inside = sorted(p.parent for p in path.glob("*/metrics.csv"))
        if not path.is_dir():
            raise MissingMetricsError(f"{path}: no such folder")
        if not inside:
            raise MissingMetricsError(f"{path}: no metrics.csv here or in its subfolders (not a run or sweep folder)")
        run_dirs.extend(inside)
    return run_dirs


def load_run(run_dir: str | Path) -> pd.DataFrame:
    """One run's metrics rows with its config.yaml flattened into columns (`peers`, `gossip.method`, ...)."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.csv").is_file():
        raise MissingMetricsError(f"{run_dir}: no metrics.csv")
    metrics = read_metrics(run_dir)
    config_path = run_dir / "config.yaml"
    config = (yaml.safe_load(config_path.read_text()) or {}) if config_path.is_file() else {}
    for key, value in flatten_keys(config).items():
        if key not in metrics.columns:  # the measured columns win over a same-named config key
            metrics[key] = value
    metrics["run_dir"] = str(run_dir)
    return metrics


def load_runs(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Every run under `paths` (run folders, or sweep folders expanded to their runs, sorted) in one long table."""
    return pd.concat([load_run(run_dir) for run_dir in find_run_dirs(paths)], ignore_index=True)


def compare_runs(df: pd.DataFrame, target_acc: float | None = None) -> pd.DataFrame:
    """One row per run: its settings, final/best accuracy, time and samples to `target_acc`, throughput,
    averaging rounds and final consensus distance. Runs keep the order in which they appear in `df`; a run
    with no rows yet (stopped before its first evaluation) has no row."""
    runs = split_runs(df)
    table = pd.DataFrame([_compare_one(run, target_acc) for run in runs])
    for offset, key in enumerate(_other_varying_settings(runs)):  # e.g. optim.lr in a learning-rate sweep
        table.insert(table.columns.get_loc("epochs") + offset, key, [run[key].iloc[0] for run in runs])
    return table


def _other_varying_settings(runs: list[pd.DataFrame]) -> list[str]:
    """Config keys (dotted, or the seed) that differ between runs and are not already in the table."""
    shown = {"gossip.method", *(f"gossip.{knob}" for knob in GOSSIP_KNOBS)}
    keys = [c for c in runs[0].columns if ("." in c or c in ("seed", "scenario")) and c not in shown] if runs else []
    return [k for k in keys if len({str(run[k].iloc[0]) if k in run else "" for run in runs}) > 1]


def _compare_one(run: pd.DataFrame, target_acc: float | None) -> dict[str, Any]:
    curve = epoch_curve(run)
    last = final_rows(run)
    final_acc = last["test_acc"].to_numpy()
    return {
        **_settings(run),
        "epochs": int(curve.index.max()),
        "final_acc_mean": final_acc.mean(),
        "final_acc_std": final_acc.std(),  # population std: the peers are the whole swarm, not a sample of it
        "final_acc_min": final_acc.min(),
        "final_acc_max": final_acc.max(),
        "best_acc": curve["acc_mean"].max(),
        **({} if target_acc is None else _to_target(curve, target_acc)),
        **({} if target_acc is None else _peers_to_target(run, target_acc)),
        **({} if target_acc is None else {"swarm_to_target_s": swarm_to_target_s(run, target_acc)}),
        "samples_per_s": run["samples_per_s"].mean(),
        "swarm_samples_per_s": _swarm_rate(run),
        **_rounds(run),
        "final_consensus_dist": curve["consensus_dist"].iloc[-1],
        "swarm_mb": curve["swarm_mb"].iloc[-1],
        "bytes_source": "/".join(sorted(run["bytes_source"].dropna().unique())) if "bytes_source" in run else "unknown",
        "wall_time_s": last["wall_time_s"].max(),
        "run_dir": run["run_dir"].iloc[0] if "run_dir" in run.columns else "",
    }


def _settings(run: pd.DataFrame) -> dict[str, Any]:
    first = run.iloc[0]
    settings = {
        "run_id": first["run_id"],
        "peers": first.get("peers", run["peer"].nunique()),
        "method": first.get("gossip.method", np.nan),
        "rate_mbit": first.get("emulation.rate_mbit", np.nan),  # an emulated link's speed (NaN: not emulated)
    }
    settings.update({knob: first.get(f"gossip.{knob}", np.nan) for knob in GOSSIP_KNOBS})
    return settings


def _to_target(curve: pd.DataFrame, target_acc: float) -> dict[str, float]:
    """Time, samples per peer and MB at the first epoch whose across-peer mean accuracy reaches the target. The time is
    the run's clock (the driver's, from the moment every peer trained: restarts and waits count), or for runs written
    before it, the slowest peer's training time."""
    reached = curve[curve["acc_mean"] >= target_acc]
    if reached.empty:
        return {"time_to_target_s": np.nan, "samples_to_target": np.nan, "mb_to_target": np.nan}
    first = reached.iloc[0]
    clock = first["run_time_s"] if not np.isnan(first["run_time_s"]) else first["wall_time_s"]
    return {"time_to_target_s": clock, "samples_to_target": first["samples_seen"], "mb_to_target": first["swarm_mb"]}


def _peers_to_target(run: pd.DataFrame, target_acc: float) -> dict[str, float]:
    """Each peer's own first time at the target on the run's clock: the median peer's and the worst peer's (a peer that
    never gets there counts as later than any other: it makes the worst NaN, and the median NaN when half of them never
    got there)."""
    if "run_time_s" not in run or run["run_time_s"].isna().all():
        return {"median_peer_to_target_s": np.nan, "worst_peer_to_target_s": np.nan}
    times = [rows.loc[rows["test_acc"] >= target_acc, "run_time_s"].min() for _, rows in run.groupby("peer")]
    times = np.nan_to_num(np.array(times, dtype=float), nan=np.inf)  # never there: after every other peer
    median, worst = float(np.median(times)), float(np.max(times))
    return {"median_peer_to_target_s": median if np.isfinite(median) else np.nan,
            "worst_peer_to_target_s": worst if np.isfinite(worst) else np.nan}  # fmt: skip


def swarm_to_target_s(run: pd.DataFrame, target_acc: float) -> float:
    """The first moment on the run's clock at which the mean of every peer's latest test accuracy reaches the target
    (NaN: never, or a run written before the run's clock). Unlike the epoch curve's mean, it does not wait for a
    straggler's row of the same epoch: at each moment each peer counts with what it last reported."""
    if "run_time_s" not in run or run["run_time_s"].isna().all():
        return np.nan
    peers, latest = run["peer"].nunique(), {}
    for row in run.sort_values("run_time_s").itertuples():
        latest[row.peer] = row.test_acc
        if len(latest) == peers and sum(latest.values()) / peers >= target_acc:
            return float(row.run_time_s)
    return np.nan


def _swarm_rate(run: pd.DataFrame) -> float:
    """The swarm's training throughput on the run's clock: the samples every epoch row trained (its samples_per_s
    times its training and averaging time, as samples_per_s is defined), over the run's time (NaN for runs written
    before the run's clock). Epochs redone after a restart count again: they were trained again."""
    if "run_time_s" not in run or run["run_time_s"].isna().all():
        return np.nan
    samples = (run["samples_per_s"] * (run["train_s"] + run["averaging_seconds"])).sum()
    return samples / run["run_time_s"].max()


def _rounds(run: pd.DataFrame) -> dict[str, float]:
    """The run's averaging rounds, all incarnations of each peer counted (launcher/results/summary.py: round_totals)."""
    totals, peers = round_totals(run), run["peer"].nunique()
    counts = {name: int(totals[name].sum()) for name in totals.columns}
    return {**counts, **{f"{name}_per_peer": count / peers for name, count in counts.items()}}


def experiment_condition(table: pd.DataFrame) -> str | None:
    """The setting an experiment's runs differ in besides the method and its knobs (a straggler's `scenario`, a
    link's rate): the x axis of its time-to-target plot. None where nothing else varies."""
    if table["rate_mbit"].nunique() > 1:
        return "rate_mbit"
    method_knobs = ("gossip.", "faults.")
    candidates = [c for c in table.columns if ("." in c or c == "scenario") and not c.startswith(method_knobs)]
    # (a setting some runs lack, e.g. one peer's link shaped only in the slow-link runs, is empty in the others)
    return next((c for c in candidates if table[c].astype(str).nunique(dropna=False) > 1), None)


def format_comparison(table: pd.DataFrame, width: int = 120) -> str:
    """The table for a terminal: columns wrapped into blocks of `width` characters."""
    shown = table.drop(columns=["run_dir"], errors="ignore")
    return shown.to_string(index=False, line_width=width, float_format=lambda v: f"{v:.4g}")


def analyze(
    paths: Iterable[str | Path],
    target_acc: float | None = None,
    out: Path | None = None,
    plot: bool = False,
    origins: dict[str, str] | None = None,
) -> tuple[pd.DataFrame, list[Path]]:
    """Load, compare and (when `out` is given) write comparison.csv and, with `plot`, the PNGs into `out`.
    `origins`: {local copy: storage URI} of folders downloaded from storage, to name their runs by their URI."""
    df = load_runs(paths)
    for copy, uri in (origins or {}).items():
        df["run_dir"] = df["run_dir"].str.replace(copy, uri, n=1, regex=False)
    if df.empty:
        raise MissingMetricsError("metrics.csv has no rows yet: no run got to its first evaluation")
    table = compare_runs(df, target_acc)
    written: list[Path] = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "comparison.csv", index=False)
        written.append(out / "comparison.csv")
        if plot:
            from launcher.results.plots import write_plots  # matplotlib: only when plots are asked for

            written += write_plots(df, out, table, experiment_condition(table))
    return table, written
