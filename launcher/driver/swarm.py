"""The peers' actors and what they report: started in bootstrap order, polled at a steady rate without ever blocking
on one peer, killed, restarted in their own placement-group bundle, joined, told to leave or slow down, and stopped
at the end without leftovers. Each peer is a sequence of incarnations (its restarts); rows and events name both.
A peer's phase changes only through `_signal` (the table of launcher/driver/lifecycle.py); the decisions are
launcher/driver/policy.py's; this module does the I/O."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import ray
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from launcher.driver.collect import EpochCollector
from launcher.driver.lifecycle import DHT_UP, FINISHED, LIVE, Phase, Signal, advance
from launcher.driver.placement import reserve, resolve_network
from launcher.driver.policy import Decision, GroupView, PeerView, is_group_method
from launcher.results.summary import Event
from workers.core.config import ExperimentConfig
from workers.core.membership import new_swarm_key, read_swarm_key
from workers.core.metrics import MetricsRow
from workers.core.netns import NetnsLink
from workers.core.protocol import Effects, Joined, LiveProgress, PeerEvent, PeerStatus
from workers.core.storage import forwarded_env, is_remote
from workers.peer.actor import PeerActor
from workers.peer.checkpoint import atomic_write_bytes, checkpoint_path

logger = logging.getLogger("launcher")

STOP_TIMEOUT_S = 15.0  # a peer's graceful stop at the end (a blocking round may be under way)
DRAIN_TIMEOUT_S = 5.0
FETCH_TIMEOUT_S = 20.0  # all final models from other nodes together
GONE_TOLD = 16  # the latest dead incarnations whose PeerIDs the running peers are told


def peer_id_of(maddrs: list[str]) -> str | None:
    """The PeerID (base58) in a peer's visible multiaddrs ("/ip4/.../tcp/.../p2p/<PeerID>"), or None."""
    for maddr in maddrs:
        parts = maddr.rstrip("/").split("/")
        if len(parts) >= 2 and parts[-2] == "p2p":
            return parts[-1]
    return None


def gone_peer_ids(incarnations: Iterable[Incarnation], limit: int = GONE_TOLD) -> tuple[str, ...]:
    """The PeerIDs of the latest `limit` incarnations that died (dead or given up, newest first, each once; one that
    died before its DHT was up has no PeerID here, and its liveness record's ttl bounds it): push-sum's live sets drop
    them at once, where their records would keep them up to a ttl (workers/averaging/liveness.py)."""
    dead = sorted((inc for inc in incarnations if inc.phase in (Phase.DEAD, Phase.GIVEN_UP)),
                  key=lambda inc: inc.since, reverse=True)  # fmt: skip
    found = (peer_id_of(inc.maddrs) for inc in dead)
    return tuple(dict.fromkeys(pid for pid in found if pid is not None))[:limit]


@dataclass
class Incarnation:
    peer: int
    restarts: int
    actor: ray.actor.ActorHandle
    node_id: str
    phase: Phase = Phase.STANDBY
    since: float = field(default_factory=time.monotonic)  # when it entered `phase`
    launch: ray.ObjectRef | None = None  # a newcomer's join() call in flight
    poll: ray.ObjectRef | None = None  # the status poll in flight
    poll_sent: float = 0.0
    processes: list[tuple[int, float]] = field(default_factory=list)  # (pid, create time): its process, hivemind's
    maddrs: list[str] = field(default_factory=list)
    reason: str = ""  # why it died
    status: PeerStatus | None = None  # the last status it answered
    last_report: float | None = None
    epoch: int = 0  # the last epoch it reported
    epoch_s: float | None = None  # its longest epoch so far, as seen from here
    waiting_since: float | None = None  # a newcomer: since its predecessor died, or since its join was due
    donor: int | None = None  # a newcomer that restarts the swarm from this peer's checkpoint (policy: reseed)
    waiting: bool = False  # dead, and told to wait for a peer's DHT to be up (the event is written once)


class Swarm:
    def __init__(self, cfg: ExperimentConfig, run_id: str, checkpoint_dir: Path | None = None,
                 checkpoint_uri: str | None = None):  # fmt: skip
        """`checkpoint_uri`: the storage folder the peers upload their checkpoints to (None: results are local)."""
        self.cfg, self.run_id, self.checkpoint_dir, self.checkpoint_uri = cfg, run_id, checkpoint_dir, checkpoint_uri
        self.peers: dict[int, Incarnation] = {}  # each peer's current incarnation
        self.retired: list[Incarnation] = []  # earlier incarnations: their leftovers are reaped at the end
        self.standby: dict[int, Incarnation] = {}  # scripted joiners, built ahead (data, model) but not in the swarm
        self.effects: dict[int, Effects] = {}  # what the scenario set on each peer: every incarnation carries it
        self.collector = EpochCollector(range(cfg.peers))
        self.events: list[Event] = []  # not yet written
        self.placement_group, self.bundles, self.bundle_nodes, self.first_bundle = None, [], {}, 0
        self.started = time.monotonic()
        self.training_since: float | None = None  # when every initial peer was training
        self.killed_at: dict[int, float] = {}  # peer -> when the scenario killed it (to time the detection)
        self.netns: dict[int, NetnsLink] = {}  # peer -> its network namespace (emulation; set before `start`)
        self.swarm_size = 0  # running peers, as last told to them (a group aims at that many)
        self.told_gone: frozenset[str] = frozenset()  # the dead incarnations' PeerIDs, as last told to them
        self.state_timeout_s = 0.0  # a newcomer's state download may take this long (peer 0 says, from its model)
        self.group = GroupView(cfg.peers, 0) if is_group_method(cfg.gossip.method) else None  # the process group
        self.here = ray.get_runtime_context().get_node_id()
        self.peer_actor = ray.remote(PeerActor)
        # the run's secret (workers/averaging/admission.py): to the actors through Ray only, never in a log, a file or a
        # name
        key_file = cfg.network.swarm_key_file
        self.swarm_key = read_swarm_key(key_file) if key_file else new_swarm_key()

    # -- start ---------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Peer 0 first, the others off its addresses; training starts once every peer has joined the DHT."""
        self.placement_group, self.bundles, self.bundle_nodes, self.first_bundle = reserve(self.cfg, self.run_id)
        self.cfg = cfg = resolve_network(self.cfg, nodes=len(set(self.bundle_nodes.values())))
        timeout = cfg.faults.start_timeout_s
        self.peers = {i: self._create(i, restarts=0) for i in range(cfg.peers)}
        self.standby = {i: self._create(i, restarts=0) for i in range(cfg.peers, cfg.peers + cfg.joins)}
        for incarnation in self.peers.values():
            self._signal(incarnation, Signal.LAUNCHED)
        bootstrap = ray.get(self.peers[0].actor.call.remote("start_dht", []), timeout=timeout)
        logger.info("peer 0 is up at %s", bootstrap)
        others = ray.get(
            [self.peers[i].actor.call.remote("start_dht", bootstrap) for i in range(1, cfg.peers)], timeout=timeout
        )
        for incarnation, maddrs in zip(self.peers.values(), [bootstrap, *others], strict=True):
            incarnation.maddrs = maddrs
        if is_group_method(cfg.gossip.method):
            self._form_group(list(self.peers.values()), timeout)
        pids = ray.get([p.actor.call.remote("process_ids") for p in self.peers.values()], timeout=timeout)
        self.state_timeout_s = ray.get(self.peers[0].actor.call.remote("state_timeout"), timeout=timeout)
        self.swarm_size = cfg.peers
        told = [p.actor.call.remote("set_swarm_size", cfg.peers, cfg.peers) for p in self.peers.values()]
        ray.get(told, timeout=timeout)
        self._start_training(list(self.peers.values()), timeout)
        self.training_since = time.monotonic()
        for incarnation, processes in zip(self.peers.values(), pids, strict=True):
            incarnation.processes = processes
            self._signal(incarnation, Signal.JOINED)
            self._event(incarnation, "started")
        logger.info("all %d peers joined the DHT and started training", cfg.peers)

    def _create(self, peer: int, restarts: int, phase: Phase = Phase.STANDBY) -> Incarnation:
        """A new actor for `peer` in the peer's own bundle (its predecessor's resources are freed when it dies), in the
        phase its predecessor left it (the first one: STANDBY) until `_signal` launches it."""
        bundle = self.bundles[peer]
        custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
        actor = self.peer_actor.options(
            name=actor_name(self.run_id, peer, restarts),
            num_cpus=bundle["CPU"],
            num_gpus=bundle.get("GPU", 0),
            resources=custom,
            runtime_env=self._storage_env(),
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.placement_group, placement_group_bundle_index=self.first_bundle + peer
            ),
        ).remote(self.cfg, peer, self.run_id, self.checkpoint_dir, restarts=restarts, swarm_key=self.swarm_key,
                 checkpoint_uri=self.checkpoint_uri, netns=self.netns.get(peer))  # fmt: skip
        return Incarnation(peer, restarts, actor, self.bundle_nodes[peer], phase)

    def _storage_env(self) -> dict | None:
        """The driver's storage endpoint and credentials (AWS_*), for peers on nodes that lack them: only when a
        peer reads or writes a storage URI. (Ray merges them into the job's own env_vars.)"""
        uses_storage = self.checkpoint_uri is not None or is_remote(self.cfg.resume_from)
        env = forwarded_env() if uses_storage else {}
        return {"env_vars": env} if env else None

    # -- watching --------------------------------------------------------------------------------------------------

    def tick(self, wait_s: float) -> list[list[MetricsRow]]:
        """One tick of `wait_s`: send a status poll to every running peer that has none in flight, take the answers
        (and the newcomers' join results) that come within the tick, and return the epochs that became complete. A
        tick lasts `wait_s` even when every peer answered at once: each answer costs a peer's main thread (and the
        GIL its training needs), so a peer is polled once a tick, not back to back. A peer that does not answer is
        not waited for."""
        ends = time.monotonic() + wait_s
        for incarnation in self.live():
            if incarnation.phase == "running" and incarnation.poll is None:
                incarnation.poll, incarnation.poll_sent = incarnation.actor.call.remote("poll"), time.monotonic()
        calls = {inc.poll: inc for inc in self.live() if inc.poll} | {i.launch: i for i in self.live() if i.launch}
        ready, _ = ray.wait(list(calls), num_returns=len(calls), timeout=wait_s) if calls else ([], [])
        epochs = []
        for ref in ready:
            incarnation = calls[ref]
            if ref == incarnation.launch:
                epochs += self._joined(incarnation, ref)
            else:
                incarnation.poll = None
                epochs += self._answered(incarnation, ref)
        time.sleep(max(0.0, ends - time.monotonic()))
        return epochs

    def _answered(self, incarnation: Incarnation, ref: ray.ObjectRef) -> list[list[MetricsRow]]:
        try:
            status: PeerStatus = ray.get(ref)
        except ray.exceptions.RayError as err:
            return self._died(incarnation, f"its actor died ({type(err).__name__})")
        incarnation.status, epochs = status, []
        for what, who, count in status.anomalies:  # refused strangers, oversized groups: never a silent "round ok"
            self._event(incarnation, "anomaly", f"{what}: {who} ({count}x)")
            logger.warning("peer %d: %s: %s (%dx)", incarnation.peer, what, who, count)
        for item in status.outbox:  # reports time the peer's epochs; events (diverged, reloaded) are logged
            if isinstance(item, PeerEvent):
                self._event(incarnation, item.event, item.detail)
                logger.warning("peer %d %s: %s", incarnation.peer, item.event, item.detail)
            else:
                self._timed(incarnation, item.row.epoch)
                self._stamp(item.row)
        epochs += self.collector.take(incarnation.peer, status.outbox)  # in the order they happened
        if status.state == "failed":
            return epochs + self._died(incarnation, "training failed: " + (status.error or "").strip().splitlines()[-1])
        if status.state in ("done", "left", "stopped"):
            self._signal(incarnation, Signal.LEFT if status.state == "left" else Signal.FINISHED)
            self._event(incarnation, incarnation.phase)
            if incarnation.phase == Phase.LEFT:  # gone from the swarm: its DHT and averager too
                incarnation.actor.call.remote("stop", STOP_TIMEOUT_S - 5)
            epochs += self.collector.drop_peer(incarnation.peer)
        return epochs

    def _timed(self, incarnation: Incarnation, epoch: int) -> None:
        now = time.monotonic()
        if incarnation.last_report is not None:
            incarnation.epoch_s = max(incarnation.epoch_s or 0.0, now - incarnation.last_report)
        incarnation.last_report, incarnation.epoch = now, epoch

    def _joined(self, incarnation: Incarnation, ref: ray.ObjectRef) -> list[list[MetricsRow]]:
        incarnation.launch = None
        try:
            joined: Joined = ray.get(ref)
        except ray.exceptions.RayError as err:
            return self._died(incarnation, f"could not join the swarm: {str(err).strip().splitlines()[-1]}")
        self._came_in(incarnation, joined)
        return []

    def _start_training(self, incarnations: list[Incarnation], timeout: float) -> None:
        ray.get([inc.actor.call.remote("start_training") for inc in incarnations], timeout=timeout)

    def _came_in(self, incarnation: Incarnation, joined: Joined) -> None:
        """A newcomer (a restart, a joiner) is training: from here on its reports are expected."""
        incarnation.maddrs, incarnation.processes = joined.maddrs, joined.processes
        self._signal(incarnation, Signal.JOINED)
        incarnation.last_report, incarnation.epoch = time.monotonic(), joined.first_epoch - 1
        self.collector.expect(incarnation.peer, joined.first_epoch)
        if joined.source.startswith("peer"):
            self._event(incarnation, "state_downloaded", f"from {joined.source}", joined.seconds)
        waited = time.monotonic() - incarnation.waiting_since
        kind = "restarted" if incarnation.restarts else "joined"
        self._event(incarnation, kind, f"state from {joined.source}, first epoch {joined.first_epoch}", waited)
        logger.info("peer %d %s (state from %s), training from epoch %d", incarnation.peer, kind, joined.source,
                    joined.first_epoch)  # fmt: skip

    def _died(self, incarnation: Incarnation, reason: str, event: str = "died") -> list[list[MetricsRow]]:
        self._signal(incarnation, Signal.DIED, reason)
        incarnation.poll = incarnation.launch = None
        killed_at = self.killed_at.pop(incarnation.peer, None)
        detected = time.monotonic() - killed_at if killed_at is not None else float("nan")
        self._event(incarnation, event, reason, detected)
        logger.error("peer %d (restart %d) %s: %s", incarnation.peer, incarnation.restarts, event, reason)
        self._reap(incarnation)
        return self.collector.drop_peer(incarnation.peer)

    def _signal(self, incarnation: Incarnation, signal_: Signal, reason: str = "") -> None:
        """The one place a phase changes (launcher/driver/lifecycle.py). The swarm's size follows its running peers:
        each running peer is told, so that its rounds aim at the peers that are there, and how many peers' DHTs are up
        (running or done), so that its lean DHT path knows how many nodes make the whole swarm (levers.small_swarm)."""
        incarnation.phase, incarnation.since = advance(incarnation.phase, signal_), time.monotonic()
        incarnation.reason = reason or incarnation.reason
        running = [inc for inc in self.peers.values() if inc.phase == Phase.RUNNING]
        gone = self._gone()
        if self.training_since is not None and (len(running) != self.swarm_size or frozenset(gone) != self.told_gone):
            self.swarm_size, self.told_gone = len(running), frozenset(gone)
            dht_nodes = sum(inc.phase in DHT_UP for inc in self.peers.values())
            for inc in running:
                inc.actor.call.remote("set_swarm_size", self.swarm_size, dht_nodes, list(gone))

    def _gone(self) -> tuple[str, ...]:
        # (an incarnation being replaced may be in both lists)
        return gone_peer_ids([*self.retired, *self.peers.values()])

    def views(self) -> list[PeerView]:
        now = time.monotonic()
        return [
            PeerView(
                peer=inc.peer,
                phase=inc.phase,
                restarts=inc.restarts,
                epoch=inc.epoch,
                reseeding=inc.donor is not None,
                reason=inc.reason,
                phase_s=now - inc.since,
                progress_age_s=inc.status.progress_age_s if inc.status else 0.0,
                poll_age_s=now - inc.poll_sent if inc.poll else 0.0,
                epoch_s=inc.epoch_s,
                hivemind_error=inc.status.hivemind_error if inc.status else None,
                start_s=self.state_timeout_s,
            )
            for inc in self.peers.values()
        ]

    def progress(self) -> list[tuple[int, int, str, LiveProgress | None]]:
        """(peer, restarts, phase, where its training is) of every live incarnation: the progress display's input."""
        return [(inc.peer, inc.restarts, inc.phase, inc.status.live if inc.status else None) for inc in self.live()]

    def polls_per_peer_s(self) -> float:
        """How often, on average, each peer answered a status poll while the swarm trained."""
        polls = sum(inc.status.polls for inc in [*self.peers.values(), *self.retired] if inc.status)
        seconds = time.monotonic() - (self.training_since or time.monotonic())
        return polls / max(len(self.peers), 1) / seconds if seconds > 0 else float("nan")

    def live(self) -> list[Incarnation]:
        return [inc for inc in self.peers.values() if inc.phase in LIVE]

    def active(self) -> bool:
        """Anything still to train or to decide."""
        return any(inc.phase not in FINISHED for inc in self.peers.values())

    def running_epochs(self) -> dict[int, int]:
        """The last epoch each running peer reported (the scenario's clock)."""
        return {inc.peer: inc.epoch for inc in self.peers.values() if inc.phase == Phase.RUNNING}

    # -- acting ------------------------------------------------------------------------------------------------------

    def carry_out(self, decision: Decision) -> list[list[MetricsRow]]:
        if decision.action == "restart_group":
            return self.restart_group(decision)
        incarnation = self.peers[decision.peer]
        if decision.action == "kill":  # wedged: alive as a process, dead as a peer
            self._kill(incarnation)
            return self._died(incarnation, decision.reason, event="wedged")
        if decision.action == "give_up":
            self._signal(incarnation, Signal.GAVE_UP, decision.reason)
            self._event(incarnation, "gave_up", decision.reason)
            logger.error("peer %d given up: %s", decision.peer, decision.reason)
        elif decision.action == "wait":
            if not incarnation.waiting:
                incarnation.waiting = True
                self._event(incarnation, "waiting", decision.reason)
                logger.warning("peer %d waits: %s", decision.peer, decision.reason)
        else:  # restart, reseed
            if decision.action == "reseed":
                self._event(incarnation, "reseeded", decision.reason)
                logger.warning("peer %d restarts the swarm: %s", decision.peer, decision.reason)
            self._launch(decision.peer, incarnation.restarts + 1, waiting_since=incarnation.since,
                         donor=decision.donor)  # fmt: skip
        return []

    def join(self, peer: int) -> list[list[MetricsRow]]:
        """A new peer (a scripted join) in its reserved bundle: it joins the swarm, or (the all-reduce baseline) the
        group restarts with it."""
        if self.group is None:
            self._launch(peer, restarts=0)
            return []
        donor = max(self.peers.values(), key=lambda inc: (inc.epoch, -inc.peer))
        why = f"peer {peer} joins: the group restarts from peer {donor.peer}'s checkpoint of epoch {donor.epoch}"
        return self.restart_group(Decision("restart_group", peer, why, donor=donor.peer if donor.epoch else None))

    def restart_group(self, decision: Decision) -> list[list[MetricsRow]]:
        """The all-reduce baseline's elastic restart: every running member is stopped (its collective cannot finish
        without the dead one), then every member that remains (the running ones, the dead ones not given up, a
        joiner) starts again as a new incarnation from `decision.donor`'s checkpoint, in a new process group. It
        blocks (no member trains meanwhile). The time lost and the steps redone are in the `group_restarted` event."""
        began, epochs = time.monotonic(), []
        died = [inc for inc in self.peers.values() if inc.phase == Phase.DEAD]  # (none: a join or a leave)
        since = min((inc.since for inc in died), default=began)
        redone = max((inc.status.live.epoch_step for inc in self.peers.values() if inc.status and inc.status.live
                      and inc.phase in (Phase.RUNNING, Phase.DEAD)), default=0)  # fmt: skip
        for incarnation in [inc for inc in self.peers.values() if inc.phase == Phase.RUNNING]:
            self._kill(incarnation)
            epochs += self._died(incarnation, "stopped: the group restarts", event="stopped")
        members = sorted({peer for peer, inc in self.peers.items() if inc.phase == Phase.DEAD}
                         | ({decision.peer} if decision.peer in self.standby else set()))  # fmt: skip
        for peer in members:
            self._relaunch(peer)
        timeout = self.cfg.faults.start_timeout_s + self.state_timeout_s
        incarnations = [self.peers[peer] for peer in members]
        effects = [self.effects.setdefault(peer, Effects()) for peer in members]
        joined = ray.get([inc.actor.call.remote("prepare", effect, decision.donor)
                          for inc, effect in zip(incarnations, effects, strict=True)], timeout=timeout)  # fmt: skip
        self._form_group(incarnations, timeout)
        self._start_training(incarnations, timeout)
        for incarnation, join in zip(incarnations, joined, strict=True):
            self._came_in(incarnation, join)
        self.group = GroupView(len(members), self.group.restarts + bool(died))  # faults.max_restarts: failures
        self._event(incarnations[0], "group_restarted", f"{decision.reason}; {len(members)} members, about {redone} "
                    "steps per member redone", time.monotonic() - since)  # fmt: skip
        logger.warning("the group restarted in %.1f s: %s", time.monotonic() - began, decision.reason)
        return epochs

    def _relaunch(self, peer: int) -> None:
        """A new incarnation of a group member (a dead one's, or a joiner's standby), not yet training."""
        old = self.peers.get(peer)
        if old is not None:
            self.retired.append(old)
            ray.kill(old.actor, no_restart=True)
        incarnation = self.standby.pop(peer, None) or self._create(peer, old.restarts + 1, old.phase)
        incarnation.waiting_since = old.since if old is not None else time.monotonic()
        self._signal(incarnation, Signal.LAUNCHED)
        self.peers[peer] = incarnation

    def _form_group(self, members: list[Incarnation], timeout: float) -> None:
        """The members' process group, ranked by peer index (rank 0 provides the rendezvous); blocks until formed."""
        address = ray.get(members[0].actor.call.remote("rendezvous_address"), timeout=timeout)
        calls = [inc.actor.call.remote("join_allreduce", address, rank, len(members)) for rank, inc in
                 enumerate(members)]  # fmt: skip
        ray.get(calls, timeout=timeout)

    def _launch(self, peer: int, restarts: int, waiting_since: float | None = None, donor: int | None = None) -> None:
        """A newcomer: bootstraps off every peer whose DHT is up (never a swarm of its own, unless `donor` says it
        restarts the swarm from that peer's checkpoint), takes the state, trains the rest of the run."""
        initial_peers = [maddr for inc in self.peers.values() if inc.phase in DHT_UP for maddr in inc.maddrs]
        if not initial_peers and donor is None:
            raise RuntimeError(f"peer {peer} would start a swarm of its own: no peer's DHT is up")  # policy's bug
        if peer in self.peers:
            self.retired.append(self.peers[peer])
            ray.kill(self.peers[peer].actor, no_restart=True)  # frees its bundle, whatever state it was in
        previous = self.peers[peer].phase if peer in self.peers else Phase.STANDBY
        incarnation = self.standby.pop(peer, None) or self._create(peer, restarts, previous)  # (a standby: STANDBY)
        incarnation.donor, incarnation.waiting_since = donor, waiting_since or time.monotonic()
        self._signal(incarnation, Signal.LAUNCHED)
        effects = self.effects.setdefault(peer, Effects())
        size = max(self.swarm_size, 1)
        gone = list(self._gone())  # (a newcomer's first read may still find the dead's records)
        incarnation.launch = incarnation.actor.call.remote("join", initial_peers, effects, size, donor, gone)
        self.peers[peer] = incarnation

    def kill(self, peer: int, process: str = "peer") -> None:
        """A scripted fault: SIGKILL of the peer's process (found dead by the next poll like any other death) or of
        its hivemind DHT process (the peer lives on, wedged, until the policy sees it)."""
        incarnation = self.peers[peer]
        self._event(incarnation, "killed", f"scenario: SIGKILL of its {process} process")
        self.killed_at[peer] = time.monotonic()
        if process == "dht":
            signal_on_node(incarnation.node_id, incarnation.processes[1:2], self.here, signal.SIGKILL)
        else:
            self._kill(incarnation)

    def leave(self, peer: int, after_epoch: int | None) -> None:
        """A scripted leave after `after_epoch` (None: the epoch in progress)."""
        after_epoch = after_epoch or self.peers[peer].epoch + 1
        self._set_effects(peer, f"after epoch {after_epoch}", "leave_requested", leave_after=after_epoch)

    def slow(self, peer: int, factor: float) -> None:
        self._set_effects(peer, f"steps take {factor:g}x as long", "slow", slowdown=factor)

    def scale_lr(self, peer: int, factor: float) -> None:
        self._set_effects(peer, f"learning rate x{factor:g}", "lr", lr_factor=factor)

    def _set_effects(self, peer: int, detail: str, event: str, **changes) -> None:
        """A scenario effect on `peer`: on its running incarnation now, and on every one after it."""
        effects = self.effects[peer] = dataclasses.replace(self.effects.get(peer, Effects()), **changes)
        self.peers[peer].actor.call.remote("apply_effects", effects)
        self._event(self.peers[peer], event, detail)

    def _kill(self, incarnation: Incarnation) -> None:
        actor_process = incarnation.processes[:1]
        if actor_process:
            signal_on_node(incarnation.node_id, actor_process, self.here, signal.SIGKILL)
        else:  # not started far enough to know its process
            ray.kill(incarnation.actor, no_restart=True)

    def _reap(self, incarnation: Incarnation) -> None:
        """hivemind's processes outlive a killed peer (p2pd has no parent-death signal): kill them on its node."""
        signal_on_node(incarnation.node_id, incarnation.processes[1:], self.here, signal.SIGKILL)

    def _event(self, incarnation: Incarnation, event: str, detail: str = "", seconds: float = float("nan")) -> None:
        elapsed, epoch = round(time.monotonic() - self.started, 3), self.collector.swarm_epoch
        self.events.append(Event(elapsed, incarnation.peer, incarnation.restarts, event, detail, seconds, epoch))

    def take_events(self) -> list[Event]:
        events, self.events = self.events, []
        return events

    # -- the end ---------------------------------------------------------------------------------------------------

    def stop(self) -> list[list[MetricsRow]]:
        """Take the answers of the polls in flight, stop every peer whose actor is up (each finishes its step or
        round and shuts hivemind down; finished peers kept theirs up to serve their state), then collect what they
        reported up to there; a peer that does not stop in time is killed later all the same."""
        running = [inc for inc in self.peers.values() if inc.phase == Phase.RUNNING]
        in_flight = {inc.poll: inc for inc in running if inc.poll is not None}
        ready, _ = ray.wait(list(in_flight), num_returns=len(in_flight), timeout=DRAIN_TIMEOUT_S) if in_flight else (
            [], [])  # fmt: skip
        epochs = [rows for ref in ready for rows in self._last_reports(ref)]
        up = self.live() + [inc for inc in self.peers.values() if inc.phase == Phase.DONE]
        stops = [inc.actor.call.remote("stop", STOP_TIMEOUT_S - 5) for inc in up]
        if stops:
            ray.wait(stops, num_returns=len(stops), timeout=STOP_TIMEOUT_S)
        polls = [inc.actor.call.remote("poll") for inc in running]
        ready, _ = ray.wait(polls, num_returns=len(polls), timeout=DRAIN_TIMEOUT_S) if polls else ([], [])
        epochs += [rows for ref in ready for rows in self._last_reports(ref)]
        return epochs + self.collector.flush()

    def _last_reports(self, ref: ray.ObjectRef) -> list[list[MetricsRow]]:
        try:
            reports = ray.get(ref).reports
        except ray.exceptions.RayError:
            return []
        for report in reports:
            self._stamp(report.row)
        return [rows for report in reports for rows in self.collector.add(report)]

    def _stamp(self, row: MetricsRow) -> None:
        """The row's time on the run's clock (from the moment every initial peer trained), not on the peer's."""
        if self.training_since is not None:
            row.run_time_s = time.monotonic() - self.training_since

    def checkpoints(self) -> list[Path]:
        """Where every peer that reported an epoch has its best and final checkpoints (on this machine: its own, or
        copies fetched from other nodes)."""
        peers = sorted({inc.peer for inc in [*self.peers.values(), *self.retired] if inc.epoch > 0})
        return [checkpoint_path(self.checkpoint_dir, peer, kind) for peer in peers for kind in ("best", "final")]

    def fetch_final_models(self) -> None:
        """Copy peer-<i>_final.pt of the peers on other nodes into this machine's checkpoint folder (the run folder
        unless checkpoint_dir is set), one at a time: no shared filesystem needed."""
        remote = [inc for inc in self.peers.values() if inc.node_id != self.here and inc.phase != "starting"]
        deadline, fetched = time.monotonic() + FETCH_TIMEOUT_S, []
        for inc in remote:
            try:
                data = ray.get(
                    inc.actor.call.remote("checkpoint_bytes", "final"), timeout=max(0.1, deadline - time.monotonic())
                )
                if data is not None:
                    atomic_write_bytes(checkpoint_path(self.checkpoint_dir, inc.peer, "final"), data)
                    fetched.append(inc.peer)
            except (ray.exceptions.RayError, OSError) as err:
                logger.warning("peer %d's final model could not be fetched: %s", inc.peer, err)
        if fetched:
            logger.info("fetched the final models of peers %s from their nodes into %s", fetched, self.checkpoint_dir)

    def shutdown(self) -> None:
        """Kill every actor, reap every incarnation's hivemind processes on its own node, free the placement."""
        everyone = list(self.peers.values()) + self.retired + list(self.standby.values())
        for incarnation in everyone:
            ray.kill(incarnation.actor, no_restart=True)
        for incarnation in everyone:
            self._reap(incarnation)
        if self.placement_group is not None and self.first_bundle == 0:  # a Tune trial's group is Tune's
            remove_placement_group(self.placement_group)


def actor_name(run_id: str, peer: int, restarts: int = 0) -> str:
    return f"{run_id}/peer-{peer}" + (f"/restart-{restarts}" if restarts else "")


def signal_on_node(node_id: str, processes: list[tuple[int, float]], here: str, sig: int) -> None:
    """Send `sig` to `processes` ((pid, create time) pairs) on the Ray node where they live: directly when that is
    this node, else through a task pinned to that node. Never to a pid that was since reused."""
    if not processes:
        return
    if node_id == here:
        signal_processes(processes, sig)
    else:
        pinned = NodeAffinitySchedulingStrategy(node_id, soft=False)
        ray.remote(num_cpus=0)(signal_processes).options(scheduling_strategy=pinned).remote(processes, sig)


def signal_processes(processes: list[tuple[int, float]], sig: int) -> list[str]:
    """The names of the processes that got `sig` (those still alive with their original create time)."""
    hit = []
    for pid, create_time in processes:
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == create_time and proc.status() != psutil.STATUS_ZOMBIE:
                hit.append(proc.name())
                os.kill(pid, sig)
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    if hit:
        logger.info("sent signal %d to %s", sig, ", ".join(hit))
    return hit
