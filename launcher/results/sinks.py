"""Where a run's epochs go besides metrics.csv: TensorBoard event files, MLflow, and a Ray Tune trial's reports.

Each sink takes one complete epoch at a time (every live peer's row) and is closed once at the end; the driver's
RunFiles feeds them all the same rows, so a Tune trial or a plain run is the same code with one more sink.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Protocol

from workers.core.config import ExperimentConfig, flatten_keys
from workers.core.metrics import MetricsRow

logger = logging.getLogger("launcher")

PEER_SERIES = ("test_acc", "test_loss", "train_acc", "train_loss", "samples_per_s", "averaging_rounds_ok",
               "averaging_bytes")  # fmt: skip


class Sink(Protocol):
    def epoch(self, rows: list[MetricsRow]) -> None: ...

    def close(self, status: str) -> None: ...  # status: FINISHED, FAILED or KILLED


def swarm_scalars(rows: list[MetricsRow]) -> dict[str, float]:
    """The swarm's view of one epoch: mean test accuracy and loss, the spread of accuracy over peers, consensus."""
    accs = [r.test_acc for r in rows]
    return {
        "test_acc_mean": sum(accs) / len(accs),
        "test_acc_spread": max(accs) - min(accs),
        "test_loss_mean": sum(r.test_loss for r in rows) / len(rows),
        "consensus_dist": rows[0].consensus_dist,
        "peers": float(len(rows)),
    }


class ScalarWriter:
    """TensorBoard's event files written with the tensorboard package's own writer and protos (what torch's
    SummaryWriter does for scalars, without importing torch into the driver)."""

    def __init__(self, folder: Path):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter  # slow to import: only when used

        self._file = EventFileWriter(str(folder), flush_secs=10)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(value))])
        self._file.add_event(Event(wall_time=time.time(), step=int(step), summary=summary))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardSink:
    """run_dir/tensorboard/peer-<i>/ (one series per peer) and .../swarm/: `tensorboard --logdir` overlays the peers
    on each tag's chart, and over a sweep folder shows its runs side by side."""

    def __init__(self, run_dir: Path):
        self.folder = run_dir / "tensorboard"
        self._writers: dict[str, ScalarWriter] = {}

    def _for(self, name: str) -> ScalarWriter:
        if name not in self._writers:
            self._writers[name] = ScalarWriter(self.folder / name)
        return self._writers[name]

    def epoch(self, rows: list[MetricsRow]) -> None:
        epoch = rows[0].epoch
        for row in rows:
            writer = self._for(f"peer-{row.peer}")
            for tag in PEER_SERIES:
                value = getattr(row, tag)
                if not math.isnan(value):
                    writer.add_scalar(tag, value, epoch)
            writer.flush()
        swarm = self._for("swarm")
        for tag, value in swarm_scalars(rows).items():
            if not math.isnan(value):
                swarm.add_scalar(tag, value, epoch)
        swarm.flush()

    def close(self, status: str) -> None:
        for writer in self._writers.values():
            writer.close()


class MlflowSink:
    """One MLflow run per experiment run: the config as parameters (dotted keys), per epoch the swarm's scalars and
    each peer's accuracy and loss. The tracking URI is MLFLOW_TRACKING_URI, else a SQLite file in the results folder
    (MLflow 3 refuses its `file:` store unless MLFLOW_ALLOW_FILE_STORE=true)."""

    def __init__(self, cfg: ExperimentConfig, run_id: str, out_dir: Path):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out_dir / 'mlflow.db'}"
        self.client = MlflowClient(self.uri)
        found = self.client.get_experiment_by_name(cfg.name)
        experiment = found.experiment_id if found else self.client.create_experiment(cfg.name)
        self.run = self.client.create_run(experiment, run_name=run_id).info.run_id
        params = [Param(k, str(v)[:500]) for k, v in flatten_keys(cfg.model_dump(mode="json")).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run, params=params[start : start + 100])
        logger.info("mlflow: run %s in experiment %r at %s", self.run, cfg.name, self.uri)

    def epoch(self, rows: list[MetricsRow]) -> None:
        from mlflow.entities import Metric

        stamp, epoch = int(time.time() * 1000), rows[0].epoch
        per_peer = {f"peer{r.peer}_{key}": getattr(r, key) for r in rows for key in ("test_acc", "test_loss")}
        values = swarm_scalars(rows) | per_peer
        metrics = [Metric(k, v, stamp, epoch) for k, v in values.items() if not math.isnan(v)]
        self.client.log_batch(self.run, metrics=metrics)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run, status)


class TuneSink:
    """Inside a Ray Tune trial: one `tune.report` per epoch (the swarm's scalars, the run folder's name), which Tune's
    search and early stopping read, and which becomes the sweep's results table."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def epoch(self, rows: list[MetricsRow]) -> None:
        from ray import tune

        scalars = swarm_scalars(rows)
        tune.report({"epoch": rows[0].epoch, "test_acc": scalars["test_acc_mean"],
                     "test_loss": scalars["test_loss_mean"], **scalars, "run_dir": self.run_dir.name})  # fmt: skip

    def close(self, status: str) -> None:
        pass


def in_tune_trial() -> bool:
    from ray.tune import get_context

    with warnings.catch_warnings():  # outside a trial Tune warns that it is outside one: that is the question
        warnings.simplefilter("ignore")
        return get_context().get_trial_id() is not None


def run_sinks(cfg: ExperimentConfig, run_id: str, run_dir: Path) -> list[Sink]:
    sinks: list[Sink] = [TensorBoardSink(run_dir)] if cfg.metrics.tensorboard else []
    if cfg.metrics.tracking == "mlflow":
        sinks.append(MlflowSink(cfg, run_id, run_dir.parent))
    if in_tune_trial():
        sinks.append(TuneSink(run_dir))
    return sinks
