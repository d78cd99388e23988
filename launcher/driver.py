"""The Ray driver: start one actor per peer, peer 0 first, stream their reports into the results folder."""

from __future__ import annotations

import logging
import math
import os
import secrets
import signal
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psutil
import ray

from launcher.collect import EpochCollector
from launcher.results import MetricsWriter, format_summary, read_metrics, summarize
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


def run_experiment(cfg: ExperimentConfig, out_dir: Path) -> RunResult:
    run_id = make_run_id(cfg)
    run_dir = Path(out_dir) / run_id
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    logger.info("run %s: %d peers, method=%s -> %s", run_id, cfg.peers, cfg.gossip.method, run_dir)
    started_ray = connect_ray(cfg)
    swarm = Swarm(cfg, run_id, checkpoint_dir=(cfg.checkpoint_dir or run_dir).expanduser().resolve())
    writer = MetricsWriter(run_dir / "metrics.csv")
    exit_code = 130
    try:
        swarm.start()
        exit_code = stream_reports(swarm, writer, cfg)
    except (ray.exceptions.RayError, TimeoutError) as err:
        logger.error("the peers could not be started: %s", err)
        exit_code = 1
    except KeyboardInterrupt:
        logger.warning("interrupted: keeping the %d rows reported so far, shutting the peers down", writer.rows_written)
    finally:
        with sigint_ignored():
            writer.write([row for rows in swarm.drain() for row in rows])
            writer.close()
            swarm.shutdown()
            if started_ray:
                ray.shutdown()
    finish(run_dir, writer.rows_written)
    return RunResult(run_dir, exit_code)


def connect_ray(cfg: ExperimentConfig) -> bool:
    """Use the Ray already initialized in this process, or start a local one; True when we started it."""
    if ray.is_initialized():
        return False
    needed = math.ceil(cfg.peers * cfg.resources.num_cpus)
    ray.init(num_cpus=max(needed, os.cpu_count() or 1), include_dashboard=False, logging_level=logging.WARNING)
    return True


class Swarm:
    """The peers' actors, started in bootstrap order, and what is needed to stop them without leftovers."""

    def __init__(self, cfg: ExperimentConfig, run_id: str, checkpoint_dir: Path | None = None):
        self.cfg, self.run_id, self.checkpoint_dir = cfg, run_id, checkpoint_dir
        self.actors: dict[int, ray.actor.ActorHandle] = {}
        self.child_processes: list[tuple[int, float]] = []  # (pid, create_time) of hivemind's processes
        self.collector = EpochCollector(range(cfg.peers))

    def start(self) -> None:
        cfg = self.cfg
        peer_actor = ray.remote(Peer)
        resources = dict(num_cpus=cfg.resources.num_cpus, num_gpus=cfg.resources.num_gpus)
        self.actors = {
            i: peer_actor.options(name=actor_name(self.run_id, i), **resources).remote(
                cfg, i, self.run_id, self.checkpoint_dir
            )
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

    def _record_child_processes(self) -> None:
        if self.cfg.network.host not in ("127.0.0.1", "localhost"):
            return  # peers may be on other machines: their pids mean nothing here
        for pids in ray.get([actor.process_ids.remote() for actor in self.actors.values()]):
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

    def shutdown(self) -> None:
        """Ask every peer to stop hivemind cleanly, then kill the actors and reap anything left behind."""
        stops = [actor.stop.remote() for actor in self.actors.values()]
        ray.wait(stops, num_returns=len(stops), timeout=STOP_TIMEOUT_S)
        for actor in self.actors.values():
            ray.kill(actor)
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
