"""Gossip rounds of the whole swarm over gloo (the `gloo` lever, `gossip.sticky_transport: gloo`).

In a swarm that fits in one group every matchmade round forms the same group, and a round through hivemind costs
each peer ~20 ms of CPU whatever it moves: the step's hand-over to the averager's process (pipes, shared memory),
the DHT, protobuf parts through p2pd. So once a matchmade round has shown that the group is the whole swarm, its
members open a gloo process group among themselves, in the peer's own process, and run the next rounds through it
(one collective per dtype, from the training thread's side of the averager's buffers): about what the all-reduce
baseline pays (docs/performance.md).

Forming (`plan`, pure). Every member offers, in hivemind's gathered data, its rendezvous store's address, the swarm
size the driver last told it, and how many groups it has led. After a complete matchmade round every member holds the
same gathered data, so every member decides alike: a group forms when every member offered an address and counted the
swarm as exactly this group. Its ranks are the members' PeerIDs in order; it meets at rank 0's store, under a prefix
made of the members and rank 0's count (a new one for every group), keyed with the run's swarm key. Where they did
not all count it so (the driver's new count reaches the peers one by one), hivemind keeps the group (sticky.py) until
the swarm changes again: a sticky round hands out the gathered data of the round that formed it.

Leaving. Every round's collective carries each member's wish to leave (the driver told it another swarm size: a
newcomer or a death; or it ends its run); the sum is the same on every member, so all leave after the same round and
the next one is matchmade. A member that dies, or shuts its group down, fails the others' collective at once (a
closed connection); one that stops coming fails it after the timeout. A failed round falls back to hivemind at once
(gossip.py). gloo runs each member's collectives in order, so rounds stay matched: a round completes at a member
only if every member ran it.

Giving up. A peer whose group did not form, or whose round ran out of time (a link too slow for the timeout, where
hivemind's streamed parts still get through), twice, stops offering gloo; every member then sees a group without
gloo in the gathered data, and hivemind keeps the group instead (sticky.py reads the same `plan`).

gloo's data plane is not authenticated, as the all-reduce baseline's (torch.distributed) is not; the rendezvous is
only found by members (its address travels in the admitted members' gathered data, its prefix needs the swarm key).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from workers.core.netns import enter_namespace_fd

logger = logging.getLogger(__name__)

SETBACKS = 2  # groups that did not form, or rounds that ran out of time, before a peer stops offering gloo


def ip4_host(maddrs) -> str | None:
    """The IPv4 address of a peer's first /ip4/ multiaddr (the one it announces), or None."""
    for maddr in map(str, maddrs):
        parts = maddr.split("/")
        if len(parts) > 2 and parts[1] == "ip4":
            return parts[2]
    return None


@dataclass(frozen=True)
class Plan:
    address: str  # rank 0's rendezvous store, "host:port"
    prefix: str
    rank: int
    size: int


def plan(gathered: dict[bytes, object], me: bytes, swarm_key: bytes | None) -> Plan | None:
    """The gloo group of a complete matchmade round's members (`gathered`: each member's PeerID bytes -> its gathered
    data), or None: fewer than 2 members, or one offered no rendezvous or counts the swarm otherwise. The same on
    every member."""
    members = sorted(gathered)
    offers, size = [gathered[peer] for peer in members], len(members)
    valid = all(isinstance(offer, dict) and isinstance(offer.get("gloo"), str) for offer in offers)
    if size < 2 or not valid or any(offer.get("swarm") != size for offer in offers):
        return None
    named = b"".join(members) + str(offers[0].get("led", 0)).encode()
    prefix = hmac.new(swarm_key or b"open", b"gloo/" + named, hashlib.sha256).hexdigest()[:32]
    return Plan(offers[0]["gloo"], prefix, members.index(me), size)


@torch.no_grad()
def allreduce_mean_(group, tensors, alpha: float = 1.0, leave: bool = False) -> int:
    """Move each tensor `alpha` of the way to the members' mean (hivemind's averaging_alpha), one collective per
    tensor (the averager's flat buffers: one per dtype); the first carries the members' wishes to leave, whose count
    it returns."""
    left = 0
    for index, tensor in enumerate(tensors):
        flat = tensor.view(-1)  # (in place: the averager's buffers are contiguous)
        extra = [float(leave)] if index == 0 else []
        buffer = torch.cat([flat, flat.new_tensor(extra)])
        group.allreduce([buffer]).wait()
        if index == 0:
            left = round(float(buffer[-1]))
        mean = buffer[: flat.numel()] / group.size()  # (bitwise alike on every member: the ring hands out one sum)
        if alpha == 1:
            flat.copy_(mean)
        else:
            flat.add_(mean - flat, alpha=alpha)
    return left


def close(group) -> None:
    """Shut a process group down: its connections close, and the members' collectives in flight fail at once."""
    try:
        group.shutdown()
    except Exception as err:  # noqa: BLE001 (a group whose connections already broke)
        logger.debug("gloo group shut down with %r", err)


class GlooRounds:
    """A peer's side of the transport: its rendezvous store, the one thread that forms its groups and runs their
    collectives (in the network namespace this object was made in: an emulated peer's link), and its group, if any."""

    def __init__(self, host: str, timeout_s: float, swarm_key: bytes | None = None):
        """`host`: the address this peer announces; `timeout_s`: how long a group waits to form, and a collective for
        its slowest member."""
        from torch.distributed import TCPStore

        self.host, self.timeout_s, self.swarm_key = host, timeout_s, swarm_key
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.store = TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=self.timeout)
        self.address = f"{host}:{self.store.port}"
        self.led = 0  # the groups this peer was rank 0 of: a new rendezvous prefix for each
        self.namespace = os.open("/proc/thread-self/ns/net", os.O_RDONLY)  # (the thread enters it when it starts)
        self.thread = ThreadPoolExecutor(1, "gloo", initializer=enter_namespace_fd, initargs=(self.namespace,))
        self.group = None
        self.forming: Future | None = None
        self.setbacks = 0

    def offer(self, swarm: int | None) -> dict:
        """This peer's gathered data: its rendezvous (None: it gave up on gloo), the swarm size it was told (None:
        not told), its groups led."""
        return dict(gloo=self.address if self.setbacks < SETBACKS else None, swarm=swarm, led=self.led)

    def form(self, gathered: dict[bytes, object], me: bytes) -> None:
        """After a complete matchmade round (`gathered`: PeerID bytes -> gathered data): join its members' group, if
        `plan` says they all do (in the background; `ready` waits for it)."""
        found = plan(gathered, me, self.swarm_key)
        if found is not None and self.group is None:
            self.led += found.rank == 0
            self.forming = self.thread.submit(self._form, found)

    def _form(self, found: Plan):
        from torch.distributed import PrefixStore, ProcessGroupGloo, TCPStore

        store_host, port = found.address.rsplit(":", 1)
        store = PrefixStore(found.prefix, TCPStore(store_host, int(port), is_master=False, timeout=self.timeout))
        options = ProcessGroupGloo._Options()
        options._timeout, options._threads = self.timeout, 1
        options._devices = [ProcessGroupGloo.create_device(hostname=self.host)]  # this peer's address (its link)
        return ProcessGroupGloo(store, found.rank, found.size, options)

    def ready(self) -> bool:
        """Whether this peer is in a group: a group being formed is waited for (every member's next round depends on
        it alike)."""
        if self.forming is not None:
            forming, self.forming = self.forming, None
            try:
                self.group = forming.result()
            except Exception as err:  # noqa: BLE001 (a member did not come: every member's group failed alike)
                logger.warning("no gloo group: %s", str(err)[:200])
                self.setbacks += 1
        return self.group is not None

    def run(self, tensors, alpha: float, leave: bool) -> int:
        """A round through the group (on the gloo thread's caller: see `GossipAveraging`): its size. Everyone leaves
        the group after it if anyone wished to; RuntimeError (and no group) if it failed."""
        group, started = self.group, time.monotonic()
        try:
            left = allreduce_mean_(group, tensors, alpha, leave)
        except RuntimeError:
            self.setbacks += time.monotonic() - started >= 0.9 * self.timeout_s  # out of time (not a member gone)
            self.leave()
            raise
        if left:
            self.leave()
        return group.size()

    def leave(self) -> None:
        if self.group is not None:
            close(self.group)
            self.group = None

    def shutdown(self) -> None:
        """Leave the group and release the rendezvous store here and now (a gloo object's destructor must not run
        in a process forked from this one: its threads are not there)."""
        self.ready()
        self.leave()
        self.thread.shutdown(wait=True)
        self.store = None
        if self.namespace is not None:
            os.close(self.namespace)
            self.namespace = None
