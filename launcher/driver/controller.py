"""The Ray driver's run: connect, start the swarm, then one loop that writes rows and events as they come, lets the
policy decide about dead and wedged peers, plays the scenario, and at the end stops everything without leftovers.

Connection (`connect`), placement (`placement`), the actors (`swarm`), the decisions (`policy`) and the scripted
events (`scenario`) live in their own modules; this one holds the order of things.
"""

from __future__ import annotations

import logging
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import ray

from launcher.driver.connect import connect_ray
from launcher.driver.placement import PlacementError
from launcher.driver.policy import decide, exit_code
from launcher.driver.scenario import Action, Clock, Scenario
from launcher.driver.swarm import Swarm
from launcher.emulation.links import Emulation, EmulationError
from launcher.results.progress import ProgressDisplay
from launcher.results.sinks import Sink, run_sinks
from launcher.results.summary import (
    EVENT_COLUMNS,
    averaging_verdict,
    format_summary,
    read_events,
    read_metrics,
    round_totals,
    summarize,
)
from workers.core.config import ExperimentConfig, dump_config
from workers.core.cpucap import remove_caps
from workers.core.csvfile import MetricsWriteError
from workers.core.metrics import MetricsRow
from workers.core.reporting import RowWriter, epoch_line
from workers.core.signals import (
    install_interrupt_handlers,
    interrupts_deferred,
    raise_if_interrupted,
    signals_ignored,
)
from workers.core.storage import FolderMirror, remote_of
from workers.peer.checkpoint import run_checkpoint_dir

logger = logging.getLogger("launcher")

TICK_S = 0.5


@dataclass
class RunResult:
    run_dir: Path
    exit_code: int  # 0 all peers finished (restarts within the budget), 1 a peer was given up, 130 interrupted
    polls_per_peer_s: float = float("nan")  # how often each peer answered the driver's status polls


def make_run_id(cfg: ExperimentConfig) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{cfg.name}-{cfg.gossip.method}-{stamp}-{secrets.token_hex(2)}"


class RunFiles:
    """metrics.csv and events.csv of one run, each row flushed as it comes, and the run's other sinks (TensorBoard,
    MLflow, a Tune trial's reports: launcher/results/sinks.py), fed the same epochs."""

    def __init__(self, run_dir: Path, sinks: list[Sink] | None = None, mirror: FolderMirror | None = None):
        """`mirror`: the storage copy of the run folder (a sink too): rows and events reach it as they are written."""
        self.metrics = RowWriter(run_dir / "metrics.csv")
        self.events = RowWriter(run_dir / "events.csv", EVENT_COLUMNS)
        self.sinks, self.mirror = [*(sinks or []), *([mirror] if mirror else [])], mirror

    def write(self, epochs: list[list[MetricsRow]], swarm: Swarm, cfg: ExperimentConfig) -> None:
        self.events.write(swarm.take_events())
        for rows in epochs:
            self.metrics.write(rows)  # the CSV first: a sink that fails loses no row
            for sink in self.sinks:
                sink.epoch(rows)
            log_epoch(rows, cfg, time.monotonic() - swarm.started)
        if self.mirror is not None:
            self.mirror.tick()  # (at most every few seconds)

    def close(self, status: str = "FINISHED") -> None:
        self.metrics.close()
        self.events.close()
        for sink in self.sinks:
            sink.close(status)


def run_experiment(cfg: ExperimentConfig, out_dir: Path, address: str | None = None) -> RunResult:
    """Run one experiment on the Ray cluster at `address` (or RAY_ADDRESS, or one started with `ray start` on this
    machine, or else a new local one) and write its results under `out_dir` on this machine."""
    connected = connect_ray(cfg, address)
    install_interrupt_handlers()  # ray.init() put its own sys.exit(15) there
    run_id = make_run_id(cfg)
    run_dir = Path(out_dir).expanduser().resolve() / run_id
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))  # as given: `network.host: auto` stays portable
    logger.info("run %s: %d peers, method=%s -> %s", run_id, cfg.peers, cfg.gossip.method, run_dir)
    mirror = FolderMirror(run_dir, remote_of(cfg.storage, run_dir))  # a storage URI: uploads after epochs, at the end
    swarm = Swarm(cfg, run_id, checkpoint_dir=run_checkpoint_dir(cfg, run_id, run_dir), checkpoint_uri=mirror.remote)
    files, code, polls = RunFiles(run_dir, run_sinks(cfg, run_id, run_dir), mirror), 130, float("nan")
    emulation = Emulation(cfg.emulation, cfg.peers + cfg.joins) if cfg.emulation.enabled else None
    swarm.netns = emulation.links if emulation else {}
    try:
        if emulation is not None:
            emulation.start(run_dir)  # shaped links, measured into links.csv before any peer starts
        swarm.start()
        code = follow(swarm, files, cfg)
        polls = swarm.polls_per_peer_s()
    except (ray.exceptions.RayError, TimeoutError, PlacementError, EmulationError) as err:
        logger.error("the peers could not be started: %s", err)
        code = 1
    except OSError as err:  # a full disk (MetricsWriteError names the file): every row before it is in the file
        logger.error("%s; stopping the run (the %d rows written so far are kept)", err, files.metrics.rows_written)
        code = 1
    except KeyboardInterrupt:
        logger.warning(
            "interrupted: keeping the %d rows reported so far, stopping the peers", files.metrics.rows_written
        )
    finally:
        with signals_ignored():  # a second Ctrl-C or SIGTERM must not cut the cleanup short (orphan p2pd, actors)
            try:
                code = write_last(files, swarm, cfg, code)  # stop first: no row or model newer than what is kept
                files.close({0: "FINISHED", 130: "KILLED"}.get(code, "FAILED"))
                swarm.fetch_final_models()
            finally:
                try:
                    swarm.shutdown()
                    if cfg.resources.cap_cpu:
                        remove_caps(run_id)  # the peers' CPU groups on this machine, now empty
                finally:
                    if emulation is not None:
                        emulation.teardown()  # after the peers: namespaces, veths and bridge, also on errors
                    if connected:
                        ray.shutdown()
    try:
        if finish(run_dir, files.metrics.rows_written, cfg.gossip.method):
            code = code or 1  # the run's averaging mostly failed: not a success, whatever else went well
    except OSError as err:  # summary.csv on a full disk
        logger.error("could not write the run's summary: %s", err)
        code = code or 1
    if not mirror.finish(swarm.checkpoints()):  # summary.csv too; a run whose results did not reach its storage
        code = code or 1  # is no success
    return RunResult(run_dir, code, polls)


def write_last(files: RunFiles, swarm: Swarm, cfg: ExperimentConfig, code: int) -> int:
    """Stop the peers and write what they reported last; the run's exit code (1 when those rows could not be
    written, e.g. on a full disk: the rows before them are kept)."""
    epochs = swarm.stop()
    try:
        files.write(epochs, swarm, cfg)
    except MetricsWriteError as err:
        logger.error("%s: the last %d epochs' rows are lost", err, len(epochs))
        return code or 1
    return code


def follow(swarm: Swarm, files: RunFiles, cfg: ExperimentConfig) -> int:
    """Until no peer has anything left to train: write what the peers report, act on what the policy decides about
    dead or wedged peers, and play the scenario."""
    scenario = Scenario(cfg.scenario, cfg.peers)
    round_s = cfg.gossip.matchmaking_time + cfg.gossip.round_timeout
    display = ProgressDisplay(cfg.optim.epochs)
    try:
        with interrupts_deferred():  # a signal stops the loop between two passes: no row taken is lost
            while swarm.active():
                raise_if_interrupted()
                played = []  # first: a slow or lr event "from the start" is played as training starts, not a
                for action in scenario.due(clock(swarm)):  # tick later (a few epochs, with cheap rounds)
                    played += play(swarm, action)
                epochs = played + swarm.tick(TICK_S)
                for decision in decide(swarm.views(), cfg.faults, round_s, swarm.group):
                    epochs += swarm.carry_out(decision)
                files.write(epochs, swarm, cfg)
                display.update(swarm.progress())
    finally:
        display.close()
    views = swarm.views()
    for view in views:
        if view.phase == "given_up":
            logger.error("peer %d was given up: %s", view.peer, view.reason)
    return exit_code(views, interrupted=False)


def clock(swarm: Swarm) -> Clock:
    elapsed = time.monotonic() - (swarm.training_since or time.monotonic())
    return Clock(elapsed, swarm.collector.swarm_epoch, swarm.running_epochs())


def play(swarm: Swarm, action: Action) -> list[list[MetricsRow]]:
    event = action.event
    logger.info("scenario: %s of peer %d", event.event, action.peer)
    if event.event == "kill":
        swarm.kill(action.peer, event.process)
    elif event.event == "join":
        return swarm.join(action.peer)
    elif event.event == "leave":
        swarm.leave(action.peer, action.leave_after)
    elif event.event == "lr":
        swarm.scale_lr(action.peer, event.factor)
    else:
        swarm.slow(action.peer, event.factor)
    return []


def log_epoch(rows: list[MetricsRow], cfg: ExperimentConfig, elapsed: float) -> None:
    logger.info(epoch_line(rows, cfg.optim.epochs, elapsed))


def finish(run_dir: Path, rows_written: int, method: str) -> str | None:
    """summary.csv and the per-peer table; returns why the run's averaging cannot be trusted (most of its rounds
    failed), or None."""
    if rows_written == 0:
        logger.warning("no metrics were reported; nothing to summarize in %s", run_dir)
        return None
    metrics = read_metrics(run_dir)
    summary = summarize(metrics, read_events(run_dir))
    summary.to_csv(run_dir / "summary.csv", index=False)
    logger.info("per-peer summary:\n%s", format_summary(summary))
    verdict = averaging_verdict(round_totals(metrics), method)
    if verdict:
        logger.error("%s (exit status 1)", verdict)
    logger.info("results: %s (on %s)", run_dir, socket.gethostname())
    return verdict
