"""Swarm-size scan for #22's 'tens of peers' item: the quickstart (digits, one round per epoch, 4 epochs) with
group_size 8 at N peers, gossip against none; the machine's busy CPU in the training window, rounds, consensus,
the time a round took. Usage: python scan.py OUT N[:mm] ..."""
import json
import logging
import sys
import time
from pathlib import Path

import ray

from launcher.bench import QUICKSTART, TrainingWindow, cpu_by_kind
from launcher.driver.controller import run_experiment
from launcher.results.summary import read_events, read_metrics, round_totals
from workers.core.config import load_config


def one(out: Path, peers: int, method: str, mm: float, epochs: int = 4) -> dict:
    overrides = [f"peers={peers}", f"optim.epochs={epochs}", "gossip.group_size=8", f"gossip.matchmaking_time={mm}",
                 f"gossip.method={method}", "resources.num_cpus=0.25"]
    window = TrainingWindow(epochs)
    launcher = logging.getLogger("launcher")
    launcher.setLevel(logging.INFO)
    launcher.addHandler(window)
    t0 = time.monotonic()
    try:
        result = run_experiment(load_config(QUICKSTART, overrides), out / "runs")
    finally:
        launcher.removeHandler(window)
    metrics = read_metrics(result.run_dir)
    totals = round_totals(metrics)
    final = metrics[metrics.epoch == epochs]
    row = dict(peers=peers, method=method, mm=mm, exit=result.exit_code, total_s=time.monotonic() - t0,
               rounds_ok=int(totals.rounds_ok.sum()), rounds_failed=int(totals.rounds_failed.sum()),
               consensus=float(final.consensus_dist.iloc[0]) if len(final) else None,
               group_mean=float(metrics.averaging_group_size.mean()),
               avg_s_median=float(metrics.averaging_seconds.median()),
               avg_s_max=float(metrics.averaging_seconds.max()), run=result.run_dir.name)
    if window.start and window.end:
        row.update(cpu_s=window.end[0] - window.start[0], wall_s=window.end[1] - window.start[1],
                   **{f"cpu_{k}": v for k, v in cpu_by_kind(*window.processes).items()})
    print(json.dumps(row), flush=True)
    with open(out / "scan.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    ray.init(address="local", num_cpus=16, include_dashboard=False, logging_level="WARNING")
    try:
        for spec in sys.argv[2:]:
            n, _, rest = spec.partition(":")
            method, _, mm = rest.partition(":")
            one(out, int(n), method or "gossip", float(mm or 2.0))
    finally:
        ray.shutdown()
