"""`gossip-launch run CONFIG [--peers N] [--resume-from DIR] [--set key.sub=value ...] [--out DIR] [--address ADDR]`
(also `python -m launcher`);
`gossip-launch analyze RUN_DIR [RUN_DIR ...] [--target-acc X] [--plot] [--out DIR]`;
`gossip-launch bench [--quick] [--out DIR]`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from launcher.signals import install_interrupt_handlers
from workers.checkpoint import check_resume
from workers.config import ConfigError, ExperimentConfig, Sweep, load_experiment
from workers.datacheck import prepare_data
from workers.network import check_ports_free, listen_host


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gossip-launch", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one N-peer experiment")
    run.add_argument("config", type=Path, help="experiment YAML, e.g. configs/experiments/quickstart.yaml")
    run.add_argument("--peers", type=int, help="number of peers (same as --set peers=N)")
    run.add_argument("--resume-from", type=Path, metavar="DIR",
                     help="continue from DIR's peer-<i>_final.pt files (same as --set resume_from=DIR)")  # fmt: skip
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set gossip.alpha=0.5 (repeatable)")  # fmt: skip
    run.add_argument("--out", type=Path, default=Path("results"), help="results folder (default: results/)")
    run.add_argument("--address", help="Ray cluster to run on, e.g. 10.0.0.1:6379, auto, or local (a new private "
                     "one); default: RAY_ADDRESS, else a cluster started with `ray start` on this machine, else a new "
                     "local one")  # fmt: skip
    bench = commands.add_parser("bench", help="measure gossip's cost on this machine: throughput, one round, start-up")
    bench.add_argument("--quick", action="store_true", help="a smaller bench: under about 5 minutes on 2 cores")
    bench.add_argument("--out", type=Path, default=Path("results"), help="where its folder goes (default: results/)")
    analyze = commands.add_parser("analyze", help="compare finished runs: a table, comparison.csv and plots")
    analyze.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="run folders or sweep folders")
    analyze.add_argument("--target-acc", type=float, help="report wall time and samples to this mean test accuracy")
    analyze.add_argument("--plot", action="store_true", help="also write PNG plots next to comparison.csv")
    analyze.add_argument("--out", type=Path, help="where to write (default: the folder, when only one is given)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "analyze":
        return _analyze(args)
    if args.command == "bench":
        return _bench(args)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    overrides = args.overrides + ([f"peers={args.peers}"] if args.peers is not None else [])
    if args.resume_from is not None:  # quoted: a folder named e.g. "2024" or "a: b" stays a path
        overrides.append(f"resume_from={json.dumps(str(args.resume_from))}")
    try:
        cfg = load_experiment(args.config, overrides)  # a sweep: every point validated here, before Ray starts
        for point_cfg in [p.config for p in cfg.points] if isinstance(cfg, Sweep) else [cfg]:
            prepare_data(point_cfg.data)  # downloads here, once, not inside the peers' start-up time limit
            check_resume(point_cfg)
            check_local_ports(point_cfg, args.address)
        check_address(args.address or os.environ.get("RAY_ADDRESS"))
    except ConfigError as err:
        print(f"gossip-launch: {err}", file=sys.stderr)
        return 2
    from launcher.driver import run_experiment  # imports Ray and torch: only once the config is known good

    install_interrupt_handlers()  # `kill`, `timeout`, a stopped Ray job: shut down as on Ctrl-C
    if isinstance(cfg, Sweep):
        return _run_sweep(cfg, args.out, args.address)
    return run_experiment(cfg, args.out, args.address).exit_code


def _bench(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from launcher.bench import run_bench

    install_interrupt_handlers()
    print(f"wrote {run_bench(args.out, args.quick)}")
    return 0


def check_address(address: str | None) -> None:
    """Ray Client (ray://) is refused: the driver would not be on any node of the cluster, so the final models it
    fetches "to this machine" and the processes it reaps "here" would be the wrong machine's."""
    if address and address.startswith("ray://"):
        raise ConfigError(f"address {address}: Ray Client (ray://) is not supported; run the driver on the cluster "
                          "with `ray job submit` or `ray submit` (README: Run on a Ray cluster)")  # fmt: skip


def check_local_ports(cfg: ExperimentConfig, address: str | None) -> None:
    """A fixed `network.port` range taken on this machine is an error before Ray starts when the run gets a private
    local Ray, which puts every peer here: address "local", or none at all (no --address, no RAY_ADDRESS) and no live
    `ray start` cluster to join (see connect_ray). On a cluster each peer checks its own port (`dht_maddrs`)."""
    given = address or os.environ.get("RAY_ADDRESS")
    if not cfg.network.port or given not in (None, "", "local"):
        return
    if not given and _started_cluster_is_up():
        return
    rendezvous = cfg.gossip.method == "allreduce"
    check_ports_free(cfg.network, listen_host(cfg.network), cfg.peers, rendezvous, joins=cfg.joins)


def _started_cluster_is_up() -> bool:
    """Whether the cluster the last `ray start` on this machine joined is still up (the driver would join it)."""
    from ray._private.services import find_gcs_addresses  # Ray's own record, read only: no Ray process is started
    from ray._private.utils import read_ray_address

    started = read_ray_address()
    return bool(started) and started in find_gcs_addresses()


def _run_sweep(sweep: Sweep, out: Path, address: str | None) -> int:
    """The points one after another, then the same comparison as `gossip-launch analyze SWEEP_DIR`."""
    from launcher.sweep import run_sweep

    result = run_sweep(sweep, out, address)
    _analyze(build_parser().parse_args(["analyze", str(result.sweep_dir)]))
    return result.exit_code


def _analyze(args: argparse.Namespace) -> int:
    from launcher.analyze import MissingMetricsError, analyze, format_comparison  # pandas: only when asked for

    out = args.out or (args.run_dirs[0] if len(args.run_dirs) == 1 else None)
    try:
        table, written = analyze(args.run_dirs, args.target_acc, out, args.plot)
    except MissingMetricsError as err:
        print(f"gossip-launch analyze: {err}", file=sys.stderr)
        return 2
    print(format_comparison(table, width=shutil.get_terminal_size().columns))
    for path in written:
        print(f"wrote {path}")
    if out is None:
        print("gossip-launch analyze: several folders given; add --out DIR to write the table", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
