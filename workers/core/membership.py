"""A run's secret key, the proofs of membership made from it, and the anomalies hivemind's processes report
(workers/averaging/admission.py uses them inside hivemind). No hivemind here: the config checks a key file at load time."""

from __future__ import annotations

import hashlib
import hmac
import multiprocessing as mp
import queue
import secrets
import time
from collections import Counter
from pathlib import Path

KEY_BYTES = 32
MEMBERSHIP_S = 7 * 24 * 3600.0  # how long a published proof stays in the DHT


class SwarmKeyError(ValueError):
    pass


def new_swarm_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def read_swarm_key(path: str | Path) -> bytes:
    """A key file: 64 hex digits (`python -c "import secrets; print(secrets.token_hex(32))" > swarm.key`)."""
    path = Path(path).expanduser()
    try:
        key = bytes.fromhex(path.read_text().strip())
    except OSError as err:
        raise SwarmKeyError(f"swarm key file {path}: {err.strerror}") from None
    except ValueError:
        raise SwarmKeyError(f"swarm key file {path}: not hex digits") from None
    if len(key) < 16:
        raise SwarmKeyError(f"swarm key file {path}: {len(key)} bytes, at least 16 needed")
    return key


def membership_proof(key: bytes, peer_id: bytes) -> bytes:
    return hmac.new(key, b"gossip-launcher member " + peer_id, hashlib.sha256).digest()


def is_member(key: bytes, peer_id: bytes, proof: object) -> bool:
    return isinstance(proof, bytes) and hmac.compare_digest(proof, membership_proof(key, peer_id))


def members_key(prefix: str) -> str:
    return f"{prefix}.members"


class Anomalies:
    """What hivemind's processes (the DHT's, the averager's) refused, for the peer to report as events: a queue
    shared with those forked processes, at most one entry per kind and stranger a second."""

    def __init__(self) -> None:
        self._queue: mp.Queue = mp.get_context("fork").Queue()
        self._last_sent: dict[tuple[str, str], float] = {}
        self._unsent: Counter[tuple[str, str]] = Counter()

    def report(self, what: str, who: str = "unknown") -> bool:
        """Count one; whether it was sent now (else it goes with the next one of its kind)."""
        key, now = (what, who), time.monotonic()
        self._unsent[key] += 1
        if now - self._last_sent.get(key, 0.0) < 1.0:
            return False
        self._queue.put((what, who, self._unsent.pop(key)))
        self._last_sent[key] = now
        return True

    def take(self) -> list[tuple[str, str, int]]:
        """(what was refused, to whom, how many times) since the last call."""
        taken: Counter[tuple[str, str]] = Counter()
        while True:
            try:
                what, who, count = self._queue.get_nowait()
            except (queue.Empty, OSError, ValueError):
                break
            taken[(what, who)] += count
        return [(what, who, count) for (what, who), count in taken.items()]
