"""`gossip-launch run CONFIG [--peers N] [--set key.sub=value ...] [--out DIR]` (also `python -m launcher`)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from workers.config import ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gossip-launch", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one N-peer experiment")
    run.add_argument("config", type=Path, help="experiment YAML, e.g. configs/experiments/quickstart.yaml")
    run.add_argument("--peers", type=int, help="number of peers (same as --set peers=N)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set gossip.alpha=0.5 (repeatable)")  # fmt: skip
    run.add_argument("--out", type=Path, default=Path("results"), help="results folder (default: results/)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    overrides = args.overrides + ([f"peers={args.peers}"] if args.peers is not None else [])
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"gossip-launch: {err}", file=sys.stderr)
        return 2
    from launcher.driver import run_experiment  # imports Ray and torch: only once the config is known good

    return run_experiment(cfg, args.out).exit_code


if __name__ == "__main__":
    sys.exit(main())
