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
    run_id = make_run_id(cfg)
    run_dir = Path(out_dir).expanduser().resolve() / run_id
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))  # as given: `network.host: auto` stays portable
    connected = connect_ray(cfg, address)
    cfg = resolve_network(cfg)
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
            writer.write([row for rows in swarm.drain() for row in rows])
            writer.close()
            swarm.fetch_final_models(run_dir)
            swarm.shutdown()
            if connected:
                ray.shutdown()
    finish(run_dir, writer.rows_written)
    return RunResult(run_dir, exit_code)


def connect_ray(cfg: ExperimentConfig, address: str | None = None) -> bool:
    """Connect to the Ray cluster at `address` or RAY_ADDRESS, else to one started with `ray start` on this machine,
    else start a local one. False when this process had Ray initialized already (the caller owns it)."""
    if ray.is_initialized():
        return False
    quiet = dict(logging_level=logging.WARNING, log_to_driver=True)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        enable_token_auth(os.environ)
        ray.init(address=address, **quiet)
    else:
        try:
            ray.init(address="auto", **quiet)
        except ConnectionError:  # no cluster on this machine: start one just for this run
            needed = math.ceil(cfg.peers * cfg.resources.num_cpus)
            ray.init(num_cpus=max(needed, os.cpu_count() or 1), include_dashboard=False, **quiet)
            return True
    nodes = alive_nodes()
    logger.info("connected to the Ray cluster at %s: %d nodes", ray.get_runtime_context().gcs_address, len(nodes))
    return True


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


def resolve_network(cfg: ExperimentConfig) -> ExperimentConfig:
    """`network.host: auto`: loopback on a one-node Ray, all interfaces (each peer announces its node's IP) on a
    multi-node cluster."""
    if cfg.network.host != "auto":
        return cfg
    host = "0.0.0.0" if len(alive_nodes()) > 1 else "127.0.0.1"
    return cfg.model_copy(update={"network": cfg.network.model_copy(update={"host": host})})


class PlacementError(RuntimeError):
    """The cluster cannot hold the peers' placement group (now, or ever)."""


def peer_bundles(cfg: ExperimentConfig) -> list[dict[str, float]]:
    """One placement-group bundle per peer: its CPUs, GPUs and custom resources."""
    res = cfg.resources
    base = {"CPU": res.num_cpus, **({"GPU": res.num_gpus} if res.num_gpus else {}), **res.custom}
    return [{**base, **(res.peer_custom[i] if res.peer_custom else {})} for i in range(cfg.peers)]


def check_placeable(bundles: list[dict[str, float]], strategy: str, nodes: list[dict[str, float]]) -> None:
    """Fail at once, naming the resource, when no node of the cluster could ever hold a peer's bundle (e.g. GPUs on a
    CPU-only cluster), instead of waiting for a placement group that will never be scheduled.
    `nodes`: each alive node's total resources."""

    def fits(bundle: dict[str, float], node: dict[str, float]) -> bool:
        return all(node.get(name, 0.0) >= amount for name, amount in bundle.items())

    have = "; ".join(_format_resources(node) for node in nodes) or "no nodes"
    for peer, bundle in enumerate(bundles):
        if not any(fits(bundle, node) for node in nodes):
            short = {k: v for k, v in bundle.items() if not any(node.get(k, 0.0) >= v for node in nodes)} or bundle
            raise PlacementError(
                f"peer {peer} needs {_format_resources(bundle)} on one node, but no node of the cluster has "
                f"{_format_resources(short)} (nodes: {have}); check resources.* in the config"
            )
    if strategy == "STRICT_PACK":
        total = {k: sum(b.get(k, 0.0) for b in bundles) for b in bundles for k in b}
        if not any(fits(total, node) for node in nodes):
            raise PlacementError(f"placement STRICT_PACK needs {_format_resources(total)} on one node (nodes: {have})")
    if strategy == "STRICT_SPREAD" and len(nodes) < len(bundles):
        raise PlacementError(f"placement STRICT_SPREAD needs {len(bundles)} nodes, the cluster has {len(nodes)}")


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
        self.child_processes: list[tuple[int, float]] = []  # (pid, create_time) of hivemind's processes
        self.collector = EpochCollector(range(cfg.peers))

    def start(self) -> None:
        cfg = self.cfg
        self._place()
        peer_actor = ray.remote(Peer)
        res = cfg.resources
        self.actors = {
            i: peer_actor.options(
                name=actor_name(self.run_id, i),
                num_cpus=res.num_cpus,
                num_gpus=res.num_gpus,
                resources={**res.custom, **(res.peer_custom[i] if res.peer_custom else {})},
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.placement_group, placement_group_bundle_index=i
                ),
            ).remote(cfg, i, self.run_id, self.checkpoint_dir)
            for i in range(cfg.peers)
        }
        bootstrap_maddrs = ray.get(self.actors[0].start_dht.remote([]), timeout=SETUP_TIMEOUT_S)
        logger.info("peer 0 is up at %s", bootstrap_maddrs)
        others = [self.actors[i].start_dht.remote(bootstrap_maddrs) for i in range(1, cfg.peers)]
        ray.get(others, timeout=SETUP_TIMEOUT_S)
        if cfg.gossip.method == "allreduce":
            address = ray.get(self.actors[0].rendezvous_address.remote())
            ray.get([actor.join_allreduce.remote(address) for actor in self.actors.values()], timeout=SETUP_TIMEOUT_S)
        self._record_child_processes()
        ray.get([actor.start_training.remote() for actor in self.actors.values()])
        logger.info("all %d peers joined the DHT and started training", cfg.peers)

    def _place(self) -> None:
        """Reserve one bundle per peer (SPREAD by default: different nodes when possible), or fail fast."""
        res = self.cfg.resources
        bundles = peer_bundles(self.cfg)
        check_placeable(bundles, res.placement, [node["Resources"] for node in alive_nodes()])
        self.placement_group = placement_group(bundles, strategy=res.placement, name=f"{self.run_id}/peers")
        try:
            ray.get(self.placement_group.ready(), timeout=res.placement_timeout)
        except ray.exceptions.GetTimeoutError:
            raise PlacementError(
                f"the cluster could not place {len(bundles)} peers ({_format_resources(bundles[0])} each, "
                f"{res.placement}) within resources.placement_timeout={res.placement_timeout:g} s: its resources are "
                f"busy (available now: {_format_resources(ray.available_resources())})"
            ) from None
        table = placement_group_table(self.placement_group)["bundles_to_node_id"]
        self.peer_nodes = {i: table[i] for i in range(len(bundles))}
        nodes = {node["NodeID"]: node["NodeManagerAddress"] for node in alive_nodes()}
        logger.info("placement (%s): %s", res.placement,
                    ", ".join(f"peer {i} on {nodes.get(n, n[:8])}" for i, n in self.peer_nodes.items()))  # fmt: skip

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

    def fetch_final_models(self, run_dir: Path) -> None:
        """Copy peer-<i>_final.pt of peers on other nodes into `run_dir`: no shared filesystem needed."""
        remote = [i for i in self.actors if i not in self._local_peers()] if self.actors else []
        calls = {i: self.actors[i].checkpoint_bytes.remote("final") for i in remote}
        for peer, call in calls.items():
            try:
                data = ray.get(call, timeout=STOP_TIMEOUT_S)
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as err:
                logger.warning("peer %d's final model could not be fetched: %s", peer, err)
                continue
            if data is not None:
                atomic_write_bytes(checkpoint_path(run_dir, peer, "final"), data)
        if calls:
            logger.info("fetched the final models of peers %s from their nodes", sorted(calls))

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
