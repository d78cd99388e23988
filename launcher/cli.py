"""`gossip-launch run CONFIG [--peers N] [--resume-from DIR|URI] [--set key.sub=value ...] [--storage DIR|URI]
[--address ADDR]` (also `python -m launcher`; `--out` is `--storage`);
`gossip-launch analyze RUN_DIR|URI [...] [--target-acc X] [--plot] [--out DIR|URI]`;
`gossip-launch bench [--quick] [--out DIR]`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from launcher.driver.connect import cluster_to_join
from launcher.sweep.grammar import Sweep, load_experiment
from workers.core.config import ExperimentConfig
from workers.core.errors import ConfigError
from workers.core.network import check_ports_free, listen_host
from workers.core.signals import install_interrupt_handlers
from workers.core.storage import (
    FolderMirror,
    check_storage,
    is_remote,
    local_copies,
    remote_of,
    staging_dir,
    upload_files,
)
from workers.peer.checkpoint import check_resume
from workers.peer.datasets import prepare_data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gossip-launch", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one N-peer experiment")
    run.add_argument("config", type=Path, help="experiment YAML, e.g. configs/experiments/quickstart.yaml")
    run.add_argument("--peers", type=int, help="number of peers (same as --set peers=N)")
    run.add_argument("--resume-from", type=location, metavar="DIR",
                     help="continue from DIR's peer-<i>_final.pt files, DIR a folder or a storage URI such as "
                     "s3://bucket/runs/RUN_ID (same as --set resume_from=DIR)")  # fmt: skip
    run.add_argument(
        "--resume",
        action="store_true",
        help="a sweep: continue its newest folder under --out, running only the points not done yet",
    )
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set gossip.alpha=0.5 (repeatable)")  # fmt: skip
    run.add_argument("--storage", "--out", dest="out", type=location, metavar="URI",
                     help="where run folders go: a local folder or a URI such as s3://bucket/prefix, endpoint and "
                     "credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... (same as --set storage=URI; --out is "
                     "the same option); default: the config's `storage`, results/")  # fmt: skip
    run.add_argument("--address", help="Ray cluster to run on, e.g. 10.0.0.1:6379, auto, or local (a new private "
                     "one); default: RAY_ADDRESS, else a cluster started with `ray start` on this machine, else a new "
                     "local one")  # fmt: skip
    bench = commands.add_parser("bench", help="measure gossip's cost on this machine: throughput, one round, start-up")
    bench.add_argument("--quick", action="store_true", help="a smaller bench: under about 5 minutes on 2 cores")
    bench.add_argument("--out", type=Path, default=Path("results"), help="where its folder goes (default: results/)")
    bench.add_argument("--repeats", type=int, help="C: interleaved repeats of each method (default 5, 2 with --quick)")
    bench.add_argument("--only", nargs="+", choices=["cost", "round", "startup", "straggler", "scale"],
                       help="only these parts: cost (C and G1), round (G2), startup (G7), straggler (G5), scale (G8: "
                            "8 to 24 peers)")  # fmt: skip
    analyze = commands.add_parser("analyze", help="compare finished runs: a table, comparison.csv and plots")
    analyze.add_argument(
        "run_dirs",
        type=location,
        nargs="+",
        metavar="RUN_DIR",
        help="run folders or sweep folders, local or storage URIs (s3://bucket/runs/RUN_ID)",
    )
    analyze.add_argument("--target-acc", type=float, help="report wall time and samples to this mean test accuracy")
    analyze.add_argument("--plot", action="store_true", help="also write PNG plots next to comparison.csv")
    analyze.add_argument(
        "--out",
        type=location,
        help="where to write, a folder or a storage URI (default: the folder, when only one is given)",
    )
    return parser


def location(text: str) -> Path | str:
    """A folder as a Path, a URI (s3://bucket/prefix) as it is: a Path would fold its `//`."""
    return text if "://" in text else Path(text)


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
    if args.out is not None:
        overrides.append(f"storage={json.dumps(str(args.out))}")
    try:
        cfg = load_experiment(args.config, overrides)  # a sweep: every point validated here, before Ray starts
        for point_cfg in [p.config for p in cfg.points] if isinstance(cfg, Sweep) else [cfg]:
            prepare_data(point_cfg.data)  # downloads here, once, not inside the peers' start-up time limit
            check_resume(point_cfg)
            check_local_ports(point_cfg, args.address)
            check_emulation(point_cfg, args.address)
            check_cpu_cap(point_cfg, args.address)
        check_address(args.address or os.environ.get("RAY_ADDRESS"))
        args.out = storage_staging(cfg)  # from here on: the local folder the run folders are written into
        resume_dir = resumable_sweep(cfg, args)
    except ConfigError as err:
        print(f"gossip-launch: {err}", file=sys.stderr)
        return 2
    from launcher.driver.controller import run_experiment  # imports Ray and torch: only once the config is known good

    install_interrupt_handlers()  # `kill`, `timeout`, a stopped Ray job: shut down as on Ctrl-C
    if isinstance(cfg, Sweep):
        return _run_sweep(cfg, args.out, args.address, resume_dir)
    return run_experiment(cfg, args.out, args.address).exit_code


def _bench(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from launcher.bench import run_bench

    install_interrupt_handlers()
    print(f"wrote {run_bench(args.out, args.quick, args.repeats, args.only)}")
    return 0


def check_address(address: str | None) -> None:
    """Ray Client (ray://) is refused: the driver would not be on any node of the cluster, so the final models it
    fetches "to this machine" and the processes it reaps "here" would be the wrong machine's."""
    if address and address.startswith("ray://"):
        raise ConfigError(f"address {address}: Ray Client (ray://) is not supported; run the driver on the cluster "
                          "with `ray job submit` or `ray submit` (README: Run on a Ray cluster)")  # fmt: skip


def check_local_ports(cfg: ExperimentConfig, address: str | None) -> None:
    """A fixed `network.port` range taken on this machine is an error before Ray starts when the run gets a private
    local Ray, which puts every peer here (launcher/driver/connect.py: cluster_to_join). On a cluster each peer checks
    its own port (`dht_maddrs`)."""
    if not cfg.network.port or cluster_to_join(address) is not None:
        return
    rendezvous = cfg.gossip.method == "allreduce"
    check_ports_free(cfg.network, listen_host(cfg.network), cfg.peers, rendezvous, joins=cfg.joins)


def check_emulation(cfg: ExperimentConfig, address: str | None) -> None:
    """`emulation:` needs every peer on this machine (a private local Ray, as for check_local_ports) and a kernel
    that can shape (and, for rtt_ms, delay): said before Ray starts, never run unshaped instead."""
    if not cfg.emulation.enabled:
        return
    if (joined := cluster_to_join(address)) is not None:
        raise ConfigError(f"emulation.rate_mbit={cfg.emulation.rate_mbit:g}: emulated links need every peer on this "
                          f"machine, but the run would join the Ray cluster at {joined}: run with --address "
                          "local")  # fmt: skip
    from launcher.emulation.links import check_support  # tries a throwaway namespace: only for emulated runs

    check_support(cfg.emulation)


def check_cpu_cap(cfg: ExperimentConfig, address: str | None) -> None:
    """`resources.cap_cpu` needs a writable cgroup CPU controller where the peers run: checked here for peers that run
    on this machine (a cluster's nodes are checked by each peer as it starts)."""
    from workers.core.cpucap import cpu_hierarchy

    if cfg.resources.cap_cpu and cluster_to_join(address) is None and cpu_hierarchy() is None:
        raise ConfigError("resources.cap_cpu=true: no writable cgroup cpu controller on this machine (needs root and "
                          "a cgroup v1 or v2 'cpu' hierarchy): set resources.cap_cpu=false")  # fmt: skip


def storage_staging(cfg: ExperimentConfig | Sweep) -> Path:
    """ConfigError naming `storage` unless a storage URI can be reached; the local folder that stands for it (the
    folder itself, or the staging folder of the URI: workers/core/storage.py)."""
    storage = cfg.points[0].config.storage if isinstance(cfg, Sweep) else cfg.storage
    check_storage(storage)
    return staging_dir(storage)


def resumable_sweep(cfg: ExperimentConfig | Sweep, args: argparse.Namespace) -> Path | None:
    """`--resume`: the sweep folder to continue (checked before Ray starts); None without it."""
    if not args.resume:
        return None
    if not isinstance(cfg, Sweep):
        raise ConfigError("--resume continues a sweep; a single run continues with --resume-from RUN_DIR")
    from launcher.sweep.runner import resumable_sweep_dir

    return resumable_sweep_dir(cfg, args.out)


def _run_sweep(sweep: Sweep, out: Path, address: str | None, resume_dir: Path | None = None) -> int:
    """The points on Ray Tune (launcher/sweep/runner.py), then the same comparison as `gossip-launch analyze
    SWEEP_DIR`."""
    from launcher.sweep.runner import run_sweep

    result = run_sweep(sweep, out, address, resume_dir)
    target = sweep.settings.target_acc
    if result.exit_code != 130:  # interrupted: its `--resume` compares the points when they are all done
        _analyze(build_parser().parse_args(["analyze", str(result.sweep_dir), "--plot",
                                            *(["--target-acc", str(target)] if target else [])]))  # fmt: skip
    storage = sweep.points[0].config.storage  # the sweep's own files (index, comparison); each run uploads its own
    if not FolderMirror(result.sweep_dir, remote_of(storage, result.sweep_dir), top_level=True).finish():
        return result.exit_code or 1
    return result.exit_code


def _analyze(args: argparse.Namespace) -> int:
    from launcher.results.analyze import analyze, format_comparison  # pandas: only when asked for

    out = args.out or (args.run_dirs[0] if len(args.run_dirs) == 1 else None)
    with tempfile.TemporaryDirectory(prefix="gossip-analyze-") as temp:  # storage URIs: their result files, here
        try:
            paths, origins = local_copies(args.run_dirs, Path(temp))
            local_out = Path(temp, "out") if is_remote(out) else Path(out) if out else None
            table, written = analyze(paths, args.target_acc, local_out, args.plot, origins)
            written = upload_files(written, local_out, out) if is_remote(out) else written
        except OSError as err:  # MissingMetricsError, a URI without results, storage that cannot be reached
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
