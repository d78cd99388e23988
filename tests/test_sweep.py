"""Sweeps: the grid and its validation (fast), the sweep loop's stop/go decisions (fast, run_experiment faked),
and one real 2-point sweep through the command line (integration)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from launcher import cli
from launcher.driver import RunResult
from tests.conftest import QUICKSTART
from workers.config import (
    ConfigError,
    ExperimentConfig,
    Sweep,
    apply_overrides,
    expand_grid,
    load_config,
    load_experiment,
)


def write_sweep(tmp_path, grid, name="sweep", **settings) -> str:
    raw = yaml.safe_load(QUICKSTART.read_text()) | settings | {"sweep": grid}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


# --- the grid -----------------------------------------------------------------------------------------------------


def test_grid_is_the_cartesian_product_first_key_slowest():
    grid = {"gossip.method": ["gossip", "none"], "gossip.group_size": [2, 4, 8]}
    assert expand_grid(grid) == [
        ["gossip.method=gossip", "gossip.group_size=2"],
        ["gossip.method=gossip", "gossip.group_size=4"],
        ["gossip.method=gossip", "gossip.group_size=8"],
        ["gossip.method=none", "gossip.group_size=2"],
        ["gossip.method=none", "gossip.group_size=4"],
        ["gossip.method=none", "gossip.group_size=8"],
    ]


@pytest.mark.parametrize("value", ["gossip", "1.5", 1.5, 0.001, 7, True, None, "epoch", "yes", [1, 2], "a: b"])
def test_grid_values_read_back_as_written(value):
    (point,) = expand_grid({"a.b": [value]})
    assert apply_overrides({}, point) == {"a": {"b": value}}


@pytest.mark.parametrize(
    "grid, message",
    [
        ({}, "sweep={}: expected dotted keys"),
        (["gossip.method"], "sweep=['gossip.method']: expected dotted keys"),
        ({"gossip.method": "gossip"}, "sweep.gossip.method='gossip': expected a non-empty list"),
        ({"gossip.method": []}, "sweep.gossip.method=[]: expected a non-empty list"),
        ({"gossip.alpha": {"a": 1}}, "sweep.gossip.alpha={'a': 1}: expected a non-empty list"),
        ({3: [1, 2]}, "sweep: key 3 is not a dotted config key"),
    ],
)
def test_malformed_grids_are_rejected_naming_the_key(grid, message):
    with pytest.raises(ConfigError) as err:
        expand_grid(grid)
    assert message in str(err.value)


# --- loading a sweep file -----------------------------------------------------------------------------------------


def test_every_point_is_a_validated_config_and_set_applies_to_all(tmp_path):
    path = write_sweep(tmp_path, {"gossip.method": ["gossip", "none"], "gossip.group_size": [2, 4]}, name="grid")
    sweep = load_experiment(path, ["optim.epochs=2", "peers=3"])
    assert isinstance(sweep, Sweep) and sweep.name == "grid"
    assert sweep.keys == ("gossip.method", "gossip.group_size")
    settings = [(p.config.gossip.method, p.config.gossip.group_size) for p in sweep.points]
    assert settings == [("gossip", 2), ("gossip", 4), ("none", 2), ("none", 4)]
    assert all(p.config.optim.epochs == 2 and p.config.peers == 3 and p.config.name == "grid" for p in sweep.points)
    assert sweep.points[3].overrides == ("gossip.method=none", "gossip.group_size=4")
    assert "sweep" not in ExperimentConfig.model_fields


def test_the_snapshot_reloads_to_the_same_points(tmp_path):
    sweep = load_experiment(write_sweep(tmp_path, {"gossip.alpha": [0.5, 1.0]}), ["optim.epochs=2"])
    snapshot = tmp_path / "again.yaml"
    snapshot.write_text(yaml.safe_dump(sweep.spec, sort_keys=False))
    assert load_experiment(snapshot).points == sweep.points


def test_a_file_without_sweep_loads_exactly_as_before():
    assert load_experiment(QUICKSTART, ["gossip.alpha=0.5"]) == load_config(QUICKSTART, ["gossip.alpha=0.5"])


def test_load_config_refuses_a_sweep_file_with_a_clear_message(tmp_path):
    with pytest.raises(ConfigError, match="has a `sweep:` section"):
        load_config(write_sweep(tmp_path, {"gossip.method": ["gossip", "none"]}))


@pytest.mark.parametrize("override", ["gossip.method=none", "gossip={}", "gossip.method.x=1"])
def test_set_of_a_swept_key_is_an_error_naming_it(tmp_path, override):
    with pytest.raises(ConfigError, match=f"override '{override}': gossip.method is swept"):
        load_experiment(write_sweep(tmp_path, {"gossip.method": ["gossip", "none"]}), [override])


@pytest.mark.parametrize(
    "grid, expected",
    [
        ({"gossip.method": ["gossip", "ring"]}, ["sweep point 2/2 (gossip.method=ring)", "gossip.method='ring'"]),
        ({"gossip.colour": ["red"]}, ["sweep point 1/1 (gossip.colour=red)", "gossip.colour: unknown key"]),
        ({"peers": [4, 1]}, ["sweep point 2/2 (peers=1)", "can never be met by peers=1"]),
        ({"peers.n": [4]}, ["sweep point 1/1 (peers.n=4)", "'peers' is not a section"]),
    ],
)
def test_a_bad_point_names_its_settings_and_the_field(tmp_path, grid, expected):
    with pytest.raises(ConfigError) as err:
        load_experiment(write_sweep(tmp_path, grid))
    for text in expected:
        assert text in str(err.value)
    assert "sweep point 1/2" not in str(err.value), "only the bad points are reported"


def test_cli_rejects_a_bad_point_with_exit_2_before_anything_runs(tmp_path, capsys):
    path = write_sweep(tmp_path, {"gossip.group_size": [4, 0]})
    started = time.perf_counter()
    assert cli.main(["run", path, "--out", str(tmp_path / "out")]) == 2
    assert "sweep point 2/2 (gossip.group_size=0)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert time.perf_counter() - started < 5


# --- the sweep loop, with run_experiment faked (Ray is not started) -----------------------------------------------


@pytest.fixture
def fake_runs(monkeypatch):
    """run_experiment replaced by one that makes the run folder and returns the next scripted exit code
    (or raises KeyboardInterrupt, as a Ctrl-C outside the run's own handler does)."""
    from launcher import sweep as sweep_module

    calls: list[ExperimentConfig] = []
    script: list[int | type[BaseException]] = []

    def run_experiment(cfg, out_dir):
        calls.append(cfg)
        run_dir = out_dir / f"run-{len(calls)}"
        run_dir.mkdir()
        outcome = script.pop(0)
        if isinstance(outcome, type):
            raise outcome()
        return RunResult(run_dir, outcome)

    monkeypatch.setattr(sweep_module, "run_experiment", run_experiment)
    monkeypatch.setattr(sweep_module, "connect_ray", lambda cfg, address=None: False)
    return sweep_module, calls, script


def three_point_sweep(tmp_path) -> Sweep:
    return load_experiment(write_sweep(tmp_path, {"gossip.alpha": [0.25, 0.5, 1.0]}))


def test_a_failed_point_does_not_stop_the_sweep(tmp_path, fake_runs):
    sweep_module, calls, script = fake_runs
    script += [0, 1, 0]
    result = sweep_module.run_sweep(three_point_sweep(tmp_path), tmp_path / "out")
    assert result.exit_code == 1 and len(calls) == 3
    index = pd.read_csv(result.sweep_dir / "sweep.csv")
    assert index.columns.tolist() == ["point", "run_dir", "gossip.alpha", "exit_code", "status"]
    assert index["gossip.alpha"].tolist() == [0.25, 0.5, 1.0]
    assert index.status.tolist() == ["done", "failed", "done"]
    assert index.run_dir.tolist() == ["run-1", "run-2", "run-3"]


@pytest.mark.parametrize("interrupt", [130, KeyboardInterrupt], ids=["during-the-run", "outside-the-run-handler"])
def test_ctrl_c_stops_the_sweep_and_keeps_the_index(tmp_path, fake_runs, interrupt):
    sweep_module, calls, script = fake_runs
    script += [0, interrupt, 0]
    result = sweep_module.run_sweep(three_point_sweep(tmp_path), tmp_path / "out")
    assert result.exit_code == 130
    assert len(calls) == 2, "the point after the interrupted one is not started"
    index = pd.read_csv(result.sweep_dir / "sweep.csv")
    assert index.status.tolist() == ["done", "interrupted"]
    assert index.run_dir.tolist() == ["run-1", "run-2"]


def test_a_home_relative_out_folder_is_expanded(tmp_path, fake_runs, monkeypatch):
    """`--out '~/results'` (quoted, as the README says for Ray Jobs): the sweep goes under the home folder, not into a
    literal ./~/ where nothing finds its runs."""
    sweep_module, calls, script = fake_runs
    script += [0, 0, 0]
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    result = sweep_module.run_sweep(three_point_sweep(tmp_path), Path("~/results"))
    assert result.sweep_dir.parent == tmp_path / "home" / "results"
    assert sorted(p.name for p in result.sweep_dir.iterdir() if p.is_dir()) == ["run-1", "run-2", "run-3"]
    assert not (tmp_path / "~").exists()


def test_ray_is_sized_for_the_largest_point(tmp_path, fake_runs, monkeypatch):
    sweep_module, _, script = fake_runs
    script += [0, 0, 0]
    sizes = []
    monkeypatch.setattr(sweep_module, "connect_ray", lambda cfg, address=None: sizes.append(cfg.peers) or False)
    sweep = load_experiment(write_sweep(tmp_path, {"peers": [2, 6, 3]}))
    sweep_module.run_sweep(sweep, tmp_path / "out")
    assert sizes == [6], "Ray is connected once, before the first point, for the largest one"


# --- a real sweep ---------------------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_two_point_sweep_through_the_cli(ray_local, tmp_path, capsys):
    path = write_sweep(tmp_path, {"gossip.method": ["gossip", "none"]}, name="methods", peers=2)
    previous_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        args = ["run", path, "--set", "optim.epochs=2", "--set", "gossip.matchmaking_time=1.5"]
        exit_code = cli.main([*args, "--out", str(tmp_path / "out")])
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
    assert exit_code == 0
    (sweep_dir,) = (tmp_path / "out").iterdir()
    assert sweep_dir.name.startswith("methods-")
    assert ray_local.is_initialized(), "a Ray the sweep did not start is left running"

    index = pd.read_csv(sweep_dir / "sweep.csv")
    assert index["gossip.method"].tolist() == ["gossip", "none"] and (index.status == "done").all()
    for run_name in index.run_dir:
        metrics = pd.read_csv(sweep_dir / run_name / "metrics.csv")
        assert len(metrics) == 2 * 2, "2 peers x 2 epochs"

    comparison = pd.read_csv(sweep_dir / "comparison.csv")
    assert sorted(comparison.method) == ["gossip", "none"] and (comparison.epochs == 2).all()
    consensus = comparison.set_index("method").final_consensus_dist
    assert consensus["none"] > 0.1 and consensus["gossip"] <= consensus["none"] / 10
    assert "final_consensus_dist" in capsys.readouterr().out, "the comparison table is printed"
