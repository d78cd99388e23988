"""The config's `scenario:` events turned into actions at the right moment. Pure: the driver passes a `Clock`
(what it knows of the swarm now) and carries out what comes back.

Timing: `at_s` counts from the moment every peer started training; `at_epoch` is reached when the event's peer
has reported that epoch (for a join: when the swarm has). A leave with `at_epoch` is handed to the peer at once, so
it stops exactly after that epoch's report; a slow or lr event without a time applies from the start.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from workers.core.config import ScenarioEvent


@dataclass(frozen=True)
class Clock:
    elapsed_s: float  # since every peer started training
    swarm_epoch: int  # the last epoch every live peer has reported
    peer_epochs: dict[int, int] = field(default_factory=dict)  # running peers: the last epoch each reported


@dataclass(frozen=True)
class Action:
    event: ScenarioEvent
    peer: int  # the event's peer; for a join, the index the joiner gets
    leave_after: int | None = None  # leave: the epoch after which to stop (None: the current one)


class Scenario:
    def __init__(self, events: list[ScenarioEvent], peers: int):
        self.pending = list(events)
        self.next_joiner = peers

    def due(self, clock: Clock) -> list[Action]:
        """The events whose moment has come, each returned once; events for a peer that is not running wait."""
        actions = []
        for event in list(self.pending):
            action = self._action(event, clock)
            if action is not None:
                self.pending.remove(event)
                actions.append(action)
        return actions

    def _action(self, event: ScenarioEvent, clock: Clock) -> Action | None:
        if event.event == "join":
            if not _reached(event, clock.elapsed_s, clock.swarm_epoch):
                return None
            self.next_joiner += 1
            return Action(event, self.next_joiner - 1)
        if event.peer not in clock.peer_epochs:
            return None
        if event.event == "leave" and event.at_epoch is not None:
            return Action(event, event.peer, leave_after=event.at_epoch)
        if event.event in ("slow", "lr") and event.at_epoch is None and event.at_s is None:
            return Action(event, event.peer)
        return Action(event, event.peer) if _reached(event, clock.elapsed_s, clock.peer_epochs[event.peer]) else None


def _reached(event: ScenarioEvent, elapsed_s: float, epoch: int) -> bool:
    if event.at_s is not None:
        return elapsed_s >= event.at_s
    return event.at_epoch is not None and epoch >= event.at_epoch
