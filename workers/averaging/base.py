"""The averaging strategy's interface and what every method shares: the round counts (RoundStats), the tensors a
round averages, the Diverged error. Each method lives in a module of its own (none is NoAveraging, here)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class RoundStats:
    ok: int = 0
    failed: int = 0
    partial: int = 0  # rounds that ran, but whose all-reduce lost a part: not averaged through (not in `ok`)
    seconds: float = 0.0
    _window_groups: list[int] = field(default_factory=list)
    _window_seconds: float = 0.0
    _window_bytes: int = 0
    _window_messages: tuple[int, int] = (0, 0)

    def record(self, group_size: int | None, seconds: float, partial: bool = False) -> None:
        """One round: its group size on success, None on failure; `partial`: it ran, but lost a part."""
        if partial:
            self.partial += 1
        elif group_size is None:
            self.failed += 1
        else:
            self.ok += 1
            self._window_groups.append(group_size)
        self.add_seconds(seconds)

    def add_seconds(self, seconds: float) -> None:
        """Time spent averaging (also for rounds that were recorded without it)."""
        self.seconds += seconds
        self._window_seconds += seconds

    def add_bytes(self, sent: int) -> None:
        self._window_bytes += sent

    def add_messages(self, received: int, dropped: int) -> None:
        """Messages this peer added to its parameters, and messages addressed to it that it refused (sgp)."""
        self._window_messages = (self._window_messages[0] + received, self._window_messages[1] + dropped)

    def take_messages(self) -> tuple[int, int]:
        """(messages received, messages dropped) since the previous call."""
        messages, self._window_messages = self._window_messages, (0, 0)
        return messages

    def take_window(self) -> tuple[float, float, int]:
        """(mean group size, seconds averaging, bytes sent) since the previous call; NaN size when no round
        succeeded."""
        groups, seconds, sent = self._window_groups, self._window_seconds, self._window_bytes
        self._window_groups, self._window_seconds, self._window_bytes = [], 0.0, 0
        return (sum(groups) / len(groups) if groups else float("nan")), seconds, sent


class Diverged(RuntimeError):
    """A peer's loss or parameters are no longer finite: it must not share them (FaultsConfig.on_divergence)."""


def all_finite(tensors: list[torch.Tensor]) -> bool:
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())  # one device sync


def averaged_tensors(model: nn.Module) -> list[torch.Tensor]:
    """What a round averages: every parameter and every floating-point buffer (e.g. BatchNorm statistics)."""
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    return [p.data for p in model.parameters()] + [b.data for b in buffers]


class AveragingStrategy:
    """How a peer averages: the training loop calls these around every step and epoch (workers/peer/train.py). The
    defaults average nothing; each method (none, gossip, DiLoCo, all-reduce, hivemind.Optimizer) overrides what it
    needs, and keeps the counts that prove (or disprove) that averaging happened (`stats`)."""

    shares_state = False  # whether its peers serve their state to newcomers (share_state, download_state)
    # whether a peer may skip its round: round_starts then runs the guard's check, and the training loop measures each
    # step's size for it (workers/peer/train.py: RoundWatch)
    skips_rounds = False
    # where its averaging_bytes come from: "measured" (counted on the wire: hivemind's parts; nothing, for `none`) or
    # "modelled" (gloo counts no bytes: its ring's traffic, 2 (n - 1) / n of the tensors per peer)
    bytes_source = "measured"

    def __init__(self) -> None:
        self.stats = RoundStats()
        # the training loop's check before this peer shares anything in a round (workers/peer/train.py: RoundWatch): a
        # peer whose training blew up raises Diverged there; None outside the loop
        self.before_round = None

    def take_window(self) -> tuple[float, float, int]:
        """(mean group size, seconds averaging, bytes) since the last call: an epoch's row (RoundStats)."""
        return self.stats.take_window()

    def round_starts(self) -> None:
        """Call as a round starts, before anything is shared: the guard's check where a peer may skip the round
        (`skips_rounds`; not where every peer must enter a collective)."""
        if self.before_round is not None:
            self.before_round(check=self.skips_rounds)

    def set_swarm_size(self, peers: int, dht_nodes: int = 0, gone: Sequence[str] = ()) -> None:
        """How many peers are in the swarm now (the driver's count of running peers): a group aims at that many;
        `dht_nodes`: how many peers' DHTs are up, running or done (0: not known); `gone`: the PeerIDs (base58) of the
        latest incarnations the driver saw die."""

    def drop_round(self) -> None:
        """Forget a round in flight without applying it (the parameters are about to be replaced)."""

    def share_state(self, provider, priority) -> None:
        """Let newcomers download this peer's state from `provider()` -> (metadata, tensors), preferring the peer
        with the highest `priority()` (its progress); a no-op for methods without a hivemind averager (a restarted
        peer of theirs resumes from its own checkpoint)."""

    def download_state(self, timeout: float) -> tuple[dict, list[torch.Tensor]] | None:
        """The state of the most advanced live peer that shares one, or None."""
        return None

    def withhold_state(self) -> None:
        """Serve no state to newcomers until the next `share_state` (this peer's diverged)."""

    def method_state(self) -> list[torch.Tensor]:
        """The method's own tensors that a newcomer takes over with the parameters (DiLoCo's θ_sync and outer
        momentum), read under the setup's lock with the parameters they belong to; none for the other methods."""
        return []

    def load_method_state(self, tensors: list[torch.Tensor] | None) -> None:
        """Take a donor's `method_state`; None: start it from this peer's current parameters (after a resume)."""

    def epoch_steps(self, local_steps: int) -> int:
        """How many steps to take this epoch (strategies that need lockstep peers agree on one number)."""
        return local_steps

    def averages_after_step(self, step: int) -> bool:
        """Whether `after_step(step)` will average the parameters (False where hivemind decides, in `optimizer`)."""
        return False

    def averages_at_epoch_end(self) -> bool:
        """Whether `after_epoch` will average the parameters."""
        return False

    def before_step(self) -> None:
        pass

    def after_step(self, step: int, left: int = 0) -> None:
        """After optimizer step `step` (counted over the run); `left`: steps left in this epoch."""

    def after_epoch(self, last: bool = True) -> None:
        """After an epoch's last step, before its evaluation; `last`: no epoch follows on this peer (its run's end, or
        its scripted leave)."""

    def shutdown(self) -> None:
        pass


class NoAveraging(AveragingStrategy):
    """`gossip.method: none`, the baseline: the same harness with no communication."""
