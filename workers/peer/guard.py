"""The divergence guard: a peer whose training blows up must share nothing. Non-finite values are caught anywhere;
a finite blow-up (a learning rate 100x too large: the loss and the parameters grow without ever being NaN) is caught
by comparing the peer with its own recent history, never with the swarm: on strongly skewed (Dirichlet) shards the
peers' losses differ legitimately, but each peer's own loss, parameter norm and step size move smoothly from round
to round.

The size of the last step before a round closes the gap the other two leave: a round that comes right after the
first bad step. No loss has been computed at the parameters that step made, and their norm may have grown less than
NORM_FACTOR (a learning rate x100 for one step before the round: 2.1-2.9x in 5 of 51 cases simulated on digits, each
making the group's mean's test loss > 70; CI saw such a round poison the others). That step moved them about 100x
as far as the steps before it. (A bad step earlier in the window shows in the losses of the steps after it.)

Pure: the training loop feeds it, before each round, the mean loss of the steps since the last round, the norm of
the parameters about to be shared, and how far the last step before the round moved them (workers/peer/train.py:
RoundWatch).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

LOSS_FACTOR = 10.0  # a loss above this many times its recent median ...
LOSS_MARGIN = 2.0  # ... and above it by this much (tiny late losses fluctuate by factors; ln(10 classes) = 2.3)
NORM_FACTOR = 3.0  # a parameter norm above this many times its recent median
STEP_FACTOR = 20.0  # a round's last step that moved the parameters this many times as far as recent rounds' did
HISTORY = 5  # rounds of history the medians are taken over
MIN_HISTORY = 3  # rounds seen before the relative checks start (the first rounds of a run move fast)


@dataclass
class DivergenceGuard:
    losses: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    norms: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    steps: deque = field(default_factory=lambda: deque(maxlen=HISTORY))

    def seed(self, norm: float) -> None:
        """This peer just took a state (the swarm's, or a checkpoint's): its history starts there, with the checks on
        at once (a peer that reloads or restarts with its blow-up's cause still in place must not share for even
        one round). The step sizes are kept: they are its optimizer's and learning rate's, not the state's."""
        self.losses.clear()
        self.norms.clear()
        self.norms.extend([norm] * MIN_HISTORY)

    def check(self, loss: float | None, norm: float, step: float | None = None) -> str | None:
        """Why this peer must not share its parameters now, or None (and the values join its history). `loss`: the
        mean training loss since the last check, `step`: how far the last optimizer step moved the parameters (None,
        both: no step since)."""
        finite = math.isfinite(norm) and all(v is None or math.isfinite(v) for v in (loss, step))
        if not finite:
            return f"its parameters or its loss are not finite (loss {loss}, parameter norm {norm}, step {step})"
        if reason := self._blown_up(loss, norm, step):
            return reason
        if loss is not None:
            self.losses.append(loss)
        if step is not None:
            self.steps.append(step)
        self.norms.append(norm)
        return None

    def _blown_up(self, loss: float | None, norm: float, step: float | None) -> str | None:
        if len(self.norms) >= MIN_HISTORY:
            norm_median = statistics.median(self.norms)
            if norm > NORM_FACTOR * norm_median:
                times = norm / norm_median
                return f"its parameter norm jumped to {norm:.4g}, {times:.1f}x its recent median {norm_median:.4g}"
        if step is not None and len(self.steps) >= MIN_HISTORY:
            step_median = statistics.median(self.steps)  # (0: a learning rate of 0, nothing to compare with)
            if step_median > 0 and step > STEP_FACTOR * step_median:
                times = step / step_median
                return (f"one step moved its parameters {step:.4g}, {times:.0f}x as far as the last steps of its "
                        f"recent rounds (median {step_median:.4g})")  # fmt: skip
        if loss is not None and len(self.losses) >= MIN_HISTORY:
            loss_median = statistics.median(self.losses)
            if loss > max(LOSS_FACTOR * loss_median, loss_median + LOSS_MARGIN):
                return f"its training loss rose to {loss:.4g}, against a recent median of {loss_median:.4g}"
        return None
