"""The one results schema: a metrics row per peer per evaluation (long format), and its CSV header."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass
class MetricsRow:
    run_id: str
    peer: int
    epoch: int  # 1-based: the number of epochs completed when this row was measured
    step: int  # local optimizer steps so far
    samples_seen: int  # training samples this peer has processed so far
    wall_time_s: float  # seconds since this peer started training
    train_loss: float  # mean over this epoch's batches
    train_acc: float
    test_loss: float
    test_acc: float
    samples_per_s: float  # this epoch's samples / (train_s + avg_seconds): evaluation not included
    train_s: float  # seconds of local training this epoch (data, forward, backward, optimizer steps), averaging not
    eval_s: float  # seconds of this epoch's test-set evaluation
    avg_rounds_ok: int  # cumulative successful averaging rounds
    avg_rounds_failed: int  # cumulative failed rounds (no group in time, all-reduce error, timeout)
    avg_group_size: float  # mean size of the groups of the successful rounds since the previous row
    avg_seconds: float  # seconds the training thread spent averaging since the previous row (this epoch's rounds)
    # gossip: bytes through this peer's reducer since the previous row, parts in and averages out (summed over the
    # peers: the swarm's averaging traffic, every part once each way)
    avg_bytes: int = 0
    bytes_source: str = "measured"  # avg_bytes counted on the wire ("measured") or the all-reduce ring's "modelled"
    # cumulative rounds that ran but whose all-reduce lost a part (a reducer or a sender failed): neither ok nor
    # failed, and not in avg_group_size
    averaging_rounds_partial: int = 0
    consensus_dist: float = math.nan  # swarm's sqrt(mean_i ||theta_i - mean||^2), filled in by the driver
    consensus_before: float = math.nan  # the same, just before each peer's last round of the epoch (nan: no round)
    consensus_peers: int = 0  # how many peers' parameters that figure covers
    node: str = ""  # host name of the machine the peer ran on
    node_id: str = ""  # the Ray node the peer ran on (several Ray nodes may share a machine; "" without Ray)
    restarts: int = 0  # how many times this peer was restarted before this row (its incarnation)


CSV_COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(MetricsRow))
