"""The analysis of results folders: known-answer tables from synthetic runs, sweep expansion, the CLI and its plots.
No Ray, no hivemind, no torch: every run folder here is written by hand through the real RowWriter."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from launcher.cli import main
from launcher.results.analyze import MissingMetricsError, compare_runs, load_run, load_runs
from workers.core.config import dump_config, parse_config
from workers.core.metrics import CSV_COLUMNS, MetricsRow
from workers.core.reporting import RowWriter

# Two peers, three epochs; dyadic numbers so every mean below is exact in floating point.
TEST_ACC = {0: [0.25, 0.5, 0.875], 1: [0.375, 0.75, 0.625]}  # across-peer means: 0.3125, 0.625, 0.75
WALL_TIME = {0: [10.0, 20.0, 30.0], 1: [12.0, 22.5, 31.0]}
SAMPLES = {0: [320, 640, 960], 1: [325, 650, 975]}
SAMPLES_PER_S = {0: [32.0, 32.0, 32.0], 1: [29.0, 30.0, 28.0]}  # mean over all six rows: 30.5
ROUNDS_OK = {0: [1, 2, 3], 1: [1, 1, 2]}  # cumulative: totals 3 + 2
ROUNDS_FAILED = {0: [0, 0, 0], 1: [0, 1, 1]}
CONSENSUS = [0.5, 0.25, 0.125]
BYTES = {0: [1_000_000, 2_000_000, 0], 1: [500_000, 500_000, 1_000_000]}  # per epoch; the swarm: 1.5, 2.5, 1 MB


def make_run(
    root: Path, name: str, *, alpha: float = 0.5, method: str = "gossip", epochs: int = 3, lr: float = 0.05
) -> Path:
    """A run folder as the driver leaves it: config.yaml and metrics.csv, rows written an epoch at a time."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    gossip = {"method": method, "alpha": alpha, "group_size": 2}
    cfg = parse_config({"name": name, "peers": 2, "gossip": gossip, "optim": {"lr": lr}})
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    writer = RowWriter(run_dir / "metrics.csv")
    for e in range(epochs):
        writer.write([_row(name, peer, e) for peer in (0, 1)])
    writer.close()
    return run_dir


def _row(run_id: str, peer: int, e: int) -> MetricsRow:
    return MetricsRow(
        run_id=run_id, peer=peer, epoch=e + 1, step=10 * (e + 1), samples_seen=SAMPLES[peer][e],
        wall_time_s=WALL_TIME[peer][e], train_loss=1.0 / (e + 1), train_acc=0.5, test_loss=2.0 - TEST_ACC[peer][e],
        test_acc=TEST_ACC[peer][e], samples_per_s=SAMPLES_PER_S[peer][e], train_s=1.0, eval_s=0.5,
        averaging_rounds_ok=ROUNDS_OK[peer][e], averaging_rounds_failed=ROUNDS_FAILED[peer][e],
        averaging_group_size=2.0, averaging_seconds=0.5,
        consensus_dist=CONSENSUS[e], consensus_peers=2, node="test", averaging_bytes=BYTES[peer][e],
    )  # fmt: skip


def test_load_run_joins_the_flattened_config(tmp_path):
    df = load_run(make_run(tmp_path, "a", alpha=0.5))
    assert len(df) == 6
    assert set(CSV_COLUMNS) <= set(df.columns)
    assert (df["peers"] == 2).all() and (df["gossip.method"] == "gossip").all()
    assert (df["gossip.alpha"] == 0.5).all() and (df["gossip.group_size"] == 2).all()
    assert (df["optim.epochs"] == 10).all() and (df["run_dir"] == str(tmp_path / "a")).all()


def test_compare_runs_known_answers(tmp_path):
    table = compare_runs(load_run(make_run(tmp_path, "a")), target_acc=0.625)
    assert len(table) == 1
    row = table.iloc[0]
    assert (row["run_id"], row["peers"], row["method"], row["alpha"], row["group_size"]) == ("a", 2, "gossip", 0.5, 2)
    assert (row["min_group_size"], row["matchmaking_time"], row["every_steps"], row["epochs"]) == (2, 5.0, "epoch", 3)
    # final rows: peer 0 at 0.875, peer 1 at 0.625
    assert row["final_acc_mean"] == 0.75 and row["final_acc_std"] == 0.125
    assert row["final_acc_min"] == 0.625 and row["final_acc_max"] == 0.875
    assert row["best_acc"] == 0.75  # epoch 3's mean; no single peer's best (0.875) counts
    # the mean reaches 0.625 exactly at epoch 2: the slowest peer's wall time, the mean samples per peer
    assert row["time_to_target_s"] == 22.5 and row["samples_to_target"] == 645
    assert row["samples_per_s"] == 30.5
    assert (row["rounds_ok"], row["rounds_failed"]) == (5, 1)
    assert (row["rounds_ok_per_peer"], row["rounds_failed_per_peer"]) == (2.5, 0.5)
    assert row["final_consensus_dist"] == 0.125 and row["wall_time_s"] == 31.0
    assert row["swarm_mb"] == 5.0 and row["mb_to_target"] == 4.0, "the swarm's bytes, cumulative to epoch 2"
    assert pd.isna(row["rate_mbit"]), "not an emulated run"


def test_a_ring_all_reduce_is_counted_as_a_hivemind_group_of_the_same_size():
    from workers.averaging.allreduce import ring_bytes

    assert ring_bytes(1_000_000, 4) == 1_500_000  # 2 (n - 1) / n of the tensor per peer
    assert 4 * ring_bytes(1_000_000, 4) == 2 * 3 * 1_000_000, "the swarm's traffic: 2 (n - 1) tensors"


def test_target_never_reached_is_nan_and_no_target_no_columns(tmp_path):
    df = load_run(make_run(tmp_path, "a"))
    row = compare_runs(df, target_acc=0.8).iloc[0]  # best peer reaches 0.875 but the mean never 0.8
    assert math.isnan(row["time_to_target_s"]) and math.isnan(row["samples_to_target"])
    assert "time_to_target_s" not in compare_runs(df).columns


def test_interrupted_run_uses_each_peers_last_row(tmp_path):
    run_dir = make_run(tmp_path, "a", epochs=2)
    writer = RowWriter(run_dir / "metrics.csv")
    writer.write([_row("a", 0, 2)])  # peer 0 finished epoch 3; peer 1 stopped after epoch 2
    writer.close()
    row = compare_runs(load_run(run_dir)).iloc[0]
    assert row["final_acc_mean"] == (0.875 + 0.75) / 2 and row["final_acc_min"] == 0.75
    assert (row["rounds_ok"], row["rounds_failed"], row["epochs"]) == (3 + 1, 1, 3)
    assert row["best_acc"] == 0.875  # epoch 3's "mean" is peer 0 alone


def test_sweep_folder_expands_to_its_runs_sorted(tmp_path):
    sweep = tmp_path / "sweep"
    make_run(sweep, "run-b", alpha=1.0, method="none")
    make_run(sweep, "run-a", alpha=0.25)
    (sweep / "sweep.csv").write_text("run_id\nrun-a\nrun-b\n")
    (sweep / "notes").mkdir()  # a subfolder without metrics.csv is not a run
    df = load_runs([sweep])
    assert list(df["run_dir"].unique()) == [str(sweep / "run-a"), str(sweep / "run-b")]
    table = compare_runs(df)
    assert list(table["run_id"]) == ["run-a", "run-b"]
    assert list(table["alpha"]) == [0.25, 1.0] and list(table["method"]) == ["gossip", "none"]
    # a run folder and a sweep folder together
    assert len(load_runs([sweep / "run-b", sweep])["run_dir"].unique()) == 2


def test_load_runs_rejects_a_folder_without_metrics(tmp_path):
    with pytest.raises(MissingMetricsError, match="no metrics.csv"):
        load_runs([tmp_path])


def _assert_real_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 10_000, path
    rgb = matplotlib.image.imread(path)[..., :3]
    assert rgb.std() > 0.05, f"{path} looks blank"
    # empty axes are black and white; the data lines are the only coloured pixels
    assert ((rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.3).mean() > 0.001, f"{path} has no data drawn"


def test_cli_single_run_writes_table_and_plots(tmp_path, capsys):
    run_dir = make_run(tmp_path, "a")
    assert main(["analyze", str(run_dir), "--target-acc", "0.625", "--plot"]) == 0
    printed = capsys.readouterr().out
    assert "final_acc_mean" in printed and "comparison.csv" in printed
    table = pd.read_csv(run_dir / "comparison.csv")
    assert table.loc[0, "time_to_target_s"] == 22.5 and table.loc[0, "final_acc_mean"] == 0.75
    for name in ("curves_peers.png", "consensus.png"):
        _assert_real_png(run_dir / name)


def test_cli_several_runs_write_into_out(tmp_path):
    sweep, out = tmp_path / "sweep", tmp_path / "analysis"
    make_run(sweep, "a")
    make_run(sweep, "b", method="none")
    assert main(["analyze", str(sweep / "a"), str(sweep / "b"), "--plot", "--out", str(out)]) == 0
    assert list(pd.read_csv(out / "comparison.csv")["run_id"]) == ["a", "b"]
    for name in ("curves_runs.png", "consensus.png"):
        _assert_real_png(out / name)


def test_cli_folder_without_metrics_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["analyze", str(tmp_path / "empty")]) == 2
    assert "no metrics.csv" in capsys.readouterr().err
    assert not (tmp_path / "empty" / "comparison.csv").exists()


def test_cli_run_without_rows_exits_2(tmp_path, capsys):
    RowWriter(tmp_path / "metrics.csv").close()  # header only: stopped before the first evaluation
    assert main(["analyze", str(tmp_path)]) == 2
    assert "no rows" in capsys.readouterr().err


def test_analyze_module_loads_without_torch_or_ray():
    code = "import sys, launcher.results.analyze; sys.exit(bool({'torch', 'ray', 'hivemind'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_settings_that_vary_between_runs_get_their_own_column(tmp_path):
    """A sweep over a key the table does not show (here optim.lr) must still tell its rows apart."""
    make_run(tmp_path, "a", lr=0.1)
    make_run(tmp_path, "b", lr=0.01)
    table = compare_runs(load_runs([tmp_path]))
    assert table["optim.lr"].tolist() == [0.1, 0.01]
    assert "seed" not in table.columns and "data.dataset" not in table.columns  # equal in both runs


def test_the_per_peer_plot_marks_the_runs_churn_events(tmp_path):
    from launcher.results.analyze import load_run
    from launcher.results.plots import plot_peers
    from launcher.results.summary import EVENT_COLUMNS, Event, read_events, summarize

    run_dir = make_run(tmp_path, "churn")
    writer = RowWriter(run_dir / "events.csv", EVENT_COLUMNS)
    started = [Event(5.0, 0, 0, "started"), Event(5.0, 1, 0, "started")]
    churn = [Event(16.0, 1, 0, "died", "killed", 0.2, 1), Event(19.0, 1, 1, "restarted", "state from peer 0", 3.0, 1),
             Event(25.0, 0, 0, "left", epoch=2)]  # fmt: skip
    writer.write(started + churn)
    writer.close()
    events = read_events(run_dir)
    axes = plot_peers(load_run(run_dir), events).axes
    marks = [(line.get_xdata()[0], line.get_color()) for line in axes[1].lines if len(set(line.get_xdata())) == 1]
    assert marks == [(1.5, "red"), (1.5, "green"), (2.5, "gray")], "between the epochs they fell between"
    on_time = sorted(line.get_xdata()[0] for line in axes[0].lines if len(set(line.get_xdata())) == 1)
    assert on_time == [11.0, 14.0, 20.0], "at their time since training started"
    summary = summarize(load_run(run_dir), events).set_index("peer")
    assert summary.loc[1, "deaths"] == 1 and summary.loc[0, "deaths"] == 0
    assert summary.loc[1, "mean_rejoin_s"] == 3.0


def test_summary_and_comparison_count_the_rounds_of_every_incarnation(tmp_path):
    """Round counters start again with each restart: peer 1 averaged 2 rounds, died, and its restarted incarnation 1
    more. summary.csv and comparison.csv both count 3 for it (and partial rounds apart)."""
    from launcher.results.summary import summarize

    run_dir = tmp_path / "restarted"
    run_dir.mkdir()
    cfg = parse_config({"name": "restarted", "peers": 2})
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    writer = RowWriter(run_dir / "metrics.csv")
    for epoch, (ok0, ok1, restarts1) in enumerate([(1, 1, 0), (2, 2, 0), (3, 1, 1)], start=1):
        for peer, ok, restarts in ((0, ok0, 0), (1, ok1, restarts1)):
            writer.write([MetricsRow(run_id="restarted", peer=peer, epoch=epoch, step=epoch, samples_seen=epoch,
                                     wall_time_s=epoch, train_loss=1, train_acc=0.5, test_loss=1, test_acc=0.5,
                                     samples_per_s=1, train_s=1, eval_s=0, averaging_rounds_ok=ok,
                                     averaging_rounds_failed=0, averaging_group_size=2, averaging_seconds=0,
                                     restarts=restarts,
                                     averaging_rounds_partial=peer)])  # fmt: skip
    writer.close()
    summary = summarize(load_run(run_dir)).set_index("peer")
    assert summary.rounds_ok.tolist() == [3, 3] and summary.rounds_partial.tolist() == [0, 2]
    table = compare_runs(load_run(run_dir))
    assert table.rounds_ok.iloc[0] == summary.rounds_ok.sum() == 6
    assert table.rounds_partial.iloc[0] == summary.rounds_partial.sum() == 2


def test_a_run_whose_rounds_mostly_failed_is_called_out():
    """The verdict behind the run's exit status: fewer than half the rounds succeeded (partial ones do not count)."""
    from launcher.results.summary import averaging_verdict

    def totals(ok, failed, partial):
        return pd.DataFrame({"rounds_ok": ok, "rounds_failed": failed, "rounds_partial": partial})

    assert averaging_verdict(totals([0, 0], [48, 48], [0, 0]), "gossip").startswith("averaging mostly failed: 0 of 96")
    assert averaging_verdict(totals([2, 2], [1, 1], [2, 2]), "gossip") is not None, "partial rounds are no success"
    assert averaging_verdict(totals([5, 5], [5, 5], [0, 0]), "diloco") is None, "half is not most"
    assert averaging_verdict(totals([0, 0], [0, 0], [0, 0]), "gossip") is None, "no round: nothing to judge"
    assert averaging_verdict(totals([0], [9], [0]), "none") is None


def test_bytes_nobody_counted_are_unknown_not_zero(tmp_path):
    """A run written before the byte count (no averaging_bytes column): its swarm_mb is NaN, never 0 (which would read
    as 'no traffic'); a run's bytes_source says whether its bytes were measured or modelled (the all-reduce ring)."""
    run_dir = make_run(tmp_path, "old")
    metrics = pd.read_csv(run_dir / "metrics.csv").drop(columns=["averaging_bytes", "bytes_source"])
    metrics.to_csv(run_dir / "metrics.csv", index=False)
    (row,) = compare_runs(load_run(run_dir)).to_dict("records")
    assert math.isnan(row["swarm_mb"]) and row["bytes_source"] == "unknown"
    (row,) = compare_runs(load_run(make_run(tmp_path, "new"))).to_dict("records")
    assert row["swarm_mb"] == pytest.approx(5.0) and row["bytes_source"] == "measured"


def test_runs_written_before_the_column_renames_read_alike(tmp_path):
    """avg_* became averaging_*: a run folder from before compares exactly as the same run written today."""
    from workers.core.metrics import RENAMED

    new = make_run(tmp_path, "new")
    old = make_run(tmp_path, "old")
    table = pd.read_csv(old / "metrics.csv").rename(columns={v: k for k, v in RENAMED.items()})
    table.to_csv(old / "metrics.csv", index=False)
    assert "avg_rounds_ok" in (old / "metrics.csv").read_text()
    rows = compare_runs(load_runs([new, old])).drop(columns=["run_id", "run_dir"])
    pd.testing.assert_frame_equal(rows.iloc[[0]].reset_index(drop=True), rows.iloc[[1]].reset_index(drop=True))


def test_the_straggler_models_crossover():
    """R(f) of docs/gossip_wins.md: 1 at f = 1 when both methods cost the same per round, above 1 for any straggler;
    with gossip's round costlier (T_o > c_AR) all-reduce wins at f = 1 and gossip from a crossover f* on."""
    from launcher.results.expectations import crossover, expected_ratio

    same = dict(peers=8, step_s=0.05, every_steps=10)
    assert expected_ratio(1, **same, gossip_overhead_s=0.2, allreduce_overhead_s=0.2) == pytest.approx(1.0)
    assert expected_ratio(2, **same, gossip_overhead_s=0.2, allreduce_overhead_s=0.2) > 1
    costly = dict(**same, gossip_overhead_s=0.8, allreduce_overhead_s=0.1)
    ratios = [expected_ratio(f, **costly) for f in (1, 2, 4, 8, 16)]
    assert ratios == sorted(ratios) and ratios[0] < 1 < ratios[-1]
    f_star = crossover(**costly)
    assert expected_ratio(f_star, **costly) == pytest.approx(1.0, abs=1e-3) and 2 < f_star < 8


def test_the_straggler_table_puts_the_models_prediction_next_to_the_measured_ratio():
    """E1's table from a sweep's rows: f read from each run's scenario (as its config column holds it), the model fed
    by the f = 1 arms' step time and round overheads, the measured throughput and time-to-target ratios."""
    from launcher.results.expectations import expected_ratio, straggler_factor, straggler_table

    slow4 = str([{"event": "slow", "peer": 7, "factor": 4.0, "at_epoch": None}])
    assert straggler_factor(slow4) == 4.0 and straggler_factor("[]") == 1.0
    assert straggler_factor("[{event: kill, peer: 0, at_s: 30, factor: null}]") == 1.0
    rows = []
    for method, scenario, overhead in (("gossip", "[]", 0.1), ("allreduce", "[]", 0.3), ("gossip", slow4, 0.1),
                                       ("allreduce", slow4, 0.3)):  # fmt: skip
        for peer in range(2):
            for epoch in (1, 2):  # 10 steps an epoch of 0.05 s, one round each
                rows.append({"gossip.method": method, "scenario": scenario, "peer": peer, "epoch": epoch,
                             "step": 10 * epoch, "train_s": 0.5, "averaging_seconds": overhead,
                             "averaging_rounds_ok": epoch, "averaging_rounds_failed": 0,
                             "gossip.every_steps": 10, "restarts": 0})  # fmt: skip
    table = pd.DataFrame([
        {"method": m, "scenario": s, "swarm_samples_per_s": v, "swarm_to_target_s": t}
        for m, s, v, t in [("gossip", "[]", 100.0, 10.0), ("allreduce", "[]", 90.0, 9.0),
                           ("gossip", slow4, 80.0, 12.0), ("allreduce", slow4, 40.0, 30.0)]
    ])  # fmt: skip
    result = straggler_table(pd.DataFrame(rows), table).set_index("f")
    model = dict(peers=2, step_s=0.05, every_steps=10, gossip_overhead_s=0.1, allreduce_overhead_s=0.3)
    assert result.loc[4.0, "predicted_ratio"] == pytest.approx(expected_ratio(4.0, **model))
    assert result.loc[1.0, "measured_ratio"] == pytest.approx(100 / 90) and result.loc[4.0, "measured_ratio"] == 2.0
    assert result.loc[4.0, "time_to_target_ratio"] == pytest.approx(2.5)


def test_the_swarms_time_to_target_counts_each_peer_with_what_it_last_reported():
    """A straggler's epoch-1 row comes late; the swarm's mean of the latest accuracies passes the target as soon as
    the fast peers' later epochs lift it, without waiting for the straggler's row of the same epoch."""
    from launcher.results.analyze import swarm_to_target_s

    run = pd.DataFrame([
        {"peer": 0, "epoch": 1, "test_acc": 0.3, "run_time_s": 1.0}, {"peer": 1, "epoch": 1, "test_acc": 0.3,
         "run_time_s": 1.1}, {"peer": 0, "epoch": 2, "test_acc": 0.9, "run_time_s": 2.0},
        {"peer": 2, "epoch": 1, "test_acc": 0.2, "run_time_s": 4.0}, {"peer": 1, "epoch": 2, "test_acc": 0.9,
         "run_time_s": 4.5}, {"peer": 2, "epoch": 2, "test_acc": 0.9, "run_time_s": 8.0},
    ])  # fmt: skip
    assert swarm_to_target_s(run, 0.45) == 4.0  # (0.9 + 0.3 + 0.2) / 3 = 0.47, once every peer has reported
    assert swarm_to_target_s(run, 0.6) == 4.5  # (0.9 + 0.9 + 0.2) / 3, before peer 2's epoch-2 row
    assert np.isnan(swarm_to_target_s(run, 0.95))


def test_a_run_cut_short_before_any_consensus_plots_none_and_raises_nothing():
    """An interrupted run's rows may carry no consensus distance at all (an all-empty column reads as object): seen
    in a Ctrl-C of a sweep, whose comparison then failed in plot_consensus."""
    from launcher.results.plots import plot_consensus

    rows = pd.DataFrame(dict(run_id="cut", peer=[0, 1], epoch=1, test_acc=0.1, test_loss=2.3, wall_time_s=1.0,
                             samples_seen=32, consensus_dist=pd.Series([None, None], dtype=object)))  # fmt: skip
    assert plot_consensus(rows) is None


def test_a_setting_only_some_runs_have_is_the_experiments_condition():
    """E2's one slow link: `emulation.links.7.rate_mbit` is 1 in the slow-link runs and empty in the control runs.
    It is the condition their time-to-target plot is drawn against (the comparison read back from its CSV had
    found none, and wrote no plot)."""
    from launcher.results.analyze import experiment_condition
    from launcher.results.plots import condition_label

    link = {"emulation.links.7.rate_mbit": [np.nan, 1.0, np.nan, 1.0], "gossip.overlap": True}
    table = pd.DataFrame(dict(method=["gossip", "gossip", "allreduce", "allreduce"], rate_mbit=50.0, scenario="[]",
                              **link))  # fmt: skip
    assert experiment_condition(table) == "emulation.links.7.rate_mbit"
    assert experiment_condition(table.drop(columns="emulation.links.7.rate_mbit")) is None
    assert [condition_label(v) for v in table["emulation.links.7.rate_mbit"]] == ["unset", "1.0", "unset", "1.0"]
