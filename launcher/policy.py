"""What to do about each peer, decided from a frozen snapshot of the swarm: pure functions, no Ray, no clock.

The driver polls the peers, builds a `PeerView` per peer, asks `decide` and carries out the decisions (the shape
of Ray Train v2's failure handling). Unit-tested with plain data in tests/test_policy.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from workers.config import FaultsConfig

# Phases of a peer as the driver sees it. "starting": its actor is being built, joining the DHT, taking the state;
# "running": training; "done"/"left": finished the run / left it on purpose; "dead": its actor or process died (or
# was killed for being wedged) and no decision was taken yet; "given_up": dead for good.
Phase = Literal["starting", "running", "done", "left", "dead", "given_up"]
FINISHED: tuple[Phase, ...] = ("done", "left", "given_up")


@dataclass(frozen=True)
class PeerView:
    peer: int
    phase: Phase
    restarts: int = 0  # restarts so far (the incarnation number)
    reason: str = ""  # why it died
    phase_s: float = 0.0  # seconds in this phase
    progress_age_s: float = 0.0  # heartbeat: seconds since its training thread last finished a step or a round
    poll_age_s: float = 0.0  # seconds its oldest unanswered status poll has been waiting
    epoch_s: float | None = None  # its longest epoch so far, as the driver saw its reports arrive
    hivemind_error: str | None = None  # one of its hivemind processes died


@dataclass(frozen=True)
class Decision:
    action: Literal["kill", "restart", "give_up"]
    peer: int
    reason: str


def decide(
    views: list[PeerView], faults: FaultsConfig, can_restart: str | None = None, round_s: float = 0.0
) -> list[Decision]:
    """`can_restart`: None when the method can replace a peer, else why it cannot (e.g. all-reduce). `round_s`: the
    longest an averaging round may block training (matchmaking plus all-reduce): that long is never a stall."""
    decisions = []
    for view in views:
        if view.phase == "dead":
            decisions.append(_after_death(view, faults, can_restart))
        elif view.phase in ("running", "starting") and (reason := wedged(view, faults, round_s)):
            decisions.append(Decision("kill", view.peer, reason))
    return decisions


def _after_death(view: PeerView, faults: FaultsConfig, can_restart: str | None) -> Decision:
    if can_restart is not None:
        return Decision("give_up", view.peer, f"{view.reason}; not restarted: {can_restart}")
    if view.restarts >= faults.max_restarts:
        return Decision("give_up", view.peer, f"{view.reason}; faults.max_restarts={faults.max_restarts} used up")
    return Decision("restart", view.peer, view.reason)


def wedged(view: PeerView, faults: FaultsConfig, round_s: float = 0.0) -> str | None:
    """Why a peer that is alive as a process must be treated as dead, or None."""
    if view.phase == "starting":
        if view.phase_s > faults.start_timeout_s:
            return f"did not start within faults.start_timeout_s={faults.start_timeout_s:g} s"
        return None
    if view.hivemind_error:
        return view.hivemind_error
    if view.poll_age_s > faults.poll_timeout_s:
        return f"did not answer a status poll for {view.poll_age_s:.0f} s (faults.poll_timeout_s)"
    deadline = stall_deadline(view.epoch_s, faults, round_s)
    if view.progress_age_s > deadline:
        return f"made no training progress for {view.progress_age_s:.0f} s (deadline {deadline:.0f} s)"
    return None


def stall_deadline(epoch_s: float | None, faults: FaultsConfig, round_s: float = 0.0) -> float:
    """How long a running peer may go without a step, a finished round or an evaluated batch: a multiple of its own
    longest epoch, never less than faults.stall_min_s nor than twice the longest blocking round."""
    return max(faults.stall_min_s, faults.stall_factor * (epoch_s or 0.0), 2 * round_s)


def exit_code(views: list[PeerView], interrupted: bool) -> int:
    """130 when interrupted, 1 when a peer was given up (or the swarm could not run), else 0."""
    if interrupted:
        return 130
    return 1 if any(view.phase == "given_up" for view in views) else 0


def restart_support(method: str) -> str | None:
    """None when peers of `method` can be replaced mid-run, else why not."""
    if method == "allreduce":
        return "the allreduce baseline's process group is fixed at start"
    return None
