"""A run's secret key and the proofs of membership made from it (workers/averaging/admission.py uses them inside
hivemind). No hivemind here: the config checks a key file at load time, the driver makes a run's key."""

from __future__ import annotations

import hashlib
import hmac
import secrets
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
