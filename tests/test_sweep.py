"""Sweeps: the grid and its validation (fast), the sweep loop's stop/go decisions (fast, run_experiment faked),
and one real 2-point sweep through the command line (integration)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from launcher import cli
from launcher.sweep.grammar import Sweep, expand_grid, load_experiment
from tests.conftest import QUICKSTART, ROOT, ray_processes_left
from workers.core.config import ExperimentConfig, apply_overrides, load_config
from workers.core.errors import ConfigError


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


# --- sampled sweeps and their settings ------------------------------------------------------------------------------


def test_random_search_draws_samples_per_grid_point_reproducibly(tmp_path):
    grid = {"gossip.method": ["gossip", "none"], "optim.lr": {"loguniform": [0.01, 0.2]}, "search": "random",
            "samples": 3}  # fmt: skip
    sweep = load_experiment(write_sweep(tmp_path, grid))
    assert sweep.settings.search == "random" and sweep.keys == ("gossip.method", "optim.lr")
    lrs = [p.config.optim.lr for p in sweep.points]
    assert [p.config.gossip.method for p in sweep.points] == ["gossip"] * 3 + ["none"] * 3
    assert all(0.01 <= lr <= 0.2 for lr in lrs) and len(set(lrs)) == 6
    assert [p.config.optim.lr for p in load_experiment(write_sweep(tmp_path, grid)).points] == lrs, "seeded"


def test_optuna_validates_each_keys_extremes_before_anything_runs(tmp_path):
    good = {"gossip.alpha": {"uniform": [0.1, 1.0]}, "gossip.method": ["gossip", "none"], "search": "optuna"}
    sweep = load_experiment(write_sweep(tmp_path, good | {"samples": 5}))
    assert sweep.adaptive and sweep.settings.samples == 5
    assert {p.config.gossip.alpha for p in sweep.points} == {0.1, 1.0}
    overrides, cfg = sweep.trial_config({"gossip.alpha": 0.3, "gossip.method": "none"})
    assert overrides == ("gossip.alpha=0.3", "gossip.method=none") and cfg.gossip.alpha == 0.3
    with pytest.raises(ConfigError, match="gossip.alpha=1.5"):  # alpha must be <= 1: the upper extreme is refused
        load_experiment(write_sweep(tmp_path, good | {"gossip.alpha": {"uniform": [0.1, 1.5]}}))


@pytest.mark.parametrize(
    "section, message",
    [
        ({"optim.lr": {"uniform": [0.01, 0.1]}}, "sweep.optim.lr={'uniform': [0.01, 0.1]}: a distribution is sampled"),
        ({"optim.lr": {"normal": [0, 1]}, "search": "random"}, "expected a non-empty list of values or a distrib"),
        ({"optim.lr": {"loguniform": [0, 1]}, "search": "random"}, "needs low < high and low > 0"),
        ({"optim.lr": [0.1], "max_concurrent": 0}, "sweep.max_concurrent=0"),
        ({"optim.lr": [0.1], "search": "bayes"}, "sweep.search='bayes'"),
    ],
)
def test_bad_sweep_settings_name_the_field(tmp_path, section, message):
    with pytest.raises(ConfigError) as err:
        load_experiment(write_sweep(tmp_path, section))
    assert message in str(err.value)


# --- resuming: what a resume skips, and where it continues (no Ray) --------------------------------------------------


def test_a_resume_skips_done_points_and_sets_unfinished_runs_aside(tmp_path):
    from launcher.sweep import runner as sweep_module

    sweep = three_point_sweep(tmp_path)
    sweep_dir = sweep_module.make_sweep_dir(sweep, tmp_path / "out")
    for name in ("run-a", "run-b"):
        (sweep_dir / name).mkdir()
        (sweep_dir / name / "config.yaml").write_text("{}")
    for number, run_name, status in [(1, "run-a", "done"), (2, "run-b", "interrupted")]:
        row = sweep_module.index_row(sweep, sweep.points[number - 1].config, number, run_name, 0, status)
        sweep_module.append_index_row(sweep_dir / "sweep.csv", row)
    done = sweep_module.finished_points(sweep_dir)
    assert list(done) == [1]
    sweep_module.set_aside_unfinished_runs(sweep_dir, done)
    assert (sweep_dir / "run-a").is_dir() and (sweep_dir / "interrupted" / "run-b").is_dir()
    assert sweep_module.resumable_sweep_dir(sweep, tmp_path / "out") == sweep_dir
    other = load_experiment(write_sweep(tmp_path, {"gossip.alpha": [0.25, 0.5]}))
    with pytest.raises(ConfigError, match="--resume: no earlier run of sweep 'sweep' with these settings"):
        sweep_module.resumable_sweep_dir(other, tmp_path / "out")


def test_a_resumed_search_numbers_new_points_past_every_old_one(tmp_path):
    """An optuna sweep: point 1 done, point 2 failed, point 3 done. A resume's new point is 4 (counting only the
    finished ones gave 3: it shadowed the finished point 3, and a second resume moved point 3's run aside)."""
    from launcher.sweep import runner as sweep_module

    sweep = three_point_sweep(tmp_path)
    sweep_dir = sweep_module.make_sweep_dir(sweep, tmp_path / "out")
    for number, status in [(1, "done"), (2, "failed"), (3, "done")]:
        (sweep_dir / f"run-{number}").mkdir()
        (sweep_dir / f"run-{number}" / "config.yaml").write_text("{}")
        row = sweep_module.index_row(sweep, sweep.points[number - 1].config, number, f"run-{number}", 0, status)
        sweep_module.append_index_row(sweep_dir / "sweep.csv", row)
    assert sweep_module.next_point_number(sweep_module.read_index(sweep_dir)) == 4
    assert sweep_module.next_point_number([]) == 1
    row = sweep_module.index_row(sweep, sweep.points[0].config, 4, "run-4", 0, "done")  # the resume's new point
    sweep_module.append_index_row(sweep_dir / "sweep.csv", row)
    (sweep_dir / "run-4").mkdir()
    (sweep_dir / "run-4" / "config.yaml").write_text("{}")
    done = sweep_module.finished_points(sweep_dir)
    assert sorted(done) == [1, 3, 4]
    sweep_module.set_aside_unfinished_runs(sweep_dir, done)  # a second resume
    assert [(sweep_dir / f"run-{n}").is_dir() for n in (1, 3, 4)] == [True] * 3
    assert (sweep_dir / "interrupted" / "run-2").is_dir()


def test_a_local_ray_holds_max_concurrent_of_the_largest_trials(tmp_path):
    from launcher.sweep.runner import cpus_needed

    sweep = load_experiment(write_sweep(tmp_path, {"peers": [2, 6, 3], "max_concurrent": 2}))
    assert cpus_needed(sweep) == 7  # 2 trials x (6 peers x 0.5 CPU + the trial's sliver), rounded up
    single = load_experiment(write_sweep(tmp_path, {"peers": [2, 6, 3]}))
    assert cpus_needed(single) == 4


def three_point_sweep(tmp_path) -> Sweep:
    return load_experiment(write_sweep(tmp_path, {"gossip.alpha": [0.25, 0.5, 1.0]}))


# --- a real sweep on Ray Tune ----------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(420)
def test_two_swarms_at_once_ctrl_c_then_resume_runs_only_the_rest(tmp_path, private_ray_env):
    """max_concurrent 2: points 1 and 2 train at the same time. Ctrl-C once point 1 is done; `--resume` runs points
    2 and 3 and not point 1 again; comparison.csv then has each point once."""
    grid = {"optim.epochs": [1, 15, 2], "max_concurrent": 2}
    path = write_sweep(tmp_path, grid, name="epochs", peers=2)
    args = [sys.executable, "-m", "launcher", "run", path, "--set", "gossip.matchmaking_time=1.5",
            "--out", str(tmp_path / "out")]  # fmt: skip
    with (tmp_path / "log.txt").open("w") as log:
        proc = subprocess.Popen(args, cwd=ROOT, env=private_ray_env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            index = wait_for_index(tmp_path / "out", "done", timeout=240)
            os.killpg(proc.pid, signal.SIGINT)
            assert proc.wait(timeout=90) == 130
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    sweep_dir = index.parent
    first = pd.read_csv(index)
    assert first.loc[first.status == "done", "point"].tolist() == [1]
    (done_run,) = first.loc[first.status == "done", "run_dir"]
    others = sorted(run_span(p.parent) for p in sweep_dir.glob("*/config.yaml") if p.parent.name != done_run)
    overlap = run_span(sweep_dir / done_run), others[0]
    assert overlap[1][0] < overlap[0][1], "the second swarm started before the first one ended"
    time.sleep(2)
    left = ray_processes_left(private_ray_env)
    assert left == [], "Ctrl-C leaves nothing behind: no trial, peer, p2pd or Ray process of this sweep's Ray"

    resumed = subprocess.run([*args, "--resume"], cwd=ROOT, env=private_ray_env, capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    final = pd.read_csv(index)
    done = final[final.status == "done"]
    assert sorted(done.point) == [1, 2, 3] and done.point.is_unique, "point 1 is not run again"
    assert sorted(pd.read_csv(sweep_dir / "comparison.csv").epochs) == [1, 2, 15]
    for run_name, epochs in zip(done.run_dir, done["optim.epochs"], strict=True):
        assert pd.read_csv(sweep_dir / run_name / "metrics.csv").epoch.max() == epochs
    assert (sweep_dir / "trials.csv").is_file()


def wait_for_index(out_dir: Path, status: str, timeout: float) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for index in out_dir.glob("*/sweep.csv"):
            if f",{status}," in index.read_text():
                return index
        time.sleep(0.5)
    raise AssertionError(f"no point reached status {status} in {timeout} s")


def run_span(run_dir: Path) -> tuple[float, float]:
    """When a run started (its config snapshot) and when its last row was written."""
    return (run_dir / "config.yaml").stat().st_mtime, (run_dir / "metrics.csv").stat().st_mtime


def test_arms_cross_every_grid_point_with_settings_one_grid_cannot_hold(tmp_path):
    """All-reduce takes no overlap: methods with their own knobs are arms, each crossed with the grid's conditions."""
    arms = [{"gossip.method": "gossip", "gossip.overlap": True, "gossip.every_steps": 5},
            {"gossip.method": "allreduce", "gossip.every_steps": 5}, {"gossip.method": "none"}]  # fmt: skip
    sweep = load_experiment(write_sweep(tmp_path, {"seed": [0, 1], "arms": arms, "target_acc": 0.8}))
    assert [p.overrides for p in sweep.points][:2] == [
        ("gossip.method=gossip", "gossip.overlap=true", "gossip.every_steps=5", "seed=0"),
        ("gossip.method=gossip", "gossip.overlap=true", "gossip.every_steps=5", "seed=1")]  # fmt: skip
    assert len(sweep.points) == 6 and sweep.keys == ("gossip.method", "gossip.overlap", "gossip.every_steps", "seed")
    assert [p.config.gossip.overlap for p in sweep.points] == [True, True, False, False, False, False]
    assert sweep.settings.target_acc == 0.8
    with pytest.raises(ConfigError, match="arms: only a grid sweep takes them"):
        load_experiment(write_sweep(tmp_path, {"seed": [0, 1], "arms": arms, "search": "random"}))
    with pytest.raises(ConfigError, match="gossip.overlap=True"):
        load_experiment(write_sweep(tmp_path, {"seed": [0], "arms": [{"gossip.method": "allreduce",
                                                                       "gossip.overlap": True}]}))  # fmt: skip
