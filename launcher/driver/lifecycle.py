"""A peer's life as the driver sees it: one table of (phase, signal) -> phase. Pure: no Ray, no clock.

A peer is a sequence of incarnations (its restarts); its phase is its current incarnation's. `Swarm`
(launcher/driver/swarm.py) feeds the signals it observes or decides and carries out what the new phase means (start an
actor, stop one, reap its processes); `policy.decide` says what to do about a dead peer. No phase is set anywhere but
through `advance`.

    standby --launched--> starting --joined--> running --finished--> done
                             |                    |  \\--left--> left
                             '------died------> dead <--died--'
    dead --launched--> starting (a new incarnation)        dead --gave_up--> given_up
"""

from __future__ import annotations

from enum import StrEnum


class Phase(StrEnum):
    STANDBY = "standby"  # a scripted joiner, built ahead (data, model) but not in the swarm yet
    STARTING = "starting"  # its actor is joining the DHT, taking the state (a newcomer), not training yet
    RUNNING = "running"  # training
    DONE = "done"  # finished the run; its DHT and averager stay up to serve its state to newcomers
    LEFT = "left"  # left the run on purpose (a scripted leave), its DHT and averager stopped
    DEAD = "dead"  # its actor or a process died, or it was killed for being wedged: a decision is due
    GIVEN_UP = "given_up"  # dead for good


class Signal(StrEnum):
    LAUNCHED = "launched"  # an actor (a new incarnation) was started for it
    JOINED = "joined"  # it is in the swarm and training
    FINISHED = "finished"  # its training thread ended after the last epoch
    LEFT = "left"  # its training thread ended after its scripted leave
    DIED = "died"  # its actor died or failed, or the driver killed it (wedged)
    GAVE_UP = "gave_up"  # the policy gave it up


TRANSITIONS: dict[tuple[Phase, Signal], Phase] = {
    (Phase.STANDBY, Signal.LAUNCHED): Phase.STARTING,
    (Phase.DEAD, Signal.LAUNCHED): Phase.STARTING,
    (Phase.STARTING, Signal.JOINED): Phase.RUNNING,
    (Phase.STARTING, Signal.DIED): Phase.DEAD,
    (Phase.RUNNING, Signal.FINISHED): Phase.DONE,
    (Phase.RUNNING, Signal.LEFT): Phase.LEFT,
    (Phase.RUNNING, Signal.DIED): Phase.DEAD,
    (Phase.DEAD, Signal.GAVE_UP): Phase.GIVEN_UP,
}

LIVE = (Phase.STARTING, Phase.RUNNING)  # an actor that is (or will be) in the swarm
FINISHED = (Phase.DONE, Phase.LEFT, Phase.GIVEN_UP)  # nothing left to train or to decide
DHT_UP = (Phase.RUNNING, Phase.DONE)  # a DHT a newcomer can bootstrap off, an averager that serves the state


class InvalidTransition(RuntimeError):
    pass


def advance(phase: Phase, signal: Signal) -> Phase:
    """The phase after `signal`; InvalidTransition for a signal the phase cannot take (a bug in the driver)."""
    try:
        return TRANSITIONS[(Phase(phase), Signal(signal))]
    except KeyError:
        raise InvalidTransition(f"a peer in phase {phase} cannot take signal {signal}") from None
