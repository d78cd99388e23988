"""The driver's progress display: its rates and its two forms (a live table in a terminal, steady log lines
elsewhere), fed the same status a real peer answers (workers/peer/peer.py's LiveProgress)."""

from __future__ import annotations

import io
import logging
import math

from rich.console import Console

from launcher.results.progress import PeerLine, ProgressDisplay, format_line, samples_rate
from workers.core.protocol import LiveProgress


def live(epoch: int, step: int, samples: int, ok: int = 0, failed: int = 0) -> LiveProgress:
    return LiveProgress(epoch=epoch, epoch_step=step, epoch_steps=56, samples_seen=samples, rounds_ok=ok,
                        rounds_failed=failed)  # fmt: skip


def test_the_rate_is_samples_over_seconds_since_the_previous_observation():
    assert math.isnan(samples_rate(None, 10.0, 500))
    assert samples_rate((10.0, 500), 12.0, 1300) == 400.0
    assert math.isnan(samples_rate((10.0, 500), 12.0, 100)), "a restarted peer's count starts again"


def test_a_log_line_names_every_peer_compactly():
    lines = [PeerLine(0, 0, "running", 2, 10, 37, 56, 412.4, 3, 0), PeerLine(1, 1, "starting", 1, 10, 0, 56,
                                                                             math.nan, 0, 2)]  # fmt: skip
    assert (
        format_line(lines, 12.3) == "progress 12 s | peer 0 e2/10 37/56 412/s r3 | peer 1 e1/10 0/56 - r0+2x starting"
    )


def test_not_a_terminal_logs_at_most_once_per_interval(caplog, monkeypatch):
    clock = iter([0.0, 0.0, 0.5, 1.0, 2.5, 3.0])
    monkeypatch.setattr("launcher.results.progress.time.monotonic", lambda: next(clock))
    progress = ProgressDisplay(epochs=3, interactive=False, interval_s=2.0)
    with caplog.at_level(logging.INFO, logger="launcher.results.progress"):
        for samples in (0, 100, 200, 500, 600):
            progress.update([(0, 0, "running", live(1, samples // 32, samples))])
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages  # at t=0 and t=2.5, not at 0.5 or 1.0 or 3.0
    assert messages[1].startswith("progress 2 s | peer 0 e1/3 15/56 200/s")  # (500 - 200) / 1.5 s


def test_a_terminal_gets_a_table_with_one_row_per_peer():
    progress = ProgressDisplay(epochs=3, interactive=True)
    shown = progress.update([(0, 0, "running", live(2, 5, 160, ok=4)), (1, 2, "running", live(2, 7, 224)),
                             (2, 0, "starting", None)])  # fmt: skip
    assert [line.peer for line in shown] == [0, 1], "a peer without a status yet has no row"
    console = Console(file=io.StringIO(), width=100)
    console.print(progress._table(shown))
    text = console.file.getvalue()
    assert "1 (restart 2)" in text and "2/3" in text and "5/56" in text and "7/56" in text
    progress.close()
