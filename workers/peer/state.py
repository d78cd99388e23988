"""A peer's training state as hivemind ships it between peers: a small metadata dict plus a list of tensors.

A peer that restarts or joins a running swarm builds itself fresh, then takes its state from one source: a live
peer (the swarm's current parameters, optimizer state and position in the run), else its own last checkpoint,
else its fresh initialisation. `snapshot` is what a live peer serves; `apply_snapshot` is what the newcomer does
with it. The position includes how many steps into the current epoch the donor is, so the newcomer's epochs end
(and their averaging rounds start) together with the swarm's. A donor caught between an epoch's last step and its
report (its round, its evaluation) waits for the report before it answers: the newcomer would be too late for that
round, and its rounds would then be matched with the swarm's rounds of the next epoch. Rounds are matched by time,
not by epoch. (Past `wait_s` it answers anyway, and the newcomer skips to the start of the next epoch.)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch

from workers.averaging.base import averaged_tensors
from workers.peer.setup import TrainSetup

DONOR_WAIT_S = 60.0  # the longest a donor waits for its epoch's end (a round, an evaluation) before it answers
UNKNOWN_LINK_MBIT = 100.0  # the rate assumed for a state download where no link rate is configured


def slowest_link_mbit(emulation) -> float | None:
    """The slowest rate of an emulated swarm's links (EmulationConfig), where a state download may have to go; None
    when no link is shaped."""
    rates = [emulation.rate_mbit] + [rate for link in emulation.links.values()
                                     for rate in (link.rate_mbit, link.up_mbit, link.down_mbit)]  # fmt: skip
    rates = [rate for rate in rates if rate]
    return min(rates) if rates else None


def state_timeout_s(state_bytes: int, rate_mbit: float | None) -> float:
    """The one timeout of a state download (a newcomer's, a diverged peer's reload): the donor's wait for its epoch's
    end, plus three times the transfer at the link's rate (emulation's, else UNKNOWN_LINK_MBIT), plus 30 s.
    ResNet-50's state (parameters and momentum, 188 MB) at 5 Mbit/s: 60 + 3 x 301 + 30 = 993 s."""
    transfer_s = 8 * state_bytes / ((rate_mbit or UNKNOWN_LINK_MBIT) * 1e6)
    return DONOR_WAIT_S + 3 * transfer_s + 30.0


def snapshot(
    setup: TrainSetup, wait_s: float = DONOR_WAIT_S, method_state: Callable[[], list[torch.Tensor]] | None = None
) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """(metadata, tensors) of this peer now: parameters and float buffers, then every tensor of the optimizer's
    per-parameter state (e.g. SGD's momentum buffers), then the averaging method's own (`method_state()`, e.g.
    DiLoCo's θ_sync and outer momentum). Taken under the setup's lock, so never half a step or half a round."""
    optimizer = setup.scheduler.optimizer  # the torch optimizer, even when a hivemind wrapper steps it
    deadline = time.monotonic() + wait_s
    while setup.epoch_ending and time.monotonic() < deadline:
        time.sleep(0.05)
    with setup.lock:
        tensors = [t.detach().to("cpu", copy=True) for t in averaged_tensors(setup.model)]
        optimizer_keys = []
        for index, param in enumerate(p for group in optimizer.param_groups for p in group["params"]):
            for key, value in sorted(optimizer.state.get(param, {}).items()):
                if isinstance(value, torch.Tensor):
                    optimizer_keys.append([index, key])
                    tensors.append(value.detach().to("cpu", copy=True))
        method_tensors = method_state() if method_state is not None else []
        tensors += method_tensors
        metadata = {
            "peer": setup.peer,
            "progress": {k: v for k, v in dataclasses.asdict(setup.progress).items() if k != "best_acc"},
            "scheduler": _plain(setup.scheduler.state_dict()),
            "optimizer_keys": optimizer_keys,
            "method_tensors": len(method_tensors),
            "epoch_ending": setup.epoch_ending,
        }
    return metadata, tensors


def apply_snapshot(
    setup: TrainSetup, metadata: dict[str, Any], tensors: list[torch.Tensor], optim_cfg
) -> list[torch.Tensor]:
    """Make this (freshly built, not yet training) peer continue where the donor is. Returns the averaging method's
    own tensors, for its `load_method_state`."""
    from workers.peer.schedule import resume_schedule

    own, method_tensors = averaged_tensors(setup.model), metadata.get("method_tensors", 0)
    optimizer_end = len(tensors) - method_tensors
    if optimizer_end != len(own) + len(metadata["optimizer_keys"]):
        raise ValueError(f"peer {metadata['peer']} sent {len(tensors)} tensors for a model of {len(own)}")
    optimizer = setup.scheduler.optimizer
    params = [p for group in optimizer.param_groups for p in group["params"]]
    with torch.no_grad():
        for dst, src in zip(own, tensors, strict=False):
            dst.copy_(src.to(dst.device).view_as(dst))
        for (index, key), value in zip(metadata["optimizer_keys"], tensors[len(own) : optimizer_end], strict=True):
            optimizer.state[params[index]][key] = value.to(params[index].device)
    resume_schedule(optimizer, setup.scheduler, metadata["scheduler"], optim_cfg)
    setup.progress = dataclasses.replace(setup.progress, **metadata["progress"])
    if metadata["epoch_ending"]:  # the donor's epoch ends without us: start the next one with the swarm
        setup.progress.epoch, setup.progress.epoch_step = setup.progress.epoch + 1, 0
        setup.scheduler.step()
    return tensors[optimizer_end:]


def _plain(value: Any) -> Any:
    """A scheduler's state dict as msgpack-able data (hivemind serializes the metadata with msgpack)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if not callable(v)}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value
