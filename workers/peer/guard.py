"""The divergence guard: a peer whose training blows up must share nothing. Non-finite values are caught anywhere;
a finite blow-up (a learning rate 100x too large: the loss and the parameters grow without ever being NaN) is caught
by comparing the peer with its own recent history, never with the swarm: on strongly skewed (Dirichlet) shards the
peers' losses differ legitimately, but each peer's own loss and parameter norm move smoothly from round to round.

Pure: the training loop feeds it, before each round, the mean loss of the steps since the last round and the norm
of the parameters about to be shared (workers/peer/train.py: RoundWatch).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

LOSS_FACTOR = 10.0  # a loss above this many times its recent median ...
LOSS_MARGIN = 2.0  # ... and above it by this much (tiny late losses fluctuate by factors; ln(10 classes) = 2.3)
NORM_FACTOR = 3.0  # a parameter norm above this many times its recent median
HISTORY = 5  # rounds of history the medians are taken over
MIN_HISTORY = 3  # rounds seen before the relative checks start (the first rounds of a run move fast)


@dataclass
class DivergenceGuard:
    losses: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    norms: deque = field(default_factory=lambda: deque(maxlen=HISTORY))

    def seed(self, norm: float) -> None:
        """This peer just took a state (the swarm's, or a checkpoint's): its history starts there, with the checks on
        at once (a peer that reloads or restarts with its blow-up's cause still in place must not share for even
        one round)."""
        self.losses.clear()
        self.norms.clear()
        self.norms.extend([norm] * MIN_HISTORY)

    def check(self, loss: float | None, norm: float) -> str | None:
        """Why this peer must not share its parameters now, or None (and the values join its history). `loss`: the
        mean training loss since the last check (None: no step since)."""
        if not math.isfinite(norm) or (loss is not None and not math.isfinite(loss)):
            return f"its parameters or its loss are not finite (loss {loss}, parameter norm {norm})"
        if len(self.norms) >= MIN_HISTORY:
            if reason := self._blown_up(loss, norm):
                return reason
        if loss is not None:
            self.losses.append(loss)
        self.norms.append(norm)
        return None

    def _blown_up(self, loss: float | None, norm: float) -> str | None:
        norm_median = statistics.median(self.norms)
        if norm > NORM_FACTOR * norm_median:
            times = norm / norm_median
            return f"its parameter norm jumped to {norm:.4g}, {times:.1f}x its recent median {norm_median:.4g}"
        if loss is not None and len(self.losses) >= MIN_HISTORY:
            loss_median = statistics.median(self.losses)
            if loss > max(LOSS_FACTOR * loss_median, loss_median + LOSS_MARGIN):
                return f"its training loss rose to {loss:.4g}, against a recent median of {loss_median:.4g}"
        return None
