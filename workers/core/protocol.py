"""What crosses the boundary between the driver (launcher/) and a peer (workers/peer/): plain dataclasses, no torch,
so that the driver, the analysis and the CLI start without it. The driver calls a peer's actor and gets these back."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from workers.core.metrics import MetricsRow


@dataclass
class Report:
    """What a peer sends the driver per evaluation: the row, and a sketch of its parameters for consensus."""

    row: MetricsRow
    sketch: np.ndarray
    sketch_before: np.ndarray | None = None  # the parameters as the epoch's last round started (None: no round)


@dataclass
class PeerEvent:
    event: str  # "diverged" | "reloaded"
    detail: str
    first_epoch: int | None = None  # reloaded: the first epoch it reports from now on


@dataclass
class Effects:
    """What the scenario set on a peer. They belong to the peer, not to one incarnation: the driver hands them to
    every incarnation it starts, and a reload keeps them."""

    leave_after: int | None = None  # stop gracefully after this epoch (a scripted leave)
    slowdown: float = 1.0  # a scripted straggler: every step takes this many times longer
    lr_factor: float = 1.0  # a scripted learning-rate change, on top of the schedule


@dataclass
class PeerStatus:
    peer: int
    state: str  # "ready" | "running" | "done" | "failed" | "stopped" | "left"
    # reports and events in the order they happened (a report written before an event is handled before it)
    outbox: list[Report | PeerEvent] = field(default_factory=list)
    error: str | None = None
    progress_age_s: float = 0.0  # heartbeat: seconds since the training thread last finished a step or a round
    hivemind_error: str | None = None  # which of this peer's hivemind processes died, if one did
    anomalies: list[tuple[str, str, int]] = field(default_factory=list)  # (what, who, how often): refusals etc.
    live: LiveProgress | None = None  # where its training is now, within the epoch (the driver's progress display)
    polls: int = 0  # status polls this incarnation has answered, this one included (the driver's polling rate)

    @property
    def reports(self) -> list[Report]:
        return [item for item in self.outbox if isinstance(item, Report)]


@dataclass
class LiveProgress:
    epoch: int  # the epoch in progress
    epoch_step: int
    epoch_steps: int
    samples_seen: int  # since training began
    rounds_ok: int
    rounds_failed: int


@dataclass
class Joined:
    """What a peer that joined a running swarm reports: where it is and where its state came from."""

    maddrs: list[str]
    first_epoch: int  # the first epoch it trains (its rows start there)
    source: str  # "peer N" (downloaded), "checkpoint of peer N" (a reseed, or a method without shared state), "fresh"
    seconds: float  # from the call to training
    processes: list[tuple[int, float]]  # see Peer.process_ids
