"""A stranger to a run, as the closed-swarm test starts it in a process of its own: a plain hivemind peer that knows
the run's id (its DHT prefix) and peer 0's address, and averages tensors of the model's shapes all set to 50.0, but
holds no key. It tries for `--seconds`: rounds through the DHT, and matchmaking and a state download sent straight to
peer 0 (whose PeerID is in its address). Prints one JSON line: what it got.

    python -m tests.stranger RUN_ID MADDR [MADDR ...] [--seconds S] [--method gossip|optimizer]

With `--method optimizer` it asks hivemind.Optimizer's state averager (`<RUN_ID>_state_averager`) directly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import hivemind
import torch
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time

from tests.conftest import quick_config
from workers.averaging.base import averaged_tensors
from workers.averaging.flat import FlatLayout
from workers.averaging.gossip import swarm_averager_class
from workers.peer.data import load_dataset
from workers.peer.models import build_model

POISON = 50.0
# the run's own averager class, without a key: the stranger has read this project's code, so its RPCs reach the
# handlers by their names (hivemind names them after the class)
Averager = swarm_averager_class()


def model_tensors() -> list[torch.Tensor]:
    cfg = quick_config()
    splits = load_dataset(cfg.data)
    model = build_model(cfg.model, splits.num_classes, splits.input_shape)
    tensors = averaged_tensors(model)  # as the run's averagers hold them: one flat buffer per dtype
    return [torch.full_like(buffer, POISON) for buffer in FlatLayout(tensors).buffers(tensors)]


def target(run_id: str, method: str) -> tuple[type, str]:
    """The class whose handlers peer 0 serves (hivemind names them after it) and their namespace."""
    if method == "optimizer":
        from workers.averaging.optimizer import ContiguousStateAverager

        return ContiguousStateAverager, f"{run_id}_state_averager"
    return Averager, run_id


async def ask_directly(dht: hivemind.DHT, run_id: str, peer0: PeerID, schema_hash: bytes, method: str) -> dict:
    """Matchmaking and a state download sent to peer 0 itself, not found through the DHT."""
    p2p = await dht.replicate_p2p()
    servicer, namespace = target(run_id, method)
    stub = servicer.get_stub(p2p, peer0, namespace=namespace)
    request = averaging_pb2.JoinRequest(schema_hash=schema_hash, expiration=get_dht_time() + 5,
                                        group_key=f"{namespace}.0b")  # fmt: skip
    codes, state_parts = [], 0
    try:
        async for message in await stub.rpc_join_group(request):
            codes.append(averaging_pb2.MessageCode.Name(message.code))
            break
    except Exception as err:  # noqa: BLE001 (a refusal may also close the stream)
        codes.append(type(err).__name__)
    try:
        async for _ in await stub.rpc_download_state(averaging_pb2.DownloadRequest()):
            state_parts += 1
    except Exception:  # noqa: BLE001
        pass
    return {"join_codes": codes, "state_parts": state_parts}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_id")
    parser.add_argument("maddrs", nargs="+")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--method", choices=("gossip", "optimizer"), default="gossip")
    args = parser.parse_args()
    dht = hivemind.DHT(initial_peers=args.maddrs, start=True, ensure_bootstrap_success=False)
    tensors = model_tensors()
    averager = Averager(tensors, dht, prefix=args.run_id, target_group_size=4, min_group_size=2,
                        min_matchmaking_time=1.0, request_timeout=0.5, start=True)  # fmt: skip
    peer0 = PeerID.from_base58(args.maddrs[0].rsplit("/p2p/", 1)[1])
    rounds_ok, direct, deadline = 0, [], time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        try:
            rounds_ok += bool(averager.step(timeout=2.0))
        except Exception:  # noqa: BLE001 (no group: what a stranger should get)
            pass
        direct.append(asyncio.run(ask_directly(dht, args.run_id, peer0, averager.schema_hash, args.method)))
    state = averager.load_state_from_peers(timeout=5.0)
    print(json.dumps({"rounds_ok": rounds_ok, "direct": direct, "state_downloaded": state is not None}), flush=True)
    averager.shutdown()
    dht.shutdown()


if __name__ == "__main__":
    main()
