"""One hivemind peer: DHT, averaging strategy, data shard, model, and the training loop in a thread.

The class knows nothing of Ray: the launcher wraps it in a Ray actor, `python -m workers` runs it in the
foreground. The driver calls `start_dht`, then `start_training`, then polls; every call returns quickly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from torch.utils.data import DataLoader

from workers.averaging import AllReduceAveraging, GossipAveraging, NoAveraging, OptimizerAveraging
from workers.checkpoint import checkpoint_identity, checkpoint_path, resume
from workers.config import ExperimentConfig, train_set_size
from workers.data import Splits, load_dataset, peer_shard
from workers.models import build_model
from workers.network import announce_host, dht_maddrs, peer_port, ray_node_id
from workers.schedule import build_scheduler
from workers.sketch import ParameterSketch
from workers.train import Report, TrainSetup, train

logger = logging.getLogger(__name__)


@dataclass
class PeerStatus:
    peer: int
    state: str  # "ready" | "running" | "done" | "failed" | "stopped"
    reports: list[Report] = field(default_factory=list)
    error: str | None = None


class Peer:
    def __init__(self, cfg: ExperimentConfig, peer: int, run_id: str, checkpoint_dir: str | Path | None = None,
                 port_offset: bool = True):  # fmt: skip
        """`checkpoint_dir`: where this peer writes peer-<i>_{best,final}.pt (the driver passes `cfg.checkpoint_dir`
        or the run folder); None means `cfg.checkpoint_dir`, and no checkpoints when that is unset too.
        `port_offset`: listen on `network.port + peer` (Ray peers, which may share a node) or on `network.port`."""
        quiet_hivemind()
        self.cfg, self.peer, self.run_id, self.port_offset = cfg, peer, run_id, port_offset
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else cfg.checkpoint_dir
        torch.set_num_threads(max(1, int(cfg.resources.num_cpus)))
        self.device = torch.device("cuda" if cfg.resources.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        self.setup = self._build_setup()
        self.dht = None
        self.averaging: NoAveraging = NoAveraging()
        self._reports: queue.Queue[Report] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state, self._error = "ready", None

    def _build_setup(self) -> TrainSetup:
        cfg, on_gpu = self.cfg, self.device.type == "cuda"
        splits = load_dataset(cfg.data)
        torch.manual_seed(cfg.seed)  # every peer starts from the same initial parameters
        model = build_model(cfg.model, splits.num_classes, splits.input_shape).to(self.device)
        if cfg.model.channels_last and on_gpu:
            model = model.to(memory_format=torch.channels_last)
        if cfg.optim.amp and not on_gpu:
            logger.info("peer %d: optim.amp is ignored on CPU (bf16 autocast is used on CUDA only)", self.peer)
        optimizer = torch.optim.SGD(
            model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay
        )
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
            identity=checkpoint_identity(cfg),  # recorded in its checkpoints, checked on resume
        )
        if cfg.resume_from is not None:
            resume(setup, cfg)  # parameters, optimizer, schedule, counters and RNG streams from the checkpoint
        return setup

    def _loaders(self, splits: Splits) -> tuple[DataLoader, DataLoader]:
        cfg = self.cfg
        shuffle = torch.Generator().manual_seed(cfg.seed * 1000 + self.peer)  # per-peer batch order
        shard = peer_shard(splits, self.peer, cfg.peers, cfg.seed)
        workers = dict(num_workers=cfg.data.num_workers, pin_memory=self.device.type == "cuda")
        return (
            DataLoader(shard, batch_size=cfg.data.batch_size, shuffle=True, generator=shuffle, **workers),
            DataLoader(splits.test, batch_size=cfg.data.test_batch_size, **workers),
        )

    def start_dht(self, initial_peers: list[str]) -> list[str]:
        """Start this peer's DHT (bootstrapping off `initial_peers`) and averager; return its visible multiaddrs."""
        import hivemind

        host_maddrs, announce_maddrs = dht_maddrs(self.cfg.network, self.peer if self.port_offset else 0)
        self.dht = hivemind.DHT(
            initial_peers=initial_peers, host_maddrs=host_maddrs, announce_maddrs=announce_maddrs, start=True
        )
        self.averaging = self._hivemind_averaging()
        return [str(addr) for addr in self.dht.get_visible_maddrs()]

    def _hivemind_averaging(self) -> NoAveraging:
        gossip, setup = self.cfg.gossip, self.setup
        if gossip.method == "gossip":
            return GossipAveraging(setup.model, self.dht, gossip, prefix=self.run_id)
        if gossip.method == "optimizer":
            swarm_epoch = train_set_size(self.cfg.data)  # the same target on every peer, whatever its shard
            averaging = OptimizerAveraging(setup.optimizer, self.dht, gossip, prefix=self.run_id,
                                           batch_size=self.cfg.data.batch_size,
                                           target_batch_size=gossip.target_batch_size or swarm_epoch,
                                           peers=self.cfg.peers, stop=self._stop)  # fmt: skip
            setup.optimizer = averaging.optimizer  # the loop steps hivemind.Optimizer, which steps ours
            return averaging
        return NoAveraging()

    def rendezvous_address(self) -> str:
        """A TCP address on this peer's node for torch.distributed's rendezvous (peer 0 provides it)."""
        return f"tcp://{announce_host(self.cfg.network)}:{peer_port(self.cfg.network, self.cfg.peers)}"

    def join_allreduce(self, address: str) -> None:
        """Join the all-reduce baseline's process group; blocks until every peer has joined."""
        self.averaging = AllReduceAveraging(self.setup.model, self.cfg.gossip, address, self.peer, self.cfg.peers)

    def start_training(self) -> None:
        self._state = "running"
        self._thread = threading.Thread(target=self._train_thread, name=f"peer-{self.peer}-train", daemon=True)
        self._thread.start()

    def _train_thread(self) -> None:
        try:
            for report in train(self.setup, self.averaging, self._stop):
                self._reports.put(report)
            self._state = "stopped" if self._stop.is_set() else "done"
        except Exception:
            self._error, self._state = traceback.format_exc(), "failed"
            logger.error("peer %d failed:\n%s", self.peer, self._error)

    def poll(self) -> PeerStatus:
        """Everything reported since the last poll, and the current state."""
        reports = []
        while True:
            try:
                reports.append(self._reports.get_nowait())
            except queue.Empty:
                break
        return PeerStatus(self.peer, self._state, reports, self._error)

    def checkpoint_bytes(self, kind: str = "final") -> bytes | None:
        """This peer's `peer-<i>_<kind>.pt` as bytes (the driver copies final models off remote nodes)."""
        if self.checkpoint_dir is None:
            return None
        path = checkpoint_path(self.checkpoint_dir, self.peer, kind)
        return path.read_bytes() if path.exists() else None

    def process_ids(self) -> list[int]:
        """This process's descendants (hivemind's DHT and averager processes, p2pd): reaped if left behind."""
        return [child.pid for child in psutil.Process(os.getpid()).children(recursive=True)]

    def stop(self, timeout: float = 30.0) -> None:
        """Stop training and shut hivemind down (its processes and p2pd daemons with it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.averaging.shutdown()
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None
        # hivemind's p2pd has no parent-death signal: whatever of it outlived the shutdown is killed here, on the
        # peer's own node (the driver can reap only the processes of its own node)
        leftovers = psutil.Process(os.getpid()).children(recursive=True)
        _, alive = psutil.wait_procs(leftovers, timeout=3)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


def quiet_hivemind() -> None:
    """hivemind logs every retry at INFO/WARNING with tracebacks; keep its errors, count failures ourselves."""
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)
    logging.getLogger("hivemind").setLevel(logging.ERROR)
    # ...but show rounds that lost part of their all-reduce, which hivemind otherwise reports as a success
    logging.getLogger("hivemind.averaging.partition").setLevel(logging.WARNING)
    logging.getLogger("workers").setLevel(logging.INFO)
