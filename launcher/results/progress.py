"""The swarm's progress within an epoch: per peer its epoch, step, samples/s and rounds.

In a terminal a live table (rich) redraws in place, with the driver's log lines above it; when stderr is not a
terminal (Ray Jobs logs, CI, a file) one plain log line every `interval_s`, never a flood.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass

from workers.core.protocol import LiveProgress

logger = logging.getLogger("launcher.results.progress")

LOG_INTERVAL_S = 30.0


@dataclass(frozen=True)
class PeerLine:
    peer: int
    restarts: int
    phase: str
    epoch: int
    epochs: int
    step: int
    steps: int
    samples_per_s: float
    rounds_ok: int
    rounds_failed: int


def samples_rate(previous: tuple[float, int] | None, now: float, samples: int) -> float:
    """Samples per second since the previous observation (NaN for the first one, or a restarted count)."""
    if previous is None or now <= previous[0] or samples < previous[1]:
        return float("nan")
    return (samples - previous[1]) / (now - previous[0])


def rate_text(samples_per_s: float, unit: str = "") -> str:
    """A rate as shown: "-" until there are two observations to take it from."""
    return "-" if math.isnan(samples_per_s) else f"{samples_per_s:.0f}{unit}"


def format_line(lines: list[PeerLine], elapsed_s: float) -> str:
    """One compact line for logs: `peer 0 e2/10 37/56 412/s r3` per peer."""
    parts = []
    for line in lines:
        rate = rate_text(line.samples_per_s, "/s")
        failed = f"+{line.rounds_failed}x" if line.rounds_failed else ""
        state = "" if line.phase == "running" else f" {line.phase}"
        parts.append(f"peer {line.peer} e{line.epoch}/{line.epochs} {line.step}/{line.steps} {rate} "
                     f"r{line.rounds_ok}{failed}{state}")  # fmt: skip
    return f"progress {elapsed_s:.0f} s | " + " | ".join(parts)


class ProgressDisplay:
    """Fed the live peers' last status on every driver tick; shows it in place or logs it at a steady rate."""

    def __init__(self, epochs: int, interactive: bool | None = None, interval_s: float | None = None):
        self.epochs, self.interval_s = epochs, LOG_INTERVAL_S if interval_s is None else interval_s
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self._seen: dict[tuple[int, int], tuple[float, int]] = {}
        self._rates: dict[tuple[int, int], float] = {}
        self._last_log, self._live, self.started = -math.inf, None, time.monotonic()

    def update(self, peers: list[tuple[int, int, str, LiveProgress | None]]) -> list[PeerLine]:
        """`peers`: (peer, restarts, phase, live progress) of each incarnation; returns what it showed."""
        now = time.monotonic()
        lines = [self._line(peer, restarts, phase, live, now) for peer, restarts, phase, live in peers if live]
        if self.interactive:
            self._show(lines)
        elif lines and now - self._last_log >= self.interval_s:
            self._last_log = now
            logger.info(format_line(lines, now - self.started))
        return lines

    def _line(self, peer: int, restarts: int, phase: str, live: LiveProgress, now: float) -> PeerLine:
        key = (peer, restarts)
        previous = self._seen.get(key)
        if previous is None or live.samples_seen != previous[1]:  # a new observation (polls may repeat one)
            rate = samples_rate(previous, now, live.samples_seen)
            self._rates[key] = self._rates.get(key, rate) if math.isnan(rate) else rate
            self._seen[key] = (now, live.samples_seen)
        return PeerLine(peer, restarts, phase, live.epoch, self.epochs, live.epoch_step, live.epoch_steps,
                        self._rates.get(key, float("nan")), live.rounds_ok, live.rounds_failed)  # fmt: skip

    def _show(self, lines: list[PeerLine]) -> None:
        from rich.live import Live

        if self._live is None:
            self._live = Live(self._table(lines), refresh_per_second=2, transient=True)
            self._live.start()
        else:
            self._live.update(self._table(lines))

    def _table(self, lines: list[PeerLine]):
        from rich.table import Table

        table = Table(title=f"swarm progress ({time.monotonic() - self.started:.0f} s)", title_justify="left")
        for column in ("peer", "epoch", "step", "samples/s", "rounds ok", "failed", "state"):
            table.add_column(column, justify="right" if column not in ("state",) else "left")
        for line in lines:
            rate = rate_text(line.samples_per_s)
            name = f"{line.peer}" + (f" (restart {line.restarts})" if line.restarts else "")
            table.add_row(name, f"{line.epoch}/{line.epochs}", f"{line.step}/{line.steps}", rate,
                          str(line.rounds_ok), str(line.rounds_failed), line.phase)  # fmt: skip
        return table

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
