"""The one results schema: a metrics row per peer per evaluation (long format). Each column is defined here once, with
what it means, its unit, where its value comes from and how it accumulates; the CSV header, `summary`, `analyze` and
docs/metrics.md (generated: `python -m workers.core.metrics`) all read these definitions."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def column(meaning: str, unit: str = "", source: str = "measured", scope: str = "at this row", **kwargs: Any) -> Any:
    """A column's definition. `source`: measured (on this peer or the wire), modelled (computed from a model of what
    is not measured), the run's (its identity), or the driver's (filled in over all peers). `scope`: at this row
    (a state), this epoch (since the previous row), or cumulative (since the incarnation started)."""
    return field(metadata={"meaning": meaning, "unit": unit, "source": source, "scope": scope}, **kwargs)


@dataclass
class MetricsRow:
    run_id: str = column("the run's id (its folder's name)", source="the run's")
    peer: int = column("the peer's index (joiners come after the initial peers)", source="the run's")
    epoch: int = column("epochs completed when this row was measured, 1-based", scope="cumulative")
    step: int = column("local optimizer steps so far", scope="cumulative")
    samples_seen: int = column("training samples this peer has processed so far", "samples", scope="cumulative")
    wall_time_s: float = column("seconds of training so far (the runs before a resume included; a restarted or "
                                "joining peer continues its donor's)", "s", scope="cumulative")  # fmt: skip
    train_loss: float = column("mean training loss over this epoch's batches", scope="this epoch")
    train_acc: float = column("mean training accuracy over this epoch's batches", scope="this epoch")
    test_loss: float = column("loss on the whole test split, with this peer's own parameters")
    test_acc: float = column("accuracy on the whole test split, with this peer's own parameters")
    samples_per_s: float = column("this epoch's training throughput: its samples / (train_s + averaging_seconds), "
                                  "the evaluation not counted", "samples/s", scope="this epoch")  # fmt: skip
    train_s: float = column("seconds of local training (data, forward, backward, optimizer steps), averaging not "
                            "included", "s", scope="this epoch")  # fmt: skip
    eval_s: float = column("seconds of the test-set evaluation", "s", scope="this epoch")
    averaging_rounds_ok: int = column("averaging rounds that succeeded (every part averaged; sgp: a send its target "
                                     "accepted)", scope="cumulative")  # fmt: skip
    averaging_rounds_failed: int = column("averaging rounds that failed (no group in time, an error, a timeout; sgp: a "
                                          "send not delivered, or a round that sent nothing; a round a diverged peer "
                                          "skipped is no round)", scope="cumulative")  # fmt: skip
    averaging_group_size: float = column("mean size of the groups of the rounds that succeeded (empty: none did; sgp: "
                                         "2, a sender and its target)", "peers", scope="this epoch")  # fmt: skip
    averaging_seconds: float = column("seconds the training thread spent in (or waiting for) averaging rounds",
                                      "s", scope="this epoch")  # fmt: skip
    averaging_bytes: float = column("bytes through this peer's averaging: hivemind's parts in and averaged parts "
                                    "out (summed over the peers: the swarm's traffic); the all-reduce ring's "
                                    "2(n-1)/n of the tensors; sgp: the messages this peer sent; empty where unknown",
                                    "bytes", source="see bytes_source", scope="this epoch", default=0)  # fmt: skip
    bytes_source: str = column("where averaging_bytes comes from: measured (counted on the wire) or modelled (gloo "
                               "counts no bytes: the all-reduce baseline, and gossip's rounds on gloo, whose "
                               "matchmade rounds are still counted)", source="the method's",
                               default="measured")  # fmt: skip
    averaging_rounds_partial: int = column("rounds that ran but whose all-reduce lost a part (a reducer or a sender "
                                           "failed): neither ok nor failed", scope="cumulative", default=0)  # fmt: skip
    messages_received: int = column("sgp: push-sum messages this peer added to its parameters (its own mass coming "
                                    "back from an undelivered send not counted); 0 for the other methods",
                                    scope="this epoch", default=0)  # fmt: skip
    messages_dropped: int = column("sgp: push-sum messages addressed to this peer that it refused: a stranger's, one "
                                   "that is malformed or not finite, one more than 2 rounds late (or 16 early), or one "
                                   "that came while this peer was outside the graph; 0 for the other methods",
                                   scope="this epoch", default=0)  # fmt: skip
    consensus_dist: float = column("the swarm's distance from consensus, sqrt(mean_i ||theta_i - mean||^2) over the "
                                   "peers that reported this epoch (the same on each of their rows)",
                                   source="the driver's", default=math.nan)  # fmt: skip
    consensus_before: float = column("the same distance as each peer's last round of the epoch started (the drift it "
                                     "repaired); empty without a round", source="the driver's",
                                     default=math.nan)  # fmt: skip
    consensus_peers: int = column("how many peers' parameters consensus_dist covers", source="the driver's",
                                  default=0)  # fmt: skip
    node: str = column("host name of the machine the peer ran on", source="the run's", default="")
    node_id: str = column("the Ray node the peer ran on (empty without Ray)", source="the run's", default="")
    restarts: int = column("the peer's incarnation: how many times it was restarted before this row",
                           source="the run's", default=0)  # fmt: skip
    run_time_s: float = column("seconds since every peer started training, on the driver's clock, when this row "
                               "reached it: the time-to-accuracy clock (restarts, state downloads and waits "
                               "included; empty for a standalone peer)", "s", source="the driver's",
                               default=math.nan)  # fmt: skip


CSV_COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(MetricsRow))

# Columns renamed since runs were written: `analyze` (launcher/results/summary.py: read_metrics) reads old runs too.
RENAMED = {"avg_rounds_ok": "averaging_rounds_ok", "avg_rounds_failed": "averaging_rounds_failed",
           "avg_group_size": "averaging_group_size", "avg_seconds": "averaging_seconds",
           "avg_bytes": "averaging_bytes"}  # fmt: skip


def consensus_distance(sketches: Sequence[np.ndarray]) -> float:
    """consensus_dist from the peers' parameter sketches (workers/peer/sketch.py: linear, so the distance of the
    sketches estimates the parameters'): sqrt(mean_i ||s_i - mean_j s_j||^2); 0.0 for a single peer."""
    stacked = np.stack([np.asarray(s, dtype=np.float64) for s in sketches])
    deviations = stacked - stacked.mean(axis=0, keepdims=True)
    return float(np.sqrt((deviations**2).sum(axis=1).mean()))


def columns_markdown() -> str:
    """docs/metrics.md's table, from the definitions above."""
    lines = ["| column | meaning | unit | source | scope |", "|---|---|---|---|---|"]
    for spec in dataclasses.fields(MetricsRow):
        meta = spec.metadata
        lines.append(f"| `{spec.name}` | {meta['meaning']} | {meta['unit']} | {meta['source']} | {meta['scope']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(columns_markdown(), end="")
