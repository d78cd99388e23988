"""What to do about each peer, decided from a frozen snapshot of the swarm: pure functions, no Ray, no clock.

The driver polls the peers, builds a `PeerView` per peer, asks `decide` and carries out the decisions (the shape
of Ray Train v2's failure handling; the phases are launcher/driver/lifecycle.py's). Unit-tested with plain data in
tests/test_policy.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from launcher.driver.lifecycle import DHT_UP, Phase
from workers.core.config import FaultsConfig


@dataclass(frozen=True)
class PeerView:
    peer: int
    phase: Phase
    restarts: int = 0  # restarts so far (the incarnation number)
    epoch: int = 0  # the last epoch it reported (its newest checkpoint: a peer saves one before each report)
    reseeding: bool = False  # starting from a checkpoint because no peer's DHT was up (see `decide`)
    reason: str = ""  # why it died
    phase_s: float = 0.0  # seconds in this phase
    progress_age_s: float = 0.0  # heartbeat: seconds since its training thread last finished a step or a round
    poll_age_s: float = 0.0  # seconds its oldest unanswered status poll has been waiting
    epoch_s: float | None = None  # its longest epoch so far, as the driver saw its reports arrive
    hivemind_error: str | None = None  # one of its hivemind processes died
    start_s: float = 0.0  # what a newcomer's start may take beyond faults.start_timeout_s (its state's download)


@dataclass(frozen=True)
class Decision:
    # restart: a new incarnation that bootstraps off the peers whose DHT is up and takes the swarm's state from them;
    # reseed: no peer's DHT is up, so one dead peer restarts the swarm from the run's newest checkpoint (`donor`'s);
    # wait: restart once a peer's DHT is up again (the reseeding one)
    # restart_group: a collective of fixed membership (the all-reduce baseline) restarts all of its members
    action: Literal["kill", "restart", "reseed", "wait", "give_up", "restart_group"]
    peer: int
    reason: str
    donor: int | None = None  # reseed, restart_group: the peer whose checkpoint they resume from (None: none saved)


def decide(views: list[PeerView], faults: FaultsConfig, round_s: float = 0.0,
           group: GroupView | None = None) -> list[Decision]:  # fmt: skip
    """`round_s`: the longest an averaging round may block training (matchmaking plus all-reduce): that long is never
    a stall. `group`: the method is one collective of fixed membership (the all-reduce baseline): see `_in_a_group`.

    A newcomer joins the swarm through a peer whose DHT is up (running, or done and serving its final state); never
    a swarm of its own. When no peer's DHT is up (every running peer died at once), one dead peer restarts the swarm
    from the run's newest checkpoint and the others wait for it; with no checkpoint at all, they are given up."""
    decisions = [
        Decision("kill", view.peer, reason)
        for view in views
        if view.phase in (Phase.RUNNING, Phase.STARTING) and (reason := wedged(view, faults, round_s))
    ]
    if group is not None:
        return decisions + _in_a_group(views, faults, group)
    dht_up = any(view.phase in DHT_UP for view in views)
    reseeding = any(view.reseeding and view.phase == Phase.STARTING for view in views)
    for view in views:
        if view.phase == Phase.DEAD:
            decision = _after_death(view, faults)
            if decision.action == "restart" and not dht_up:
                decision = _without_a_swarm(view, views, reseeding)
                reseeding = reseeding or decision.action == "reseed"
            decisions.append(decision)
    return decisions


@dataclass(frozen=True)
class GroupView:
    members: int  # the process group's size now (its world size)
    restarts: int  # how many times the group was restarted so far


def _in_a_group(views: list[PeerView], faults: FaultsConfig, group: GroupView) -> list[Decision]:
    """Elastic restart, as torchrun's elastic agent and Ray Train's FailureConfig do it: a member that dies (or
    leaves) stops the collective for all, so the whole group restarts, with the members that remain and the dead
    one's replacement, from the run's newest checkpoint, in a new process group; faults.max_restarts bounds the
    group's restarts (past it, the dead members are given up and the others go on without them)."""
    dead = [view for view in views if view.phase == Phase.DEAD]
    running = [view for view in views if view.phase == Phase.RUNNING]
    finished = [view for view in views if view.phase == Phase.DONE]  # members still (a member that left is not)
    if not dead and (len(running) + len(finished) >= group.members or not running):
        return []
    donor = max(views, key=lambda other: (other.epoch, -other.peer))
    source = f"peer {donor.peer}'s checkpoint of epoch {donor.epoch}" if donor.epoch else "its initial parameters"
    why = "; ".join(f"peer {view.peer}: {view.reason}" for view in dead) or "a member left the group"
    if dead and group.restarts >= faults.max_restarts:
        used = f"faults.max_restarts={faults.max_restarts} group restarts used up"
        gone = [Decision("give_up", view.peer, f"{view.reason}; {used}") for view in dead]
        go_on = f"{why}; the others go on without it, from {source}"
        return gone + ([Decision("restart_group", running[0].peer, go_on, donor=donor.peer if donor.epoch else None)]
                       if running else [])  # fmt: skip
    first = (dead or running)[0].peer
    return [Decision("restart_group", first, f"{why}: the group restarts from {source}",
                     donor=donor.peer if donor.epoch else None)]  # fmt: skip


def _without_a_swarm(view: PeerView, views: list[PeerView], reseeding: bool) -> Decision:
    if reseeding:
        return Decision("wait", view.peer, f"{view.reason}; no peer's DHT is up: waiting for the swarm's reseed")
    donor = max(views, key=lambda other: (other.epoch, -other.peer))
    if donor.epoch == 0:
        return Decision("give_up", view.peer, f"{view.reason}; no peer's DHT is up and no peer saved a checkpoint "
                        "to restart the swarm from")  # fmt: skip
    why = f"{view.reason}; no peer's DHT is up: it restarts the swarm from peer {donor.peer}'s checkpoint of epoch "
    return Decision("reseed", view.peer, why + str(donor.epoch), donor=donor.peer)


def _after_death(view: PeerView, faults: FaultsConfig) -> Decision:
    if view.restarts >= faults.max_restarts:
        return Decision("give_up", view.peer, f"{view.reason}; faults.max_restarts={faults.max_restarts} used up")
    return Decision("restart", view.peer, view.reason)


def wedged(view: PeerView, faults: FaultsConfig, round_s: float = 0.0) -> str | None:
    """Why a peer that is alive as a process must be treated as dead, or None."""
    if view.phase == Phase.STARTING:
        if view.phase_s > faults.start_timeout_s + view.start_s:
            extra = f" + {view.start_s:.0f} s for its state's download" if view.start_s else ""
            return f"did not start within faults.start_timeout_s={faults.start_timeout_s:g} s{extra}"
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
    return 1 if any(view.phase == Phase.GIVEN_UP for view in views) else 0


GROUP_METHODS = ("allreduce",)  # one collective of fixed membership: a member's death stops them all


def is_group_method(method: str) -> bool:
    return method in GROUP_METHODS
