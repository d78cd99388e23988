"""Run a sweep: every point of a config's `sweep:` grid, one after another on one Ray, each in its own run folder.

results/<sweep-name>-<timestamp>/
    sweep.yaml          the sweep as run (the file after --set): `gossip-launch run` it again to repeat it
    sweep.csv           one row per finished point: run folder, swept values, exit code, status (appended)
    <run-id>/...        one run folder per point, as `run_experiment` writes it
    comparison.csv      written by `gossip-launch analyze SWEEP_DIR` at the end (see launcher/cli.py)
"""

from __future__ import annotations

import csv
import logging
import os
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import ray
import yaml

from launcher.connect import connect_ray
from launcher.driver import run_experiment
from launcher.signals import install_interrupt_handlers, signals_ignored
from workers.config import ExperimentConfig, Sweep, SweepPoint

logger = logging.getLogger("launcher.sweep")

INDEX_FILE = "sweep.csv"
STATUS = {0: "done", 1: "failed", 130: "interrupted"}  # run_experiment's exit codes


@dataclass
class SweepResult:
    sweep_dir: Path
    exit_code: int  # 0 every point finished, 1 a point failed, 130 interrupted (later points not run)


def run_sweep(sweep: Sweep, out_dir: Path, address: str | None = None) -> SweepResult:
    """Run the points in grid order; a failed point does not stop the sweep, Ctrl-C does (after a clean shutdown)."""
    sweep_dir = make_sweep_dir(sweep, Path(out_dir))
    logger.info("sweep %s: %d points over %s -> %s", sweep.name, len(sweep.points), ", ".join(sweep.keys), sweep_dir)
    started_ray = connect_ray(largest_point(sweep), address)  # one Ray for all points, sized for the largest one
    install_interrupt_handlers()  # ray.init() put its own sys.exit(15) there
    try:
        exit_code = run_points(sweep, sweep_dir)
    finally:
        if started_ray:
            with signals_ignored():
                ray.shutdown()
    return SweepResult(sweep_dir, exit_code)


def run_points(sweep: Sweep, sweep_dir: Path) -> int:
    """Run the points and index each as it finishes, until the end or an interrupt; the sweep's exit code."""
    exit_codes: list[int] = []
    total = len(sweep.points)
    try:
        for number, point in enumerate(sweep.points, 1):
            logger.info("sweep point %d/%d: %s", number, total, ", ".join(point.overrides))
            run_name, exit_code = run_point(point, sweep_dir)
            exit_codes.append(exit_code)
            append_index_row(sweep_dir / INDEX_FILE, index_row(sweep, point, number, run_name, exit_code))
            if exit_code == 130:
                raise KeyboardInterrupt  # the run already shut down cleanly: start no further point
    except KeyboardInterrupt:  # also between two points: the finished ones are already in the index
        logger.warning("sweep interrupted: %d of %d points not run", total - len(exit_codes), total)
        return 130
    return 1 if any(exit_codes) else 0


def make_sweep_dir(sweep: Sweep, out_dir: Path) -> Path:
    """`out_dir` as run_experiment takes it: `~` expanded (a quoted --out '~/...' reaches us unexpanded), absolute."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    sweep_dir = out_dir.expanduser().resolve() / f"{sweep.name}-{stamp}-{secrets.token_hex(2)}"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(sweep.spec, sort_keys=False))
    return sweep_dir


def largest_point(sweep: Sweep) -> ExperimentConfig:
    return max((p.config for p in sweep.points), key=lambda cfg: cfg.peers * cfg.resources.num_cpus)


def run_point(point: SweepPoint, sweep_dir: Path) -> tuple[str, int]:
    """(run folder name, exit code) of one point; run_experiment turns Ctrl-C during the run into exit code 130."""
    before = set(sweep_dir.iterdir())
    try:
        result = run_experiment(point.config, sweep_dir)
    except KeyboardInterrupt:  # while the run set itself up or summarized: outside its own handler
        new = sorted(p.name for p in set(sweep_dir.iterdir()) - before if p.is_dir())
        return (new[0] if new else ""), 130
    return result.run_dir.name, result.exit_code


def index_row(sweep: Sweep, point: SweepPoint, number: int, run_name: str, exit_code: int) -> dict[str, Any]:
    resolved = point.config.model_dump(mode="json")
    swept = {key: lookup(resolved, key) for key in sweep.keys}
    status = STATUS.get(exit_code, f"exit {exit_code}")
    return {"point": number, "run_dir": run_name, **swept, "exit_code": exit_code, "status": status}


def lookup(tree: dict[str, Any], dotted_key: str) -> Any:
    """The value at `a.b.c` in a nested dict (a swept key's value as the config resolved it)."""
    node: Any = tree
    for part in dotted_key.split("."):
        node = node[part]
    return node


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
