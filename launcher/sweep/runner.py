"""Run a sweep on Ray Tune: each point of a config's `sweep:` section is a trial that runs one swarm, up to
`sweep.max_concurrent` swarms at once, each trial reserving its peers as one placement group.

results/<sweep-name>-<timestamp>/
    sweep.yaml          the sweep as run (the file after --set): `gossip-launch run` it again to repeat it
    sweep.csv           one row per finished point: run folder, swept values, exit code, status (appended)
    trials.csv          Ray Tune's results table (one row per trial, its last report), written at the end
    <run-id>/...        one run folder per point, as `run_experiment` writes it
    tune/               Ray Tune's own experiment folder
    interrupted/        run folders of points that an interrupt cut short (`--resume` runs those points again)
    comparison.csv      written by `gossip-launch analyze SWEEP_DIR` at the end (see launcher/cli.py)

`gossip-launch run SWEEP.yaml --resume` continues the newest sweep folder of the same sweep: the points that
sweep.csv lists as done are not run again.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import yaml
from ray import tune

from launcher.driver.connect import connect_ray
from launcher.driver.controller import run_experiment
from launcher.driver.placement import TRIAL_CPU, trial_bundles
from launcher.emulation.links import remove_orphans
from launcher.results.summary import read_metrics
from launcher.results.tables import epoch_curve
from launcher.sweep.grammar import Distribution, Sweep
from workers.core.config import ExperimentConfig, dotted_get
from workers.core.errors import ConfigError
from workers.core.signals import install_interrupt_handlers, signals_ignored
from workers.core.storage import FolderMirror, download_file, fetch_results, filesystem, is_remote, join, remote_of

logger = logging.getLogger("launcher.sweep.runner")

INDEX_FILE = "sweep.csv"
os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Ctrl-C and SIGTERM go through workers/core/signals.py
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Tune tables between the driver's log lines
STATUS = {0: "done", 1: "failed", 130: "interrupted"}  # run_experiment's exit codes
FINISHED = ("done", "stopped early")  # "stopped early": early_stop's scheduler ended a trailing trial


@dataclass
class SweepResult:
    sweep_dir: Path
    exit_code: int  # 0 every point finished, 1 a point failed, 130 interrupted (points left to run)


def run_sweep(sweep: Sweep, out_dir: Path, address: str | None = None, resume_dir: Path | None = None) -> SweepResult:
    """Run the points that are not done yet; a failed point does not stop the sweep, Ctrl-C does (cleanly)."""
    sweep_dir = resume_dir or make_sweep_dir(sweep, Path(out_dir))
    done = finished_points(sweep_dir)
    set_aside_unfinished_runs(sweep_dir, done)
    logger.info("sweep %s: %d points over %s, %d done before -> %s", sweep.name, planned(sweep), ", ".join(sweep.keys),
                len(done), sweep_dir)  # fmt: skip
    started_ray = connect_ray(largest_point(sweep), address, num_cpus=cpus_needed(sweep))
    install_interrupt_handlers()  # ray.init() put its own sys.exit(15) there
    try:
        exit_code = run_trials(sweep, sweep_dir, done)
    finally:
        if started_ray:
            with signals_ignored():
                ray.shutdown()
    return SweepResult(sweep_dir, exit_code)


def run_trials(sweep: Sweep, sweep_dir: Path, done: dict[int, dict[str, Any]]) -> int:
    storage = sweep.points[0].config.storage
    mirror = FolderMirror(sweep_dir, remote_of(storage, sweep_dir), top_level=True)  # sweep.csv as it is written
    index = IndexCallback(sweep, sweep_dir, first_number=next_point_number(read_index(sweep_dir)), mirror=mirror)
    tuner = make_tuner(sweep, sweep_dir, done, index)
    if tuner is None:
        logger.info("sweep: every point is done already")
        return 0
    try:
        results = tuner.fit()
    except KeyboardInterrupt:
        index.interrupted()
        if any(point.config.emulation.enabled for point in sweep.points):  # the ended trials could not tear down
            remove_orphans(wait_s=15)
        logger.warning("sweep interrupted: `gossip-launch run ... --resume` runs the points that did not finish")
        return 130
    results.get_dataframe().to_csv(sweep_dir / "trials.csv", index=False)
    return 0 if len(finished_points(sweep_dir)) >= planned(sweep) else 1  # a resumed point's old row stays


def make_tuner(sweep: Sweep, sweep_dir: Path, done: dict[int, dict[str, Any]], index: IndexCallback):
    """The Tuner for the points still to run (None when there are none)."""
    settings, search_alg, scheduler = sweep.settings, None, None
    if sweep.adaptive:
        samples = settings.samples - len(done)
        space = {key: tune_domain(values) for key, values in sweep.space.items()}
        search_alg = optuna_search(sweep, done)
    else:
        todo = [number for number in range(1, len(sweep.points) + 1) if number not in done]
        samples, space = (1 if todo else 0), {"point": tune.grid_search(todo)}
    if samples <= 0:
        return None
    if settings.early_stop:
        epochs = max(p.config.optim.epochs for p in sweep.points)
        # max_t past the last epoch: a trial that trains to its end is not "stopped" before its final report
        scheduler = tune.schedulers.ASHAScheduler(time_attr="epoch", max_t=epochs + 1, grace_period=max(1, epochs // 4))
    trainable = tune.with_parameters(run_trial, sweep=sweep, sweep_dir=str(sweep_dir), cwd=os.getcwd())
    return tune.Tuner(
        tune.with_resources(trainable, lambda config: trial_resources(sweep, config)),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=settings.metric, mode=settings.mode, num_samples=samples, search_alg=search_alg,
            scheduler=scheduler, max_concurrent_trials=settings.max_concurrent,
        ),
        run_config=tune.RunConfig(storage_path=str(sweep_dir), name="tune", verbose=0, callbacks=[index]),
    )  # fmt: skip


def tune_domain(values: list | Distribution):
    if isinstance(values, list):
        return tune.choice(values)
    return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[values.kind](
        values.low, values.high
    )


def optuna_search(sweep: Sweep, done: dict[int, dict[str, Any]]):
    """Optuna's TPE, told the points a resumed sweep already finished (their values and results)."""
    from ray.tune.search.optuna import OptunaSearch

    finished = [row for row in done.values() if not math.isnan(float(row.get(sweep.settings.metric, math.nan)))]
    points = [{key: row[key] for key in sweep.keys} for row in finished]
    rewards = [float(row[sweep.settings.metric]) for row in finished]
    seed = sweep.points[0].config.seed
    return OptunaSearch(points_to_evaluate=points or None, evaluated_rewards=rewards or None, seed=seed)


def trial_resources(sweep: Sweep, config: dict[str, Any]):
    bundles, strategy = trial_bundles(trial_point(sweep, config)[1])
    return tune.PlacementGroupFactory(bundles, strategy=strategy)


def trial_point(sweep: Sweep, config: dict[str, Any]) -> tuple[tuple[str, ...], ExperimentConfig]:
    """A trial's overrides and config: a point known up front (grid, random) by its number, else (optuna) the
    swept values Tune drew."""
    if "point" in config:
        point = sweep.points[config["point"] - 1]
        return point.overrides, point.config
    return sweep.trial_config(config)


def run_trial(config: dict[str, Any], sweep: Sweep, sweep_dir: str, cwd: str) -> None:
    """One Tune trial: one swarm, run by the same driver code as `gossip-launch run`, inside the trial's placement
    group. Reports each epoch (launcher/results/sinks.py: TuneSink) and, at the end, the run folder and exit code."""
    os.chdir(cwd)  # Tune moves a trial into its own folder: relative paths in the config are the user's
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = trial_point(sweep, config)[1]
    except ConfigError as err:  # an optuna point that breaks a rule across keys
        tune.report({"exit_code": 2, "run_dir": "", "error": str(err), sweep.settings.metric: math.nan})
        return
    result = run_experiment(cfg, Path(sweep_dir))
    tune.report({**last_epoch(result.run_dir), "exit_code": result.exit_code, "run_dir": result.run_dir.name})


def last_epoch(run_dir: Path) -> dict[str, float]:
    """The swarm's mean test accuracy and loss in the last epoch every peer reported (NaN without rows)."""
    metrics = read_metrics(run_dir) if (run_dir / "metrics.csv").is_file() else pd.DataFrame()
    if metrics.empty:
        return {"epoch": 0, "test_acc": math.nan, "test_loss": math.nan}
    curve = epoch_curve(metrics)  # the same per-epoch means as `analyze`
    return {"epoch": int(curve.index[-1]), "test_acc": curve.acc_mean.iloc[-1], "test_loss": curve.loss_mean.iloc[-1]}


class IndexCallback(tune.Callback):
    """Appends sweep.csv's row as each trial ends (on the driver, so a killed sweep keeps what finished)."""

    def __init__(self, sweep: Sweep, sweep_dir: Path, first_number: int, mirror: FolderMirror | None = None):
        self.sweep, self.sweep_dir, self.next_number, self.mirror = sweep, sweep_dir, first_number, mirror
        self.numbers: dict[str, int] = {}
        self.running: dict[str, Any] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        config = trial.config
        self.numbers[trial.trial_id] = config["point"] if "point" in config else self._take_number()
        self.running[trial.trial_id] = trial

    def _take_number(self) -> int:
        self.next_number += 1
        return self.next_number - 1

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        status = STATUS.get(result["exit_code"], "failed") if "exit_code" in result else "stopped early"
        self._write(trial, result, status)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._write(trial, trial.last_result or {}, "failed")

    def interrupted(self) -> None:
        """Index the trials an interrupt cut short, and end them: their peers are their actors' (they die with
        them), and a Ray this sweep did not start would keep them running."""
        for trial in list(self.running.values()):
            self._write(trial, trial.last_result or {}, "interrupted")
            if trial.temporary_state.ray_actor is not None:
                ray.kill(trial.temporary_state.ray_actor, no_restart=True)

    def _write(self, trial, result: dict[str, Any], status: str) -> None:
        self.running.pop(trial.trial_id, None)
        number = self.numbers.get(trial.trial_id, 0)
        overrides, cfg = trial_point(self.sweep, trial.config)
        row = index_row(self.sweep, cfg, number, str(result.get("run_dir", "")), result.get("exit_code", ""), status)
        row[self.sweep.settings.metric] = result.get(self.sweep.settings.metric, math.nan)
        append_index_row(self.sweep_dir / INDEX_FILE, row)
        if self.mirror is not None:
            self.mirror.sync(force=True)
        logger.info("sweep point %d (%s): %s", number, ", ".join(overrides), status)


def planned(sweep: Sweep) -> int:
    return sweep.settings.samples if sweep.adaptive else len(sweep.points)


def cpus_needed(sweep: Sweep) -> float:
    """A local Ray holds `max_concurrent` of the largest trials at once."""
    largest = largest_point(sweep)
    per_trial = (largest.peers + largest.joins) * largest.resources.num_cpus + TRIAL_CPU
    return math.ceil(per_trial * min(sweep.settings.max_concurrent, planned(sweep)))


def make_sweep_dir(sweep: Sweep, out_dir: Path) -> Path:
    """`out_dir` as run_experiment takes it: `~` expanded (a quoted --out '~/...' reaches us unexpanded), absolute."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    sweep_dir = out_dir.expanduser().resolve() / f"{sweep.name}-{stamp}-{secrets.token_hex(2)}"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(sweep.spec, sort_keys=False))
    return sweep_dir


def resumable_sweep_dir(sweep: Sweep, out_dir: Path) -> Path:
    """The newest folder under `out_dir` of this same sweep (its sweep.yaml is this one's spec), for `--resume`; on
    a storage URI, the newest one there (its result files copied into `out_dir`, the staging folder) when this
    machine has no copy of it."""
    local = Path(out_dir).expanduser().resolve()
    storage = sweep.points[0].config.storage
    candidates = sorted(local.glob(f"{sweep.name}-*/sweep.yaml"), reverse=True)
    for path in candidates:
        if yaml.safe_load(path.read_text()) == sweep.spec:
            return path.parent
    if is_remote(storage) and (found := remote_sweep(sweep, storage, local)) is not None:
        return found
    where = f"{out_dir} or {storage}" if is_remote(storage) else str(out_dir)
    raise ConfigError(f"--resume: no earlier run of sweep {sweep.name!r} with these settings under {where} "
                      f"({len(candidates)} local folders of that name differ in their sweep.yaml)")  # fmt: skip


def remote_sweep(sweep: Sweep, storage: str, staging: Path) -> Path | None:
    """The newest sweep folder of this sweep in `storage`, its result files (never checkpoints) fetched into
    `staging`; None when there is none."""
    from pyarrow import fs as pafs

    filesys, path = filesystem(storage)
    listed = filesys.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = sorted((info.base_name for info in listed if info.base_name.startswith(f"{sweep.name}-")), reverse=True)
    for name in names:
        spec = staging / name / "sweep.yaml"
        if download_file(join(storage, name, "sweep.yaml"), spec) and yaml.safe_load(spec.read_text()) == sweep.spec:
            fetch_results(join(storage, name), staging / name)
            logger.info("--resume: sweep %s taken from %s", name, storage)
            return staging / name
    return None


def read_index(sweep_dir: Path) -> list[dict[str, Any]]:
    path = sweep_dir / INDEX_FILE
    return pd.read_csv(path).to_dict("records") if path.is_file() else []


def next_point_number(index: list[dict[str, Any]]) -> int:
    """The number of a new (searched) point: past every point the index holds, finished, failed or interrupted alike
    (counting only the finished ones would give a new point the number of an old one)."""
    return max((int(row["point"]) for row in index), default=0) + 1


def finished_points(sweep_dir: Path) -> dict[int, dict[str, Any]]:
    """The index rows of the points that finished (done, or stopped early by the scheduler), by point number: a
    resume skips them."""
    return {int(row["point"]): row for row in read_index(sweep_dir) if row["status"] in FINISHED}


def set_aside_unfinished_runs(sweep_dir: Path, done: dict[int, dict[str, Any]]) -> None:
    """Run folders of points that did not finish go to interrupted/, so that `analyze SWEEP_DIR` compares each point
    once (its rerun), and nothing a user might want to look at is deleted."""
    kept = {str(row["run_dir"]) for row in done.values()}
    for run_dir in [p.parent for p in sweep_dir.glob("*/config.yaml")]:
        if run_dir.name not in kept:
            (sweep_dir / "interrupted").mkdir(exist_ok=True)
            run_dir.rename(sweep_dir / "interrupted" / run_dir.name)


def largest_point(sweep: Sweep) -> ExperimentConfig:
    return max((p.config for p in sweep.points), key=lambda cfg: cfg.peers * cfg.resources.num_cpus)


def index_row(
    sweep: Sweep, cfg: ExperimentConfig, number: int, run_name: str, exit_code: int | str, status: str
) -> dict[str, Any]:
    resolved = cfg.model_dump(mode="json")
    swept = {key: dotted_get(resolved, key) for key in sweep.keys}
    return {"point": number, "run_dir": run_name, **swept, "exit_code": exit_code, "status": status}


def append_index_row(path: Path, row: dict[str, Any]) -> None:
    """Append and sync, so a sweep that is killed keeps the index of the points it finished."""
    new = not path.exists()
    with path.open("a", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
        file.flush()
        os.fsync(file.fileno())
