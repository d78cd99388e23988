"""Per-peer checkpoints, written atomically, and resuming a peer from one.

Each peer keeps two files in its run's checkpoint folder (`run_checkpoint_dir`): `peer-<i>_final.pt`, rewritten after
every epoch (so a run that is stopped or crashes can be resumed from its last completed epoch; after a normal end it is
the final state), and `peer-<i>_best.pt`, rewritten whenever the peer's test accuracy improves. Both hold everything a
resume needs: model, optimizer, scheduler, the training counters (`Progress`), that epoch's metrics row, the RNG
states, and the config's identity (`IDENTITY`): a resume with another swarm or other data is refused.

Importing this module loads no torch (torch and numpy are imported inside the functions that need them), so the
CLI can call `check_resume` right after loading the config, before Ray starts, as it calls `check_data`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import random
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.core.config import ExperimentConfig
from workers.core.errors import ConfigError
from workers.core.metrics import MetricsRow
from workers.core.storage import fetch, is_remote, join, upload_file

if TYPE_CHECKING:  # (a type only: importing the setup's module would load torch)
    from workers.peer.setup import TrainSetup

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: checkpoints record the config's identity
RESUME_KEYS = ("progress", "model", "optimizer", "scheduler", "rng")  # what `resume` reads
# What a resumed peer must share with the run that wrote its checkpoint: which samples it trains on (the swarm's size,
# the seed, the data and its split among the peers) and the parameters' shapes. Other settings may change on resume.
IDENTITY = ("peers", "seed", "data.dataset", "data.partition", "data.dirichlet_alpha", "data.test_fraction",
            "model.name")  # fmt: skip


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from: truncated, corrupt, not plain data, or missing what a resume needs.
    A ConfigError: the CLI reports it (exit 2) before Ray starts."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. a full disk); the previous file at that path is left as it was."""


def checkpoint_path(folder: str | Path, peer: int, kind: str) -> Path:
    """`kind` is "best" or "final"."""
    return Path(folder).expanduser() / f"peer-{peer}_{kind}.pt"


def run_checkpoint_dir(cfg: ExperimentConfig, run_id: str, run_dir: str | Path) -> Path:
    """Where a run's peers write their checkpoints: `<checkpoint_dir>/<run_id>/`, so that the runs of a sweep (or any
    two runs) keep their own files, or the run folder itself when `checkpoint_dir` is unset."""
    folder = Path(cfg.checkpoint_dir) / run_id if cfg.checkpoint_dir is not None else Path(run_dir)
    return folder.expanduser().resolve()


def checkpoint_identity(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config's `IDENTITY` fields, by dotted name."""
    tree = cfg.model_dump(mode="json")
    identity = {}
    for key in IDENTITY:
        node = tree
        for part in key.split("."):
            node = node[part]
        identity[key] = node
    return identity


def check_identity(saved: dict[str, Any] | None, cfg: ExperimentConfig, path: Path) -> None:
    """Raise ConfigError naming each field where the checkpoint's run and `cfg` differ."""
    if not saved:  # None: written before format 2; {}: by a peer that was not given the config's identity
        logger.warning("%s does not record the config it was written with: resuming it unchecked", path)
        return
    current = checkpoint_identity(cfg)
    differ = [f"{key}={saved[key]!r} there, {key}={current[key]!r} here" for key in current
              if key in saved and saved[key] != current[key]]  # fmt: skip
    if differ:
        raise ConfigError(
            f"resume_from={str(cfg.resume_from)!r}: {path.name} was written by another swarm or data ("
            f"{'; '.join(differ)}); a resumed peer must train the same shard of the same data with the same model"
        )


def check_resume(cfg: ExperimentConfig) -> None:
    """Raise ConfigError unless `cfg.resume_from` holds a final checkpoint for every peer, written with this config's
    identity (or is unset)."""
    if cfg.resume_from is None:
        return
    folder = resume_dir(cfg.resume_from, list(range(cfg.peers)), refresh=True)
    paths = [checkpoint_path(folder, peer, "final") for peer in range(cfg.peers)]
    missing = [_shown(cfg.resume_from, path) for path in paths if not path.is_file()]
    if missing:
        raise ConfigError(
            f"resume_from={str(cfg.resume_from)!r}: no checkpoint for {len(missing)} of peers={cfg.peers} "
            f"(missing: {', '.join(missing)}); expected a previous run's folder (or <checkpoint_dir>/<run-id>) "
            f"holding peer-<i>_final.pt for each peer{_runs_inside(folder.expanduser())}"
        )
    for path in paths:  # one at a time: a run's checkpoints together may not fit in memory
        check_identity(check_checkpoint(path).get("identity"), cfg, path)


def resume_dir(resume_from: str | Path, peers: list[int], refresh: bool) -> Path:
    """The local folder to resume from: `resume_from` itself, or for a storage URI its staging folder, with the
    peers' final and best checkpoints downloaded into it (all of them when `refresh`, else those not there yet:
    the driver's check downloads them, the peers on its node find them there, those on other nodes fetch their own)."""
    if not is_remote(resume_from):
        return Path(resume_from)
    names = [checkpoint_path("", peer, kind).name for peer in peers for kind in ("final", "best")]
    try:
        folder, _ = fetch(str(resume_from), names, refresh)
    except OSError as err:
        raise ConfigError(f"resume_from={str(resume_from)!r}: cannot be read: {err}") from None
    return folder


def _shown(resume_from: str | Path, path: Path) -> str:
    return join(str(resume_from), path.name) if is_remote(resume_from) else str(path.resolve())


def check_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at `path`; CheckpointError naming it unless it loads as plain data and holds what a resume
    reads."""
    state = load_checkpoint(path)
    missing = [key for key in RESUME_KEYS if key not in state] if isinstance(state, dict) else list(RESUME_KEYS)
    if missing:
        raise CheckpointError(f"{path.resolve()}: not a gossip-launch checkpoint: it lacks {', '.join(missing)}")
    return state


def _runs_inside(folder: Path) -> str:
    """A hint when `folder` is a checkpoint_dir, which holds one folder per run."""
    if not folder.is_dir():
        return ""
    runs = sorted(p.name for p in folder.iterdir() if checkpoint_path(p, 0, "final").is_file())
    return f"; it holds the checkpoint folders of runs {', '.join(runs)}: resume from one of those" if runs else ""


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`: a reader (or a resume
    after a crash) sees the old file or the new one, never half of one."""
    import torch

    _atomic_write(path, lambda file: torch.save(obj, file))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """`data` into `path`, atomically (see `atomic_save`)."""
    _atomic_write(path, lambda file: file.write(data))


def _atomic_write(path: Path, write) -> None:
    """On any failure the temporary file is removed and `path` keeps its previous content; an OSError (a full disk,
    a read-only or vanished folder) becomes a CheckpointWriteError naming `path`."""
    temp, sink = None, None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(handle, "wb") as file:
            sink = _KeepsWriteError(file)
            write(sink)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
        temp = None
        _fsync_folder(path.parent)  # makes the rename itself durable
    except BaseException as err:
        if temp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        cause = (sink.error if sink else None) or err
        if isinstance(cause, OSError):
            raise CheckpointWriteError(f"could not write {path}: {cause}") from cause
        raise


class _KeepsWriteError:
    """A file whose failed write is remembered: torch.save reports an OSError of the file (ENOSPC) only as a
    RuntimeError("unexpected pos ..."), which would hide that the disk is full."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


def _fsync_folder(folder: Path) -> None:
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Tensors come back on the CPU; `weights_only` refuses anything but plain data (a checkpoint runs no code).
    A file that cannot be loaded raises CheckpointError naming it."""
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path.resolve()}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only's refusal, made before anything in the file runs
        raise CheckpointError(
            f"{path.resolve()}: refused without running anything: not a plain-data checkpoint "
            f"({_unpickler_reason(err)}); a file that holds code, or a damaged one, cannot be resumed from"
        ) from None
    except Exception as err:  # torch raises RuntimeError, EOFError, KeyError... for a cut or damaged file
        reason = f"{type(err).__name__}: {str(err).split('. ')[0]}".rstrip(": ")
        raise CheckpointError(
            f"{path.resolve()}: cannot be loaded, the file is truncated or corrupt ({reason})"
        ) from err


def _unpickler_reason(err: Exception) -> str:
    """What torch refused, without its advice on how to load the file anyway (weights_only=False, allowlists)."""
    text = str(err)
    if found := re.search(r"GLOBAL ([\w.]+)", text):
        return f"it would call or build {found[1]}"
    if found := re.search(r"WeightsUnpickler error:\s*([^\n]+)", text):
        return found[1].strip().rstrip(".")
    return "torch.load(weights_only=True) refused it"


def save_epoch(setup: TrainSetup, row: MetricsRow, improved: bool) -> None:
    """After an epoch (its scheduler step done): rewrite `final`, and `best` when the test accuracy improved."""
    if setup.checkpoint_dir is None:
        return
    state = training_state(setup, row)
    for kind in ("final", "best") if improved else ("final",):
        path = checkpoint_path(setup.checkpoint_dir, setup.peer, kind)
        atomic_save(state, path)
        upload_checkpoint(path, setup.checkpoint_uri)


UPLOAD_DRAIN_S = 30.0  # how long a peer's end waits for its checkpoints' uploads still pending


class Uploads:
    """This process's checkpoint uploads, off the training thread: a save hands its file over and training goes on;
    a background thread uploads the newest version of each, retrying with a growing pause (a storage that is down
    costs the training nothing). At the peer's end `drain` waits for what is pending (the driver checks at the
    run's end that every checkpoint reached the storage, and names what did not)."""

    def __init__(self) -> None:
        self.pending: dict[Path, str] = {}  # file -> its folder URI
        self.changed = threading.Condition()
        self.thread: threading.Thread | None = None

    def add(self, path: Path, folder_uri: str) -> None:
        with self.changed:
            self.pending[path] = folder_uri
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="checkpoint-uploads", daemon=True)
                self.thread.start()
            self.changed.notify_all()

    def _run(self) -> None:
        pause = 1.0
        while True:
            with self.changed:
                while not self.pending:
                    self.changed.wait()
                path, folder = next(iter(self.pending.items()))
            try:
                upload_file(path, join(folder, path.name))
            except OSError as err:
                logger.error("could not upload %s to %s (tried again in %.0f s): %s", path, folder, pause, err)
                time.sleep(pause)
                pause = min(2 * pause, 30.0)
                continue
            pause = 1.0
            with self.changed:
                if self.pending.get(path) == folder:  # (a newer save of the same file is uploaded next)
                    del self.pending[path]
                self.changed.notify_all()

    def drain(self, timeout: float = UPLOAD_DRAIN_S) -> list[Path]:
        """Wait up to `timeout` for the pending uploads; the files still not uploaded."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while self.pending and time.monotonic() < deadline:
                self.changed.wait(deadline - time.monotonic())
            return sorted(self.pending)


UPLOADS = Uploads()


def upload_checkpoint(path: Path, folder_uri: str | None) -> None:
    """Copy a checkpoint just saved to the storage folder `folder_uri` (None: results are local, nothing to do), in
    the background (`Uploads`): no checkpoint stays stranded on a node's disk."""
    if folder_uri is not None:
        UPLOADS.add(path, folder_uri)


def training_state(setup: TrainSetup, row: MetricsRow) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "run_id": setup.run_id,
        "identity": setup.identity,
        "peer": setup.peer,
        "progress": dataclasses.asdict(setup.progress),
        "metrics": dataclasses.asdict(row),
        "model": setup.model.state_dict(),
        "optimizer": setup.scheduler.optimizer.state_dict(),  # the torch optimizer, even when a wrapper steps it
        "scheduler": setup.scheduler.state_dict(),
        "rng": rng_state(setup),
    }


def resume(setup: TrainSetup, cfg: ExperimentConfig) -> None:
    """Load this peer's final checkpoint from `cfg.resume_from` into a freshly built `setup`."""
    path = checkpoint_path(resume_dir(cfg.resume_from, [setup.peer], refresh=False), setup.peer, "final")
    state = load_checkpoint(path)
    check_identity(state.get("identity"), cfg, path)
    if state["progress"]["epoch"] >= cfg.optim.epochs:
        raise ConfigError(
            f"resume_from={str(cfg.resume_from)!r}: {path.name} has finished epoch {state['progress']['epoch']}, and "
            f"optim.epochs={cfg.optim.epochs} (the total) leaves nothing to train; raise optim.epochs"
        )
    load_training_state(setup, state, cfg, path)
    _carry_best(path.parent, setup)


def load_training_state(setup: TrainSetup, state: dict[str, Any], cfg: ExperimentConfig, path: Path) -> None:
    """A checkpoint's parameters, optimizer, schedule, counters and RNG streams into a freshly built `setup` (this
    peer's own, or another peer's when a dead swarm restarts from its newest checkpoint)."""
    from workers.peer.schedule import resume_schedule

    check_identity(state.get("identity"), cfg, path)
    progress = dataclasses.replace(setup.progress, **state["progress"])
    try:
        setup.model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise ConfigError(f"{path}: its parameters do not fit model.name={cfg.model.name!r}: {err}") from err
    setup.scheduler.optimizer.load_state_dict(state["optimizer"])
    resume_schedule(setup.scheduler.optimizer, setup.scheduler, state["scheduler"], cfg.optim)
    setup.progress = progress
    restore_rng(setup, state["rng"])
    logger.info("peer %d: resumed from %s at epoch %d, step %d", setup.peer, path, progress.epoch, progress.step)


def _carry_best(source: Path, setup: TrainSetup) -> None:
    """Copy the previous run's best checkpoint into this run's folder: the resumed run writes `best` only when it
    beats that accuracy, and its folder should hold the best model so far either way."""
    if setup.checkpoint_dir is None:
        return
    best = checkpoint_path(source, setup.peer, "best")
    target = checkpoint_path(setup.checkpoint_dir, setup.peer, "best")
    if best.is_file() and best.resolve() != target.resolve():
        atomic_save(load_checkpoint(best), target)
        upload_checkpoint(target, setup.checkpoint_uri)


def rng_state(setup: TrainSetup) -> dict[str, Any]:
    """Every random stream training draws from: torch's (dropout, augmentation), CUDA's, the shard's shuffle order,
    numpy's and Python's. numpy's key is stored as a tensor so the file loads with `weights_only`."""
    import numpy as np
    import torch

    numpy_state = np.random.get_state(legacy=False)  # {"state": {"key": uint32 array, "pos": int}, ...}
    numpy_key = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if setup.device.type == "cuda" else None,
        "shuffle": setup.train_loader.generator.get_state(),
        "numpy": {**numpy_state, "state": {**numpy_state["state"], "key": numpy_key}},
        "python": random.getstate(),
    }


def restore_rng(setup: TrainSetup, rng: dict[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and setup.device.type == "cuda":
        torch.cuda.set_rng_state_all(rng["cuda"][: torch.cuda.device_count()])
    setup.train_loader.generator.set_state(rng["shuffle"])
    numpy_state = rng["numpy"]
    key = numpy_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state({**numpy_state, "state": {**numpy_state["state"], "key": key}})
    random.setstate(rng["python"])
