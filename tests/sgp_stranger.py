"""A stranger to a closed sgp swarm, as tests/test_sgp.py starts it in a process of its own: a plain hivemind peer that
knows the run's prefix and a member's address, and has read this project's code, but holds no key of the run. It tries
to store a liveness record with a forged proof, then sends push-sum messages (all values 50.0) straight to the
member's handler: with no proof, with a proof under another key, and with the member's own proof copied (as if read
from somewhere). Prints one JSON line: its PeerID and the member's answers.

    python -m tests.sgp_stranger PREFIX MADDR NUMEL COPIED_PROOF_HEX
"""

from __future__ import annotations

import asyncio
import json
import sys

import hivemind
import torch
from hivemind.compression import NoCompression
from hivemind.p2p import PeerID
from hivemind.utils.timed_storage import get_dht_time

from workers.averaging.pushsum_wire import STATUS, push
from workers.core.membership import membership_proof

POISON = 50.0


def main() -> None:
    prefix, maddr, numel, copied = sys.argv[1], sys.argv[2], int(sys.argv[3]), bytes.fromhex(sys.argv[4])
    member = PeerID.from_base58(maddr.rsplit("/p2p/", 1)[1])
    dht = hivemind.DHT(initial_peers=[maddr], host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True,
                       ensure_bootstrap_success=False)  # fmt: skip
    me = dht.peer_id.to_bytes()
    forged = membership_proof(b"not the run's key, 32 bytes long", me)
    dht.store(f"{prefix}.sgp_live", {"proof": forged, "live": True}, get_dht_time() + 60, subkey=me)

    async def send_all() -> dict:
        p2p = await dht.replicate_p2p()
        statuses = {}
        for name, proof in (("no proof", None), ("other key", forged), ("copied proof", copied)):
            outcome = await push(p2p, member, f"{prefix}.PushSum.push", k=0, weight=0.5, proof=proof,
                                 flat=torch.full((numel,), POISON), codec=NoCompression())  # fmt: skip
            statuses[name] = STATUS.get(outcome.status, outcome.status)
        return statuses

    statuses = asyncio.run(send_all())
    print(json.dumps({"peer_id": str(dht.peer_id), "statuses": statuses}), flush=True)
    dht.shutdown()


if __name__ == "__main__":
    main()
