"""One hivemind peer: DHT, averaging strategy, data shard, model, and the training loop in a thread.

The class knows nothing of Ray: the launcher wraps it in a Ray actor, `python -m workers` runs it in the
foreground. The driver calls `start_dht`, then `start_training`, then polls; every call returns quickly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import secrets
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path

import psutil
import torch
from torch.utils.data import DataLoader

from workers.averaging.allreduce import AllReduceAveraging
from workers.averaging.base import AveragingStrategy, Diverged, NoAveraging, averaged_tensors
from workers.averaging.diloco import DiLoCoAveraging
from workers.averaging.gossip import GossipAveraging
from workers.averaging.optimizer import OptimizerAveraging
from workers.averaging.sgp import SgpAveraging
from workers.core.anomalies import Anomalies
from workers.core.config import ExperimentConfig, train_set_size
from workers.core.cpucap import cap_this_process, set_quota
from workers.core.membership import read_swarm_key
from workers.core.netns import NetnsLink, inside, namespace_config
from workers.core.network import announce_host, dht_maddrs, naming_taken_port, peer_port, ray_node_id
from workers.core.protocol import Effects, Joined, LiveProgress, PeerEvent, PeerStatus, Report
from workers.peer.checkpoint import (
    UPLOADS,
    checkpoint_identity,
    checkpoint_path,
    load_checkpoint,
    load_training_state,
    resume,
)
from workers.peer.data import Splits, load_dataset, peer_shard
from workers.peer.models import build_model
from workers.peer.schedule import build_optimizer, build_scheduler
from workers.peer.setup import TrainSetup
from workers.peer.sketch import ParameterSketch
from workers.peer.state import apply_snapshot, slowest_link_mbit, snapshot, state_timeout_s
from workers.peer.train import train

logger = logging.getLogger(__name__)


GOSSIP_ROUNDS = ("gossip", "diloco")  # the methods averaging by GossipAveraging's rounds (diloco: an outer step after)
MAX_RELOADS_IN_A_ROW = 3  # a peer that diverges again this often before it reports an epoch cannot train


class StateUnavailable(RuntimeError):
    """A newcomer could not take the swarm's state: it must not train from its fresh initialisation instead."""


class Peer:
    def __init__(self, cfg: ExperimentConfig, peer: int, run_id: str, checkpoint_dir: str | Path | None = None,
                 port_offset: bool = True, restarts: int = 0, whole_set: bool = False,
                 swarm_key: bytes | None = None, checkpoint_uri: str | None = None,
                 netns: NetnsLink | None = None):  # fmt: skip
        """`checkpoint_dir`: where this peer writes peer-<i>_{best,final}.pt (the driver passes `cfg.checkpoint_dir`
        or the run folder); None means `cfg.checkpoint_dir`, and no checkpoints when that is unset too.
        `port_offset`: listen on `network.port + peer` (Ray peers, which may share a node) or on `network.port`.
        `restarts`: this peer's incarnation. `whole_set`: train on the whole training set in an order of its own
        (standalone peers of an open swarm) instead of shard `peer % peers`. `swarm_key`: the run's secret (the
        driver's, through Ray); None: `network.swarm_key_file`'s, or none at all (an open swarm). `checkpoint_uri`: the
        storage folder (workers/core/storage.py) its checkpoints are uploaded to as they are saved; None: they stay
        local. `netns`: this peer's network namespace (emulation: launcher/emulation/links.py), where its DHT, averager
        and gloo group live, on its shaped link."""
        quiet_hivemind()
        children_die_with_this_process()
        self.cpu_group = None  # resources.cap_cpu: this peer's cgroup (a `slow` factor divides its quota)
        if cfg.resources.cap_cpu:  # before hivemind forks its processes: they inherit the cap
            self.cpu_group = cap_this_process(f"{run_id}/peer-{peer}-{restarts}", cfg.resources.num_cpus)
        self.cfg, self.peer, self.run_id, self.port_offset = cfg, peer, run_id, port_offset
        self.restarts, self.whole_set = restarts, whole_set
        self.cfg, self.netns = namespace_config(cfg, netns), netns
        key_file = cfg.network.swarm_key_file
        self.swarm_key = swarm_key or (read_swarm_key(key_file) if key_file else None)
        self.anomalies = Anomalies()  # before hivemind forks its processes, which report into it
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else cfg.checkpoint_dir
        self.checkpoint_uri = checkpoint_uri
        torch.set_num_threads(max(1, int(cfg.resources.num_cpus)))
        self.device = torch.device("cuda" if cfg.resources.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        self.setup = self._build_setup()
        self.dht = None
        self.averaging: AveragingStrategy = NoAveraging()
        self._outbox: queue.Queue[Report | PeerEvent] = queue.Queue()  # reports and events, in order
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state, self._error = "ready", None
        self._reported = 0  # epochs reported (see MAX_RELOADS_IN_A_ROW)
        self._polls = 0
        self._hivemind: list[tuple[psutil.Process, str]] = []  # hivemind's processes: their death wedges the peer

    def _build_setup(self) -> TrainSetup:
        cfg, on_gpu = self.cfg, self.device.type == "cuda"
        splits = load_dataset(cfg.data)
        torch.manual_seed(cfg.seed)  # every peer starts from the same initial parameters
        model = build_model(cfg.model, splits.num_classes, splits.input_shape).to(self.device)
        if cfg.model.channels_last and on_gpu:
            model = model.to(memory_format=torch.channels_last)
        if cfg.optim.amp and not on_gpu:
            logger.info("peer %d: optim.amp is ignored on CPU (bf16 autocast is used on CUDA only)", self.peer)
        optimizer = build_optimizer(model.parameters(), cfg.optim)
        train_loader, test_loader = self._loaders(splits)
        setup = TrainSetup(
            run_id=self.run_id,
            peer=self.peer,
            node=socket.gethostname(),
            node_id=ray_node_id(),
            epochs=cfg.optim.epochs,
            model=model,
            optimizer=optimizer,
            scheduler=build_scheduler(optimizer, cfg.optim),
            train_loader=train_loader,
            test_loader=test_loader,
            sketch=ParameterSketch(sum(p.numel() for p in model.parameters()), cfg.metrics.sketch_dim, seed=cfg.seed),
            device=self.device,
            amp=cfg.optim.amp and on_gpu,
            channels_last=cfg.model.channels_last and on_gpu,
            checkpoint_dir=self.checkpoint_dir,
            checkpoint_uri=self.checkpoint_uri,
            restarts=self.restarts,
            identity=checkpoint_identity(cfg),  # recorded in its checkpoints, checked on resume
        )
        if cfg.resume_from is not None:
            resume(setup, cfg)  # parameters, optimizer, schedule, counters and RNG streams from the checkpoint
        return setup

    def _loaders(self, splits: Splits) -> tuple[DataLoader, DataLoader]:
        cfg = self.cfg
        # per-peer batch order; a restarted peer does not replay its predecessor's, a whole-set peer has its own
        order = secrets.randbits(32) if self.whole_set else cfg.seed * 1000 + self.peer + 7919 * self.restarts
        shuffle = torch.Generator().manual_seed(order)
        # a joiner (index >= peers) trains on the shard of peer `index % peers`, with its own order
        shard = peer_shard(splits, 0, 1, cfg.seed) if self.whole_set else peer_shard(splits, self.peer % cfg.peers,
                                                                                    cfg.peers, cfg.seed)  # fmt: skip
        workers = dict(num_workers=cfg.data.num_workers, pin_memory=self.device.type == "cuda")
        return (
            DataLoader(shard, batch_size=cfg.data.batch_size, shuffle=True, generator=shuffle, **workers),
            DataLoader(splits.test, batch_size=cfg.data.test_batch_size, **workers),
        )

    def start_dht(self, initial_peers: list[str]) -> list[str]:
        """Start this peer's DHT (bootstrapping off `initial_peers`) and averager; return its visible multiaddrs.
        With a network namespace they start inside it, and p2pd (started by the DHT's process) with them."""
        with self._in_netns():
            return self._start_dht(initial_peers)

    def _in_netns(self):
        """The body in this peer's network namespace (a no-op without one): what it forks and opens stays there."""
        if self.netns is None:
            return contextlib.nullcontext()
        os.environ["GLOO_SOCKET_IFNAME"] = self.netns.ifname  # else gloo binds to the host name's address, not there
        return inside(self.netns.namespace)

    def _start_dht(self, initial_peers: list[str]) -> list[str]:
        from workers.averaging.admission import SwarmKeyAuthorizer, publish_membership
        from workers.averaging.levers import Levers, start_dht

        quiet_hivemind()  # again: hivemind sets its loggers' levels when its modules are first imported
        offset = self.peer if self.port_offset else 0
        host_maddrs, announce_maddrs = dht_maddrs(self.cfg.network, offset)
        authorizer = SwarmKeyAuthorizer(self.swarm_key, self.anomalies) if self.swarm_key else None
        with naming_taken_port(self.cfg.network, offset):
            # the DHT's replication sized for the swarm where the lean DHT path uses it: gossip's rounds, sgp's live set
            swarm = self.most_peers() if self.cfg.gossip.method in (*GOSSIP_ROUNDS, "sgp") else None
            nat = self.cfg.network.nat_traversal  # (hivemind's defaults: all on)
            self.dht = start_dht(Levers.of(self.cfg.gossip), swarm, initial_peers=initial_peers,
                                 host_maddrs=host_maddrs, announce_maddrs=announce_maddrs, authorizer=authorizer,
                                 nat_port_map=nat, auto_nat=nat, use_relay=nat)  # fmt: skip
        if self.swarm_key:
            publish_membership(self.dht, self.run_id, self.swarm_key)
        self.averaging = self._hivemind_averaging()
        self._hivemind = [(proc, proc.name()) for proc in psutil.Process(os.getpid()).children(recursive=True)
                          if proc.name() != "torch_shm_manager"]  # fmt: skip
        return [str(addr) for addr in self.dht.get_visible_maddrs()]

    def most_peers(self) -> int | None:
        """The most peers the swarm can have: the run's peers and scripted joiners (None: an open swarm's, unknown)."""
        return None if self.whole_set else self.cfg.peers + self.cfg.joins

    def _hivemind_averaging(self) -> AveragingStrategy:
        gossip, setup = self.cfg.gossip, self.setup
        if gossip.method in GOSSIP_ROUNDS:
            rounds = DiLoCoAveraging if gossip.method == "diloco" else GossipAveraging
            return rounds(setup.model, self.dht, gossip, prefix=self.run_id, lock=setup.lock,
                          swarm_key=self.swarm_key, anomalies=self.anomalies,
                          swarm_size=self.most_peers())  # fmt: skip
        if gossip.method == "sgp":  # the epoch being trained: the round index of `every_steps: epoch`
            return SgpAveraging(setup.model, self.dht, gossip, prefix=self.run_id, lock=setup.lock,
                                swarm_key=self.swarm_key, anomalies=self.anomalies,
                                swarm_size=None if self.whole_set else self.cfg.peers,
                                epoch=lambda: self.setup.progress.epoch + 1)  # fmt: skip
        if gossip.method == "optimizer":
            swarm_epoch = train_set_size(self.cfg.data)  # the same target on every peer, whatever its shard
            averaging = OptimizerAveraging(setup.optimizer, self.dht, gossip, prefix=self.run_id,
                                           batch_size=self.cfg.data.batch_size,
                                           target_batch_size=gossip.target_batch_size or swarm_epoch,
                                           peers=self.cfg.peers, stop=self._stop, swarm_key=self.swarm_key,
                                           anomalies=self.anomalies)  # fmt: skip
            setup.optimizer = averaging.optimizer  # the loop steps hivemind.Optimizer, which steps ours
            return averaging
        return NoAveraging()

    def rendezvous_address(self) -> str:
        """A TCP address on this peer's node for torch.distributed's rendezvous (peer 0 provides it)."""
        with self._in_netns():  # a free port of the namespace's address
            return f"tcp://{announce_host(self.cfg.network)}:{peer_port(self.cfg.network, self.cfg.peers)}"

    def join_allreduce(self, address: str, rank: int, world_size: int) -> None:
        """Join the all-reduce baseline's process group as `rank` of `world_size`; blocks until every member has."""
        with self._in_netns():  # the rendezvous store and gloo's connections: on this peer's link
            self.averaging = AllReduceAveraging(self.setup.model, self.cfg.gossip, address, rank, world_size)

    def prepare(self, effects: Effects, donor: int | None) -> Joined:
        """A member of a group that restarts together (the all-reduce baseline's elastic restart): the state of
        `donor`'s checkpoint (None: its initial parameters) and the peer's scenario effects; it trains once the
        group has formed (`join_allreduce`, then `start_training`)."""
        started = time.monotonic()
        source = self.restore_state(self.state_timeout(), donor) if donor is not None else "fresh"
        self.apply_effects(effects)
        return Joined([], self.setup.progress.epoch + 1, source, time.monotonic() - started, self.process_ids())

    def join(self, initial_peers: list[str], effects: Effects, swarm_size: int, donor: int | None = None,
             gone: Sequence[str] = ()) -> Joined:  # fmt: skip
        """Join a running swarm: start the DHT off `initial_peers` (peers whose DHT is up), take the state (see
        `restore_state`), then train the rest of the run with the peer's scenario `effects`. `donor`: no peer's
        DHT was up, so this peer restarts the swarm from `donor`'s last checkpoint (`initial_peers` is empty).
        `gone`: the PeerIDs of the incarnations that died lately (`set_swarm_size`)."""
        started = time.monotonic()
        maddrs = self.start_dht(initial_peers)
        self.set_swarm_size(swarm_size, 0, gone)
        source = self.restore_state(self.state_timeout(), donor)
        self.apply_effects(effects)
        self.start_training()
        seconds = time.monotonic() - started
        return Joined(maddrs, self.setup.progress.epoch + 1, source, seconds, self.process_ids())

    def state_timeout(self) -> float:
        """How long a state download may take: this peer's state's bytes at the slowest emulated link's rate."""
        state_bytes = sum(t.numel() * t.element_size() for t in averaged_tensors(self.setup.model)) * 2  # + momentum
        return state_timeout_s(state_bytes, slowest_link_mbit(self.cfg.emulation))

    def restore_state(self, timeout: float, donor: int | None = None) -> str:
        """Where the newcomer's state comes from, said in the return value. A method whose peers share their state
        (gossip, DiLoCo, sgp): a live peer's (the swarm's current parameters, optimizer state, the method's own state
        and position in the run), or StateUnavailable (never its fresh initialisation, which would be averaged into
        a trained swarm); `donor`: that peer's last checkpoint (the swarm restarts from it). A method without
        shared state (`none`, `optimizer`, which catches up through hivemind): its own last checkpoint, or its fresh
        initialisation when it has none."""
        source = self._take_state(timeout, donor)
        self.setup.took_state()
        return source

    def _take_state(self, timeout: float, donor: int | None) -> str:
        if donor is not None:
            return self._resume_from(donor)
        if self.averaging.shares_state:
            downloaded = self.averaging.download_state(timeout)
            if downloaded is None:
                raise StateUnavailable(f"no live peer served its state within {timeout:.0f} s")
            metadata, tensors = downloaded
            self.averaging.load_method_state(apply_snapshot(self.setup, metadata, tensors, self.cfg.optim))
            return f"peer {metadata['peer']}"
        own = checkpoint_path(self.checkpoint_dir, self.peer, "final") if self.checkpoint_dir else None
        return self._resume_from(self.peer) if own is not None and own.is_file() else "fresh"

    def _resume_from(self, donor: int) -> str:
        if self.checkpoint_dir is None:
            raise StateUnavailable(f"no checkpoint folder to take peer {donor}'s checkpoint from")
        path = checkpoint_path(self.checkpoint_dir, donor, "final")
        if not path.is_file():
            raise StateUnavailable(f"peer {donor}'s checkpoint {path} is not on this node")
        load_training_state(self.setup, load_checkpoint(path), self.cfg, path)
        self.averaging.load_method_state(None)  # (DiLoCo: the last sync is the checkpoint's parameters)
        return f"checkpoint of peer {donor}"

    def start_training(self) -> None:
        self._state = "running"
        self._share_state()
        self.setup.last_progress = time.monotonic()
        self._thread = threading.Thread(target=self._train_thread, name=f"peer-{self.peer}-train", daemon=True)
        self._thread.start()

    def _share_state(self) -> None:
        """Serve this peer's state to newcomers, the most advanced peer first."""
        self.averaging.share_state(lambda: snapshot(self.setup, method_state=self.averaging.method_state),
                                   priority=lambda: self.setup.progress.step)  # fmt: skip

    def _train_thread(self) -> None:
        try:
            reloads, reported = 0, self._reported  # in a row: without an epoch reported in between
            while not self._train_unless_diverged():
                reloads, reported = (reloads + 1 if self._reported == reported else 1), self._reported
                if reloads >= MAX_RELOADS_IN_A_ROW:
                    raise Diverged(f"diverged {reloads} times in a row, each time right after reloading the swarm's "
                                   "state: it cannot train (restarted as after a death, then given up)")  # fmt: skip
            left = self.setup.leave_after is not None and self.setup.progress.epoch < self.setup.epochs
            state = "stopped" if self._stop.is_set() else "left" if left else "done"
            if stranded := UPLOADS.drain():  # the driver names what is missing in the storage at the run's end
                logger.error("peer %d: checkpoints not uploaded: %s", self.peer, ", ".join(map(str, stranded)))
        except Exception:
            self._error, state = traceback.format_exc(), "failed"
            logger.error("peer %d failed:\n%s", self.peer, self._error)
        self._state = state  # after its last report: a poll that sees it has every report in the outbox

    def _train_unless_diverged(self) -> bool:
        """Train to the end (True), or until the peer diverges: then it takes a live peer's state (False: train on
        from there), or stops (`faults.on_divergence: stop`, Diverged raised: the driver restarts it)."""
        try:
            for report in train(self.setup, self.averaging, self._stop):
                self._outbox.put(report)
                self._reported += 1
            return True
        except Diverged as err:
            self._outbox.put(PeerEvent("diverged", str(err)))
            if self.cfg.faults.on_divergence == "stop":
                raise
        self.averaging.withhold_state()  # nobody downloads what diverged
        self.averaging.drop_round()  # a round in flight carries the diverged trajectory: never applied
        try:
            source = self.restore_state(self.state_timeout())
        except StateUnavailable as err:
            raise Diverged(f"diverged, and it could not reload the swarm's state: {err}") from err
        if source == "fresh":
            raise Diverged("diverged, and neither a live peer nor a checkpoint had a state to reload")
        self._share_state()
        first = self.setup.progress.epoch + 1
        self._outbox.put(PeerEvent("reloaded", f"state from {source}, training on from epoch {first}", first))
        return False

    def apply_effects(self, effects: Effects) -> None:
        """The scenario's effects on this peer: a leave after an epoch, a slowdown, a learning-rate factor. With
        `resources.cap_cpu` a slowdown f is a slower machine: the peer's CPU quota divided by f (its steps, rounds
        and hivemind's processes alike); without it, each step is followed by a sleep of f - 1 times its length."""
        slowdown = effects.slowdown
        if self.cpu_group is not None:
            set_quota(self.cpu_group, self.cfg.resources.num_cpus / slowdown)
            slowdown = 1.0
        self.setup.leave_after, self.setup.slowdown, self.setup.lr_factor = (
            effects.leave_after, slowdown, effects.lr_factor)  # fmt: skip

    def set_swarm_size(self, peers: int, dht_nodes: int = 0, gone: Sequence[str] = ()) -> None:
        """How many peers the swarm has now: a group aims at that many (workers/averaging/gossip.py); `dht_nodes`:
        how many peers' DHTs are up (0: not known); `gone`: the PeerIDs of incarnations the driver saw die."""
        self.averaging.set_swarm_size(peers, dht_nodes, gone)

    def poll(self) -> PeerStatus:
        """Everything reported since the last poll, the current state and the heartbeat. Never waits on the
        training thread or on hivemind. The state is read before the outbox: the training thread sets it after its
        last report, so a poll that sees a final state also takes every report."""
        state = self._state
        outbox = drain(self._outbox)
        age = time.monotonic() - self.setup.last_progress if state == "running" else 0.0
        self._polls += 1
        return PeerStatus(self.peer, state, outbox, self._error, age, self.hivemind_error(), self.anomalies.take(),
                          self._live(), self._polls)  # fmt: skip

    def _live(self) -> LiveProgress:
        progress, stats = self.setup.progress, self.averaging.stats
        return LiveProgress(min(progress.epoch + 1, self.setup.epochs), progress.epoch_step, self.setup.epoch_steps,
                            progress.samples_seen, stats.ok, stats.failed)  # fmt: skip

    def hivemind_error(self) -> str | None:
        """Which of hivemind's processes (DHT, averager, p2pd) died since they started, if any: without them the
        peer cannot average and its rounds may hang."""
        for proc, name in self._hivemind:
            try:
                alive = proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                alive = False
            if not alive:
                return f"its hivemind process {name} (pid {proc.pid}) died"
        return None

    def checkpoint_bytes(self, kind: str = "final") -> bytes | None:
        """This peer's `peer-<i>_<kind>.pt` as bytes (the driver copies final models off remote nodes)."""
        if self.checkpoint_dir is None:
            return None
        path = checkpoint_path(self.checkpoint_dir, self.peer, kind)
        return path.read_bytes() if path.exists() else None

    def process_ids(self) -> list[tuple[int, float]]:
        """(pid, create time) of this process, then of hivemind's: the DHT process first, then the others (averager,
        p2pd); to reap what a killed peer leaves behind."""
        dht_pid = self.dht.pid if self.dht is not None else None
        dht_first = sorted((proc for proc, _ in self._hivemind), key=lambda proc: proc.pid != dht_pid)
        procs = [psutil.Process(os.getpid())] + dht_first
        return [(proc.pid, proc.create_time()) for proc in procs]

    def stop(self, timeout: float = 30.0) -> None:
        """Stop training and shut hivemind down (its processes and p2pd daemons with it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.averaging.shutdown()
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None
        # hivemind's p2pd has no parent-death signal: whatever of it outlived the shutdown is killed here
        _, alive = psutil.wait_procs([proc for proc, _ in self._hivemind], timeout=3)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


def drain(items: queue.Queue) -> list:
    taken = []
    while True:
        try:
            taken.append(items.get_nowait())
        except queue.Empty:
            return taken


_DIE_WITH_PARENT: list[bool] = []


def children_die_with_this_process() -> None:
    """Every Python process forked from this one from now on (hivemind's DHT and averager) gets SIGKILL when this
    process dies. Without it a peer killed with SIGKILL leaves them running, and since they inherited its
    connection to Ray's raylet, Ray would not even notice the peer's death until they went. Linux only."""
    if _DIE_WITH_PARENT or not sys.platform.startswith("linux"):
        return
    _DIE_WITH_PARENT.append(True)
    os.register_at_fork(after_in_child=_set_parent_death_signal)


def _set_parent_death_signal() -> None:
    import ctypes

    parent = os.getppid()
    PR_SET_PDEATHSIG = 1  # noqa: N806 (linux/prctl.h)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the prctl: nobody would send the signal
        os._exit(1)


def quiet_hivemind() -> None:
    """hivemind logs every retry at INFO/WARNING with tracebacks; keep its errors, count failures ourselves."""
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)
    logging.getLogger("hivemind").setLevel(logging.ERROR)
    # ...but show rounds that lost part of their all-reduce, which hivemind otherwise reports as a success
    logging.getLogger("hivemind.averaging.partition").setLevel(logging.WARNING)
    logging.getLogger("workers").setLevel(logging.INFO)
