"""The Ray driver: start one actor per peer, peer 0 first, stream their reports into the results folder."""

from __future__ import annotations

import logging
import math
import os
import secrets
import signal
import socket
import time
from collections.abc import MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psutil
import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from launcher.collect import EpochCollector
from launcher.results import MetricsWriter, format_summary, read_metrics, summarize
from workers.checkpoint import atomic_write_bytes, checkpoint_path
from workers.config import ExperimentConfig, dump_config
from workers.metrics import MetricsRow
from workers.network import ANY, LOOPBACK
from workers.peer import Peer, PeerStatus

logger = logging.getLogger("launcher")

POLL_INTERVAL_S = 0.5
SETUP_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0
FINISHED_STATES = ("done", "failed", "stopped", "lost")


@dataclass
class RunResult:
    run_dir: Path
    exit_code: int  # 0 all peers finished, 1 a peer failed, 130 interrupted


def make_run_id(cfg: ExperimentConfig) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{cfg.name}-{cfg.gossip.method}-{stamp}-{secrets.token_hex(2)}"


def run_experiment(cfg: ExperimentConfig, out_dir: Path, address: str | None = None) -> RunResult:
    """Run one experiment on the Ray cluster at `address` (or RAY_ADDRESS, or one started with `ray start` on this
    machine, or else a new local one) and write its results under `out_dir` on this machine."""
    connected = connect_ray(cfg, address)
    run_id = make_run_id(cfg)
    run_dir = Path(out_dir).expanduser().resolve() / run_id
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))  # as given: `network.host: auto` stays portable
    logger.info("run %s: %d peers, method=%s -> %s", run_id, cfg.peers, cfg.gossip.method, run_dir)
    swarm = Swarm(cfg, run_id, checkpoint_dir=(cfg.checkpoint_dir or run_dir).expanduser().resolve())
    writer = MetricsWriter(run_dir / "metrics.csv")
    exit_code = 130
    try:
        swarm.start()
        exit_code = stream_reports(swarm, writer, cfg)
    except (ray.exceptions.RayError, TimeoutError, PlacementError) as err:
        logger.error("the peers could not be started: %s", err)
        exit_code = 1
    except KeyboardInterrupt:
        logger.warning("interrupted: keeping the %d rows reported so far, shutting the peers down", writer.rows_written)
    finally:
        with sigint_ignored():
            try:
                writer.write([row for rows in swarm.drain() for row in rows])
                writer.close()
                swarm.fetch_final_models()
            finally:  # whatever failed above, no peer, placement group or hivemind process outlives the run
                swarm.shutdown()
                if connected:
                    ray.shutdown()
    finish(run_dir, writer.rows_written)
    return RunResult(run_dir, exit_code)


def connect_ray(cfg: ExperimentConfig, address: str | None = None) -> bool:
    """Connect to the Ray cluster at `address` or RAY_ADDRESS, else to one started with `ray start` on this machine
    and still up, else start a private local one. False when this process had Ray initialized already."""
    if ray.is_initialized():
        return False
    quiet = dict(logging_level=logging.WARNING, log_to_driver=True)
    address = address or os.environ.get("RAY_ADDRESS") or started_cluster_address()
    if address:
        enable_token_auth(os.environ)
        ray.init(address=address, **quiet)
        logger.info("connected to the Ray cluster at %s: %d nodes", address, len(alive_nodes()))
    else:  # "local": a new Ray just for this run, never another process's private one
        needed = math.ceil(cfg.peers * cfg.resources.num_cpus)
        ray.init(address="local", num_cpus=max(needed, os.cpu_count() or 1), include_dashboard=False, **quiet)
    return True


def started_cluster_address() -> str | None:
    """The address of the cluster the last `ray start` on this machine joined, if its processes are still up."""
    from ray._private.services import find_gcs_addresses
    from ray._private.utils import read_ray_address

    address = read_ray_address()
    if address and address not in find_gcs_addresses():
        logger.warning("ignoring the stale Ray address %s from the last `ray start` (that cluster is down)", address)
        return None
    return address


TOKEN_SOURCES = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")  # besides ~/.ray/auth_token


def enable_token_auth(env: MutableMapping[str, str]) -> None:
    """RAY_AUTH_MODE=token when a token is at hand and no mode is set. Ray turns token mode on by itself only for
    address "auto"; with RAY_ADDRESS (or an --address) set it does not, and an unauthenticated client retries
    forever against a cluster that requires the token."""
    has_token = any(env.get(name) for name in TOKEN_SOURCES) or (Path.home() / ".ray" / "auth_token").is_file()
    if "RAY_AUTH_MODE" not in env and has_token:
        env["RAY_AUTH_MODE"] = "token"


def alive_nodes() -> list[dict]:
    return [node for node in ray.nodes() if node["Alive"]]


def resolve_network(cfg: ExperimentConfig, nodes: int) -> ExperimentConfig:
    """`network.host: auto`: loopback when every peer is on one node, all interfaces (each peer announces its node's
    IP) when they are spread over `nodes` > 1. A fixed host or announce address is one machine's: it cannot serve
    peers on several nodes."""
    net = cfg.network
    fixed_host = net.host not in ("auto", ANY)
    if nodes > 1 and (fixed_host or net.announce_host):
        fixed = f"network.host={net.host}" if fixed_host else f"network.announce_host={net.announce_host}"
        raise PlacementError(f"{fixed} is one machine's address, but the peers were placed on {nodes} nodes: use "
                             "network.host auto or 0.0.0.0 (each peer announces its own node's IP)")  # fmt: skip
    if net.host != "auto":
        return cfg
    host = ANY if nodes > 1 else LOOPBACK
    return cfg.model_copy(update={"network": net.model_copy(update={"host": host})})


class PlacementError(RuntimeError):
    """The cluster cannot hold the peers' placement group (now, or ever)."""


def peer_bundles(cfg: ExperimentConfig) -> list[dict[str, float]]:
    """One placement-group bundle per peer: its CPUs, GPUs and custom resources."""
    res = cfg.resources
    base = {"CPU": res.num_cpus, **({"GPU": res.num_gpus} if res.num_gpus else {}), **res.custom}
    return [{**base, **(res.peer_custom[i] if res.peer_custom else {})} for i in range(cfg.peers)]


def check_placeable(bundles: list[dict[str, float]], strategy: str, nodes: list[dict[str, float]]) -> None:
    """Fail at once, naming the resource, when the cluster's nodes could never hold the peers' bundles (e.g. GPUs on
    a CPU-only cluster, or more GPUs than the cluster has), instead of waiting for a placement group that will never
    be scheduled. `nodes`: each alive node's total resources."""

    def fits(bundle: dict[str, float], node: dict[str, float]) -> bool:
        return all(node.get(name, 0.0) >= amount for name, amount in bundle.items())

    have = "; ".join(_format_resources(node) for node in nodes) or "no nodes"
    hint = f"(nodes: {have}; nodes that are still starting do not count yet: see `ray status`)"
    for peer, bundle in enumerate(bundles):
        if not any(fits(bundle, node) for node in nodes):
            short = {k: v for k, v in bundle.items() if not any(node.get(k, 0.0) >= v for node in nodes)} or bundle
            raise PlacementError(f"peer {peer} needs {_format_resources(bundle)} on one node, but no node of "
                                 f"the cluster has {_format_resources(short)} {hint}; see resources.*")  # fmt: skip
    total = {k: sum(b.get(k, 0.0) for b in bundles) for b in bundles for k in b}
    cluster = {k: sum(node.get(k, 0.0) for node in nodes) for k in total}
    if not fits(total, cluster):
        raise PlacementError(f"{len(bundles)} peers need {_format_resources(total)} in all, the cluster has "
                             f"{_format_resources(cluster)} {hint}")  # fmt: skip
    if strategy == "STRICT_PACK" and not any(fits(total, node) for node in nodes):
        raise PlacementError(f"placement STRICT_PACK needs {_format_resources(total)} on one node {hint}")
    if strategy == "STRICT_SPREAD":
        usable = sum(any(fits(bundle, node) for bundle in bundles) for node in nodes)
        if usable < len(bundles):
            raise PlacementError(f"placement STRICT_SPREAD needs {len(bundles)} nodes that can hold a peer, the "
                                 f"cluster has {usable} {hint}")  # fmt: skip


def placement_strategy(cfg: ExperimentConfig) -> str:
    """`resources.placement`, or by default PACK for peers that share GPUs (a fraction each), else SPREAD."""
    res = cfg.resources
    return res.placement or ("PACK" if 0 < res.num_gpus < 1 else "SPREAD")


def _format_resources(resources: dict[str, float]) -> str:
    shown = {k: v for k, v in resources.items() if not k.startswith(("node:", "memory", "object_store_memory"))}
    return ", ".join(f"{k}={v:g}" for k, v in sorted(shown.items())) or "nothing"


class Swarm:
    """The peers' actors, started in bootstrap order, and what is needed to stop them without leftovers."""

    def __init__(self, cfg: ExperimentConfig, run_id: str, checkpoint_dir: Path | None = None):
        self.cfg, self.run_id, self.checkpoint_dir = cfg, run_id, checkpoint_dir
        self.actors: dict[int, ray.actor.ActorHandle] = {}
        self.peer_nodes: dict[int, str] = {}  # peer -> Ray node id of its bundle
        self.placement_group = None
        self.training = False  # every peer started training (so there are final models to fetch)
        self.child_processes: list[tuple[int, float]] = []  # (pid, create_time) of hivemind's processes
        self.collector = EpochCollector(range(cfg.peers))

    def start(self) -> None:
        bundles = self._place()
        cfg = self.cfg = resolve_network(self.cfg, nodes=len(set(self.peer_nodes.values())))
        peer_actor = ray.remote(Peer)
        self.actors = {}
        for i, bundle in enumerate(bundles):
            custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
            in_bundle = PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=i)
            self.actors[i] = peer_actor.options(
                name=actor_name(self.run_id, i),
                num_cpus=bundle["CPU"],
                num_gpus=bundle.get("GPU", 0),
                resources=custom,
                scheduling_strategy=in_bundle,
            ).remote(cfg, i, self.run_id, self.checkpoint_dir)
        bootstrap_maddrs = ray.get(self.actors[0].start_dht.remote([]), timeout=SETUP_TIMEOUT_S)
        logger.info("peer 0 is up at %s", bootstrap_maddrs)
        others = [self.actors[i].start_dht.remote(bootstrap_maddrs) for i in range(1, cfg.peers)]
        ray.get(others, timeout=SETUP_TIMEOUT_S)
        if cfg.gossip.method == "allreduce":
            address = ray.get(self.actors[0].rendezvous_address.remote())
            ray.get([actor.join_allreduce.remote(address) for actor in self.actors.values()], timeout=SETUP_TIMEOUT_S)
        self._record_child_processes()
        ray.get([actor.start_training.remote() for actor in self.actors.values()])
        self.training = True
        logger.info("all %d peers joined the DHT and started training", cfg.peers)

    def _place(self) -> list[dict[str, float]]:
        """Reserve one bundle per peer (SPREAD by default: different nodes when possible), or fail fast."""
        res, strategy = self.cfg.resources, placement_strategy(self.cfg)
        bundles = peer_bundles(self.cfg)
        nodes = alive_nodes()
        check_placeable(bundles, strategy, [node["Resources"] for node in nodes])
        self.placement_group = placement_group(bundles, strategy=strategy, name=f"{self.run_id}/peers")
        try:
            ray.get(self.placement_group.ready(), timeout=res.placement_timeout)
        except ray.exceptions.GetTimeoutError:
            raise PlacementError(
                f"the cluster could not place {len(bundles)} peers ({_format_resources(bundles[0])} each, "
                f"{strategy}) within resources.placement_timeout={res.placement_timeout:g} s: its resources are "
                f"busy (available now: {_format_resources(ray.available_resources())})"
            ) from None
        table = placement_group_table(self.placement_group)["bundles_to_node_id"]
        self.peer_nodes = {i: table[i] for i in range(len(bundles))}
        addresses = {node["NodeID"]: node["NodeManagerAddress"] for node in nodes}
        logger.info("placement (%s): %s", strategy, ", ".join(
            f"peer {i} on {addresses.get(n, '?')} (node {n[:8]})" for i, n in self.peer_nodes.items()))  # fmt: skip
        return bundles

    def _local_peers(self) -> list[int]:
        """Peers on the driver's own Ray node (their processes can be seen and reaped from here)."""
        here = ray.get_runtime_context().get_node_id()
        return [i for i in self.actors if self.peer_nodes.get(i) == here]

    def _record_child_processes(self) -> None:
        local = self._local_peers()
        for pids in ray.get([self.actors[i].process_ids.remote() for i in local]):
            for pid in pids:
                try:
                    self.child_processes.append((pid, psutil.Process(pid).create_time()))
                except psutil.NoSuchProcess:
                    pass

    def poll(self, peers: set[int], timeout: float = SETUP_TIMEOUT_S) -> list[PeerStatus]:
        """Each peer's status; a peer whose actor died or stopped answering comes back as state "lost"."""
        calls = {peer: self.actors[peer].poll.remote() for peer in sorted(peers)}
        statuses = []
        for peer, call in calls.items():
            try:
                statuses.append(ray.get(call, timeout=timeout))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
                statuses.append(PeerStatus(peer, "lost", error=str(err)))
        return statuses

    def drain(self) -> list[list[MetricsRow]]:
        """Rows the peers reported but the driver has not collected yet (after an interrupt)."""
        statuses = self.poll(set(self.actors), timeout=5.0) if self.actors else []
        epochs = [rows for s in statuses for report in s.reports for rows in self.collector.add(report)]
        return epochs + self.collector.flush()

    def fetch_final_models(self) -> None:
        """Copy peer-<i>_final.pt of the peers on other nodes into this machine's checkpoint folder (the run folder
        unless checkpoint_dir is set), one at a time: no shared filesystem needed."""
        if not self.training:
            return
        fetched, local = [], self._local_peers()
        for peer in [i for i in self.actors if i not in local]:
            try:
                data = ray.get(self.actors[peer].checkpoint_bytes.remote("final"), timeout=STOP_TIMEOUT_S)
                if data is not None:
                    atomic_write_bytes(checkpoint_path(self.checkpoint_dir, peer, "final"), data)
                    fetched.append(peer)
            except (ray.exceptions.RayError, OSError) as err:
                logger.warning("peer %d's final model could not be fetched: %s", peer, err)
        if fetched:
            logger.info("fetched the final models of peers %s from their nodes into %s", fetched, self.checkpoint_dir)

    def shutdown(self) -> None:
        """Ask every peer to stop hivemind cleanly, then kill the actors and reap anything left behind."""
        stops = [actor.stop.remote() for actor in self.actors.values()]
        ray.wait(stops, num_returns=len(stops), timeout=STOP_TIMEOUT_S)
        for actor in self.actors.values():
            ray.kill(actor)
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
        reap(self.child_processes)


def actor_name(run_id: str, peer: int) -> str:
    return f"{run_id}/peer-{peer}"


def reap(processes: list[tuple[int, float]]) -> None:
    """Kill hivemind's processes that outlived their peer (e.g. after a peer was killed mid-run)."""
    reaped = []
    for pid, create_time in processes:
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == create_time:  # the same process, not a reused pid
                reaped.append(proc.name())
                proc.kill()
        except psutil.NoSuchProcess:
            pass
    if reaped:
        logger.info("reaped %d processes the peers left behind: %s", len(reaped), ", ".join(sorted(set(reaped))))


def stream_reports(swarm: Swarm, writer: MetricsWriter, cfg: ExperimentConfig) -> int:
    """Poll the running peers and write rows as their epochs complete, until every peer is finished or lost."""
    running, exit_code, started = set(swarm.actors), 0, time.perf_counter()
    while running:
        for status in swarm.poll(running):
            epochs = [rows for report in status.reports for rows in swarm.collector.add(report)]
            if status.state in ("failed", "lost"):
                logger.error("peer %d %s:\n%s", status.peer, status.state, status.error)
                epochs += swarm.collector.drop_peer(status.peer)
                exit_code = 1
            if status.state in FINISHED_STATES:
                running.discard(status.peer)
            for rows in epochs:
                writer.write(rows)
                log_epoch(rows, cfg, time.perf_counter() - started)
        time.sleep(POLL_INTERVAL_S)
    return exit_code


def log_epoch(rows: list[MetricsRow], cfg: ExperimentConfig, elapsed: float) -> None:
    accs = [r.test_acc for r in rows]
    ok, failed = sum(r.avg_rounds_ok for r in rows), sum(r.avg_rounds_failed for r in rows)
    logger.info(
        "epoch %d/%d | test_acc mean %.3f [%.3f, %.3f] | rounds ok %d failed %d | consensus %.2e | %.0f s",
        rows[0].epoch, cfg.optim.epochs, sum(accs) / len(accs), min(accs), max(accs),
        ok, failed, rows[0].consensus_dist, elapsed,
    )  # fmt: skip


def finish(run_dir: Path, rows_written: int) -> None:
    if rows_written == 0:
        logger.warning("no metrics were reported; nothing to summarize in %s", run_dir)
        return
    summary = summarize(read_metrics(run_dir))
    summary.to_csv(run_dir / "summary.csv", index=False)
    logger.info("per-peer summary:\n%s", format_summary(summary))
    logger.info("results: %s (on %s)", run_dir, socket.gethostname())


@contextmanager
def sigint_ignored():
    """Cleanup must finish (or no p2pd/Ray process would be left behind): a second Ctrl-C waits for it."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
