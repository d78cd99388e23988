"""What hivemind's processes (a peer's DHT, its averager) refused, for the peer to report to the driver as events:
strangers, replays, clock skew, non-finite parts, groups larger than the swarm."""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from collections import Counter


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
