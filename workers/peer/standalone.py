"""One peer without Ray, started by hand from a terminal the way the original scripts were:

    python -m workers --host_maddr /ip4/127.0.0.1/tcp/0                    # prints VISIBLE_MADDRS: [...]
    python -m workers --initial_peer /ip4/127.0.0.1/tcp/PORT/p2p/ID --host_maddr /ip4/127.0.0.1/tcp/0
    python -m workers --initial_peer /ip4/127.0.0.1/tcp/PORT/p2p/ID --host_maddr /ip4/127.0.0.1/tcp/0

That is an open swarm: each peer trains at once on the whole training set in an order of its own and averages with
whoever is there; a peer that joins with --initial_peer first takes the swarm's state (parameters, optimizer,
position in the run) from a live peer. With --peers N and --peer I instead, peer I trains on shard I of N and waits
(up to --join_timeout) for all N to join before training, as the Ray launcher's peers do.

On several machines, listen on all interfaces (a fixed port, if a firewall wants one): the peer announces, and
prints, this machine's IP, or the address given with --announce_maddr (e.g. behind a NAT with the same port forwarded):

    python -m workers --host_maddr /ip4/0.0.0.0/tcp/31337 --peers 3 --peer 0   # VISIBLE_MADDRS: ['/ip4/10.0.0.5/...']

The original scripts' flags are kept and mapped onto the one config tree (`workers.core.config`), so a standalone peer
trains exactly what the Ray launcher would with the same config. Each peer writes its own metrics.csv; there is no
driver to gather the swarm's parameter sketches, so the consensus_dist column stays empty.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path

from workers.core.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    dump_config,
    load_config,
    parse_config,
)
from workers.core.csvfile import MetricsWriteError
from workers.core.reporting import RowWriter, epoch_line
from workers.core.signals import (
    install_interrupt_handlers,
    interrupts_deferred,
    raise_if_interrupted,
    signals_ignored,
)
from workers.peer.datasets import check_data

logger = logging.getLogger("workers.peer.standalone")

POLL_INTERVAL_S = 0.5
EXIT_INTERRUPTED = 130
_HOST_MADDR = re.compile(r"/ip4/(?P<host>[0-9.]+)/tcp/(?P<port>\d+)/?")

# original flag -> config key; values are numbers (argparse checks the type, the config checks the range)
_NUMERIC_FLAGS = {
    "batch": "data.batch_size",
    "lr": "optim.lr",
    "epochs": "optim.epochs",
    "gossip_group_size": "gossip.group_size",
    "gossip_min_group_size": "gossip.min_group_size",
    "gossip_alpha": "gossip.alpha",
    "peers": "peers",
}
# flag -> config key; values are text, quoted so that YAML keeps them strings ("no", "1e3", "a: b")
_TEXT_FLAGS = {"dataset": "data.dataset", "data_root": "data.root", "resume_from": "resume_from",
               "swarm_key": "network.swarm_key_file"}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m workers",
        description="Run one gossip-training peer in the foreground, without Ray. The first peer (no "
        "--initial_peer) prints one line `VISIBLE_MADDRS: [...]` to stdout; start the others with "
        "--initial_peer set to one of those addresses. Each peer writes its own metrics.csv; consensus_dist "
        "stays empty there, since only the Ray launcher sees every peer's parameters.",
    )
    add = parser.add_argument
    add("--config", type=Path, help="experiment YAML (default: the built-in defaults: digits, small_cnn)")
    add("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set gossip.matchmaking_time=2 (repeatable; applied last)")  # fmt: skip
    add("--host_maddr", help="multiaddr to listen on, e.g. /ip4/0.0.0.0/tcp/0: all interfaces, any free port "
        "(sets network.host and network.port; default: 127.0.0.1, any free port)")  # fmt: skip
    add("--announce_maddr", help="multiaddr the other peers dial, e.g. /ip4/203.0.113.7/tcp/0 (sets "
        "network.announce_host; its port must be the one listened on, or 0 for that; default: this machine's "
        "IP when listening on 0.0.0.0, else the listen address)")  # fmt: skip
    add("--initial_peer", dest="initial_peers", action="append", default=[], metavar="MADDR",
        help="multiaddr of a running peer to join (repeatable); none: this peer starts the swarm")  # fmt: skip
    add("--peer", type=int, help="this peer's index in [0, peers): which data shard it trains on (with --peers; "
        "without either, the peer trains on the whole training set in an order of its own)")  # fmt: skip
    add("--peers", type=int, help="number of peers the training set is split among (config: peers); without "
        "--peers and --peer the swarm is open: peers come and go, none waits for another")  # fmt: skip
    add("--run_id", help="the swarm's id, its DHT key prefix: every peer of one swarm uses the same (default: "
        "standalone-NAME); to join a run of `gossip-launch run`, its run id")  # fmt: skip
    add("--batch", type=int, help="data.batch_size")
    add("--lr", type=float, help="optim.lr")
    add("--epochs", type=int, help="optim.epochs")
    add("--gossip_group_size", type=int, help="gossip.group_size")
    add("--gossip_min_group_size", type=int, help="gossip.min_group_size")
    add("--gossip_alpha", type=float, help="gossip.alpha")
    add("--dataset", help="data.dataset")
    add("--data_root", help="data.root")
    add("--resume_from", help="resume_from: a folder with this peer's peer-<i>_final.pt (e.g. its previous --out); "
        "its rows are appended to metrics.csv")  # fmt: skip
    add(
        "--swarm_key",
        metavar="FILE",
        help="network.swarm_key_file: the swarm's secret key (64 hex digits); "
        "only peers holding it take part. Every peer of the swarm passes the same file (default: an open swarm)",
    )
    add("--join_timeout", type=float, default=300.0, metavar="SECONDS",
        help="wait up to this long for all --peers peers to join before training, as the launcher does; "
        "0: start at once, like the original scripts (default: 300)")  # fmt: skip
    add("--out", type=Path, help="folder for metrics.csv, config.yaml and the checkpoints (default: "
        "results/standalone-NAME/peer-I); with checkpoint_dir set, the checkpoints go to "
        "CHECKPOINT_DIR/standalone-NAME")  # fmt: skip
    return parser


def parse_host_maddr(maddr: str, flag: str = "--host_maddr") -> tuple[str, int]:
    """`/ip4/IP/tcp/PORT` -> (IP, PORT): the address a peer's DHT listens on (or announces, for `flag`)."""
    match = _HOST_MADDR.fullmatch(maddr.strip())
    if match is None:
        raise ConfigError(f"{flag}={maddr!r}: expected /ip4/<address>/tcp/<port>, e.g. /ip4/0.0.0.0/tcp/0")
    try:
        ipaddress.IPv4Address(match["host"])
    except ValueError:
        raise ConfigError(f"{flag}={maddr!r}: {match['host']!r} is not an IPv4 address") from None
    if int(match["port"]) > 65535:
        raise ConfigError(f"{flag}={maddr!r}: port {match['port']} is past 65535")
    return match["host"], int(match["port"])


def flags_to_overrides(args: argparse.Namespace) -> list[str]:
    """The original scripts' flags as `key.sub=value` overrides, followed by the explicit --set ones."""
    overrides = [
        f"{key}={getattr(args, flag)}" for flag, key in _NUMERIC_FLAGS.items() if getattr(args, flag) is not None
    ]
    overrides += [f"{key}={json.dumps(getattr(args, flag))}" for flag, key in _TEXT_FLAGS.items()
                  if getattr(args, flag) is not None]  # fmt: skip
    if args.host_maddr is not None:
        host, port = parse_host_maddr(args.host_maddr)
        overrides += [f"network.host={host}", f"network.port={port}"]
    if args.announce_maddr is not None:
        host, _ = parse_host_maddr(args.announce_maddr, "--announce_maddr")
        overrides.append(f"network.announce_host={host}")
    return overrides + list(args.overrides)


def standalone_config(args: argparse.Namespace) -> ExperimentConfig:
    """The validated config for this peer; ConfigError names the field (or flag) and the bad value."""
    overrides = flags_to_overrides(args)
    cfg = load_config(args.config, overrides) if args.config else parse_config(apply_overrides({}, overrides))
    if not 0 <= peer_index(args) < cfg.peers:
        raise ConfigError(f"--peer={args.peer}: must be in [0, peers={cfg.peers})")
    if args.announce_maddr is not None:
        check_announce_maddr(args.announce_maddr, cfg.network.port)
    if cfg.gossip.method == "allreduce":
        raise ConfigError("gossip.method='allreduce': its rendezvous needs the Ray launcher (`gossip-launch run`)")
    check_data(cfg.data)
    check_own_checkpoint(cfg, peer_index(args))
    return cfg


def open_swarm(args: argparse.Namespace) -> bool:
    """The original scripts' way: no --peers and no --peer, so no shard and nobody to wait for."""
    return args.peers is None and args.peer is None


def peer_index(args: argparse.Namespace) -> int:
    return args.peer or 0


def check_announce_maddr(maddr: str, listen_port: int) -> None:
    """The peer announces the port it listens on: hivemind cannot announce another one (e.g. a NAT's remapping)."""
    _, port = parse_host_maddr(maddr, "--announce_maddr")  # 0.0.0.0 is refused by NetworkConfig already
    if port not in (0, listen_port):
        expected = f"tcp/{listen_port} (or tcp/0)" if listen_port else "tcp/0, since it listens on any free port"
        raise ConfigError(
            f"--announce_maddr={maddr!r}: port {port} differs from the port this peer listens on (network.port="
            f"{listen_port}, from --host_maddr or the config); announcing another port is not supported: use {expected}"
        )


def check_own_checkpoint(cfg: ExperimentConfig, peer_index: int) -> None:
    """Only this peer's checkpoint must be in `resume_from`: standalone peers may each have their own folder."""
    from workers.peer.checkpoint import check_checkpoint, check_identity, checkpoint_path

    if cfg.resume_from is None:
        return
    path = checkpoint_path(cfg.resume_from, peer_index, "final")
    if not path.is_file():
        folder = str(cfg.resume_from)
        raise ConfigError(f"resume_from={folder!r}: no checkpoint for --peer={peer_index} ({path.resolve()})")
    # loaded now, so that a damaged file or another swarm's is named before the peer starts
    check_identity(check_checkpoint(path).get("identity"), cfg, path)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = standalone_config(args)
    except ConfigError as err:
        sys.stderr.write(f"{parser.prog}: {err}\n")
        return 2
    index, whole_set = peer_index(args), open_swarm(args)
    name = f"peer-{index}" if not whole_set else f"peer-{os.getpid()}"  # open swarm: any number, all unnamed
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(name)s: %(message)s",
                        datefmt="%H:%M:%S")  # fmt: skip
    run_id = args.run_id or f"standalone-{cfg.name}"  # the DHT key prefix: every peer of one swarm uses the same
    out = args.out or Path("results") / run_id / name
    install_interrupt_handlers()  # `kill`, `timeout`: shut down as on Ctrl-C
    join_timeout = 0.0 if whole_set else args.join_timeout
    return run_peer(cfg, index, run_id, args.initial_peers, out, join_timeout, whole_set)


def run_peer(
    cfg: ExperimentConfig,
    peer_index: int,
    run_id: str,
    initial_peers: list[str],
    out: Path,
    join_timeout: float,
    whole_set: bool = False,
) -> int:
    """`whole_set`: an open swarm's peer (see the module's doc): it takes the state of a live peer when it joins
    one, and never waits for others."""
    from workers.peer.checkpoint import run_checkpoint_dir
    from workers.peer.peer import Peer, StateUnavailable  # torch and hivemind: only once the config is known good

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    peer, exit_code = None, EXIT_INTERRUPTED
    # a resumed peer goes on in the same file: its rows continue from the checkpoint's epoch
    with RowWriter(out / "metrics.csv", append=cfg.resume_from is not None) as metrics:
        try:
            # exactly the port asked for: unlike Ray peers, standalone ones on one machine each pass their own
            checkpoints = run_checkpoint_dir(cfg, run_id, out)
            peer = Peer(cfg, peer_index, run_id, checkpoint_dir=checkpoints, port_offset=False, whole_set=whole_set)
            maddrs = start_dht(peer, initial_peers)
            if not initial_peers:
                print(f"VISIBLE_MADDRS: {maddrs}", flush=True)  # the one stdout line: what the others join
            logger.info("peer %d of %d is up at %s; metrics -> %s", peer_index, cfg.peers, maddrs, metrics.path)
            if whole_set and initial_peers:
                source = peer.restore_state(peer.state_timeout())
                logger.info("state from %s: training from epoch %d", source, peer.setup.progress.epoch + 1)
            elif cfg.gossip.method != "none":  # peers that never communicate need not wait for each other
                wait_for_swarm(peer.dht, f"{run_id}/joined", peer_index, cfg.peers, join_timeout)
            peer.start_training()
            exit_code = follow(peer, metrics, cfg.optim.epochs)
        except KeyboardInterrupt:
            logger.warning("interrupted: stopping after %d rows", metrics.rows_written)
        except (JoinError, StateUnavailable) as err:
            logger.error("%s", err)
            exit_code = 1
        except ConfigError as err:  # found while building the peer, e.g. a checkpoint that does not fit
            logger.error("%s", err)
            exit_code = 2
        except MetricsWriteError as err:  # e.g. a full disk: the rows before it are in the file
            logger.error("%s; stopping this peer", err)
            exit_code = 1
        finally:
            with signals_ignored():
                if peer is not None:
                    try:
                        peer.stop()
                    finally:
                        write_last_reports(metrics, peer, cfg.optim.epochs)
    return exit_code


def write_last_reports(metrics: RowWriter, peer, epochs: int) -> None:
    """Whatever the training thread reported up to its end; on a file that takes no more rows they are lost, and
    said so (the error that stopped the peer was logged already)."""
    reports, written_before = peer.poll().reports, metrics.rows_written
    try:
        write_reports(metrics, reports, epochs)
    except MetricsWriteError as err:
        logger.error("%s: %d last rows lost", err, len(reports) - (metrics.rows_written - written_before))


class JoinError(RuntimeError):
    """This peer's DHT could not start or join the swarm."""


def start_dht(peer, initial_peers: list[str]) -> list[str]:
    """hivemind's averager sets SIGINT to SIG_IGN in the process that starts it (meaning its child): undo that
    here, or Ctrl-C would no longer stop this peer."""
    ctrl_c = signal.getsignal(signal.SIGINT)
    try:
        return peer.start_dht(initial_peers)
    except Exception as err:  # hivemind: p2pd could not listen or reach any initial peer
        raise JoinError(f"could not start the DHT (initial peers: {initial_peers or 'none'}): {err}") from err
    finally:
        signal.signal(signal.SIGINT, ctrl_c)


def wait_for_swarm(dht, key: str, peer_index: int, expected: int, timeout: float) -> int:
    """Announce this peer under `key` and wait until `expected` peers have, or `timeout` passes; returns how many
    did. Started by hand, peers come up seconds apart: without this, the first one's early rounds find no group."""
    from hivemind.utils import get_dht_time

    if timeout <= 0:
        return 0
    logger.info("waiting up to %.0f s for all %d peers (--peers) to join before training", timeout, expected)
    deadline, announced = time.monotonic() + timeout, False
    while True:
        # the entry outlives the wait, so that a peer restarted later does not wait for peers already training
        announced = announced or dht.store(key, True, get_dht_time() + timeout + 3600, subkey=peer_index)
        found = dht.get(key, latest=True)
        joined = len(found.value) if found is not None and isinstance(found.value, dict) else 0
        if joined >= expected or time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    if joined < expected:
        logger.warning("only %d of %d peers joined in %.0f s: training anyway", joined, expected, timeout)
    else:
        logger.info("all %d peers joined: training", expected)
    return joined


def write_reports(metrics: RowWriter, reports: list, epochs: int) -> None:
    """The rows of `reports`, each on disk and logged (the driver's epoch line, for one peer)."""
    for report in reports:
        metrics.write([report.row])
        logger.info(epoch_line([report.row], epochs, report.row.wall_time_s))


def follow(peer, metrics: RowWriter, epochs: int) -> int:
    """Write and log this peer's rows as its epochs finish; 0 when training completes, 1 when it fails. A signal stops
    it between two passes: the rows a poll took are written first."""
    with interrupts_deferred():
        while True:
            raise_if_interrupted()
            status = peer.poll()
            write_reports(metrics, status.reports, epochs)
            for what, who, count in status.anomalies:  # with --swarm_key: refused strangers, oversized groups
                logger.warning("%s: %s (%dx)", what, who, count)
            if status.state == "failed":
                logger.error("training failed:\n%s", status.error)
                return 1
            if status.state in ("done", "stopped"):
                return 0
            time.sleep(POLL_INTERVAL_S)
