"""`gossip.method: sgp`: Stochastic Gradient Push (Assran et al., ICML 2019): push-sum mixing (workers/averaging/
pushsum.py) every H = `gossip.every_steps` local steps, or once per epoch. Each round a peer sends half of its
weighted parameters to one out-neighbour of the one-peer exponential graph over the live members and adds what it
received: one message per peer and round, no group to assemble, no barrier.

- Round index: k = step // H, from the step count over the run (a newcomer takes its donor's with the state), or the
  epoch number with `every_steps: epoch`: the same on every peer, so the peers agree on the graph.
- Synchronous by default: a round waits (up to `gossip.round_timeout`) for its one incoming message, so the peers go
  in lockstep. `gossip.overlap`: the overlapped variant: a message is added when it arrives, keeping the local steps
  taken since this peer's own send; a round waits only when its peer is more than 2 rounds ahead of the peer that
  sends to it (the paper's bounded delay). Before an epoch's evaluation the peer takes its last round's message (as a
  synchronous round would), and what arrives during the evaluation waits for the next step: the evaluation, the
  checkpoint and the report see one model.
- Round counts: a round is one send. `averaging_rounds_ok`: the target accepted it; `averaging_rounds_failed`: it
  was not delivered (refused, unreachable, timed out), or the round sent nothing (no other live member; overlapped:
  two sends still in flight). `averaging_group_size` is 2 for a round that succeeded (the sender's half met the
  target's parameters). `averaging_bytes`: the messages this peer sent, measured (each byte counted once in the
  swarm); `messages_received` and `messages_dropped`: the messages it added, and those addressed to it it refused.
- State: a newcomer or a restarted peer downloads a live peer's state through a hivemind averager that only serves
  state (gossip's, with admission; it never averages), and starts with push-sum weight 1. A killed peer's mass is
  lost, which push-sum tolerates (the de-biased parameters stay an average of the survivors). A peer enters the
  graph (its liveness record) when it starts training, and leaves it after its last epoch or when it diverges.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from workers.averaging.base import AveragingStrategy, Diverged, averaged_tensors
from workers.averaging.gossip import compression, swarm_averager_class
from workers.averaging.levers import Levers
from workers.averaging.pushsum import NonFiniteParameters, PushSum
from workers.core.config import GossipConfig
from workers.peer.state import DONOR_WAIT_S

JOIN_WAIT_S = 10.0  # how long a peer entering the graph waits to see the swarm's live members (views then agree)
GROUP_SIZE = 2  # a push-sum round mixes a sender's half into one target


class SgpAveraging(AveragingStrategy):
    shares_state = True
    skips_rounds = True

    def __init__(self, model: nn.Module, dht, cfg: GossipConfig, prefix: str, lock: threading.Lock | None = None,
                 swarm_key: bytes | None = None, anomalies=None, swarm_size: int | None = None,
                 epoch: Callable[[], int] | None = None):  # fmt: skip
        """`swarm_size`: the peers expected in the graph when this one enters it (`set_swarm_size` updates it; None:
        an open swarm, nobody to wait for). `epoch`: the epoch being trained, the round index of `every_steps:
        epoch`."""
        super().__init__()
        self.cfg, self.lock, self.swarm_size, self.epoch = cfg, lock or threading.Lock(), swarm_size or 1, epoch
        self.tensors = averaged_tensors(model)
        self._held = False
        self._priority = None
        self.sharer = state_sharer(dht, prefix, swarm_key, anomalies)  # forks hivemind's process: before PushSum
        self.push_sum = PushSum(dht, prefix, self.tensors, swarm_key=swarm_key, anomalies=anomalies,
                                codec=compression(cfg.compression), overlap=cfg.overlap, timeout=cfg.round_timeout,
                                lean_dht=Levers.of(cfg).lean_dht, lock=self.lock)  # fmt: skip

    def set_swarm_size(self, peers: int, dht_nodes: int = 0, gone: Sequence[str] = ()) -> None:
        self.swarm_size = max(peers, 1)
        self.push_sum.expect(peers, dht_nodes, gone)

    def share_state(self, provider, priority) -> None:
        """Serve the state to newcomers, and enter the graph (training starts, or goes on after a reload)."""
        self.sharer.state_provider, self._priority = provider, priority
        self.sharer.state_sharing_priority = priority()
        self.sharer.allow_state_sharing = True
        self.push_sum.join(expected=self.swarm_size, wait=JOIN_WAIT_S)

    def download_state(self, timeout: float) -> tuple[dict, list[torch.Tensor]] | None:
        return self.sharer.load_state_from_peers(timeout=timeout)

    def withhold_state(self) -> None:
        """This peer diverged: it serves no state and leaves the graph until it shares again."""
        self.sharer.allow_state_sharing = False
        self.push_sum.leave()

    def drop_round(self) -> None:
        self.push_sum.discard()

    def load_method_state(self, tensors: list[torch.Tensor] | None) -> None:
        """The parameters were replaced (a donor's, a checkpoint's): they count as one peer's, weight 1."""
        self.push_sum.reset_weight()

    def averages_after_step(self, step: int) -> bool:
        return self.cfg.every_steps != "epoch" and step % self.cfg.every_steps == 0

    def averages_at_epoch_end(self) -> bool:
        return self.cfg.every_steps == "epoch"

    def before_step(self) -> None:
        if self._held:  # the epoch's evaluation is over: messages land as they come again
            self._held = False
            self.push_sum.hold(False)

    def after_step(self, step: int, left: int = 0) -> None:
        if self.averages_after_step(step):
            self.average(step // self.cfg.every_steps)

    def after_epoch(self, last: bool = True) -> None:
        if self.averages_at_epoch_end():
            self.average(self.epoch())
        started = time.perf_counter()
        if self.cfg.overlap:  # the evaluation sees the epoch's last round whole
            self.push_sum.settle()
        if last:  # its sends land, what came is added, then it leaves the graph (it keeps serving its state)
            self.push_sum.flush()
            self.push_sum.apply_due()
            self.push_sum.leave()
        elif self.cfg.overlap:  # what comes during the evaluation waits for the next step
            self._held = True
            self.push_sum.hold(True)
        self._count(time.perf_counter() - started)
        if self.sharer.allow_state_sharing:
            self.sharer.state_sharing_priority = self._priority()

    def average(self, k: int) -> None:
        """Round k. A peer whose training blew up shares nothing: Diverged, and the round is skipped (not counted)."""
        started = time.perf_counter()
        try:
            self.round_starts()  # the training loop's guard (non-finite parameters or loss, a finite blow-up)
            self.push_sum.round(k)
        except (Diverged, NonFiniteParameters) as err:
            raise Diverged(f"{err}: it skipped the round") from None
        self._count(time.perf_counter() - started)

    def _count(self, seconds: float) -> None:
        """The sends that ended since the last call: ok when delivered; failed when not, or when a round sent none."""
        counts = self.push_sum.take_counts()
        for _ in range(counts.accepted):
            self.stats.record(GROUP_SIZE, 0.0)
        for _ in range(counts.sends - counts.accepted + counts.skipped):
            self.stats.record(None, 0.0)
        self.stats.add_seconds(seconds)
        self.stats.add_bytes(counts.bytes_sent)
        self.stats.add_messages(counts.received, counts.dropped)

    def shutdown(self) -> None:
        self.push_sum.shutdown()
        self.sharer.shutdown()


def state_sharer(dht, prefix: str, swarm_key: bytes | None, anomalies):
    """gossip's hivemind averager (admission: only the run's members download) used only to serve and download the
    state: it averages one dummy value, never in a round."""
    return swarm_averager_class()(
        [torch.zeros(1)],
        dht,
        prefix=prefix,
        target_group_size=GROUP_SIZE,
        allow_state_sharing=False,  # until share_state: a newcomer must not serve its fresh initialisation
        levers=Levers(sticky=False, gloo=False),  # it never averages: no sticky group to keep alive
        next_chunk_timeout=DONOR_WAIT_S + 30.0,  # a donor answers once its epoch has ended (workers/peer/state.py)
        swarm_key=swarm_key,
        anomalies=anomalies,
        start=True,
    )
