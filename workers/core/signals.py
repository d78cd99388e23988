"""Signals of a process that runs peers: the driver's, or a standalone peer's. SIGTERM (`kill`, `timeout`, Slurm,
Kubernetes, a stopped Ray job) ends a run as Ctrl-C does; during the cleanup both wait, so no p2pd, actor or Ray
process is left behind half-stopped.

Ray gets in the way twice: `ray.init()` replaces the SIGTERM handler with its own `sys.exit(15)` (no "interrupted",
exit 15 instead of 130), and `ray.shutdown()` resets SIGTERM to its default action unless Ray's failure-signal handler
is off in the driver (launcher/__init__.py turns it off).
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager

CLEANUP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


_received = threading.Event()  # a Ctrl-C or SIGTERM came: see raise_if_interrupted


_MAIN_PID = os.getpid()
_deferring = [0]  # inside `interrupts_deferred`: a signal only sets `_received`


def interrupt(signum, frame):
    if os.getpid() != _MAIN_PID:  # a process forked after the handler was set (hivemind's): die as by default
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    _received.set()
    if not _deferring[0]:
        raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def interrupts_deferred():
    """A loop whose every pass must be whole (the rows it took from the peers are written before it stops): a signal
    only sets the flag, and the loop raises KeyboardInterrupt at its next `raise_if_interrupted()`."""
    _deferring[0] += 1
    try:
        yield
    finally:
        _deferring[0] -= 1


def install_interrupt_handlers() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt; set again after `ray.init()`, which replaces the SIGTERM one."""
    if threading.current_thread() is threading.main_thread():
        for sig in CLEANUP_SIGNALS:
            signal.signal(sig, interrupt)


def raise_if_interrupted() -> None:
    """Called by the driver's loop: a signal whose KeyboardInterrupt was swallowed on its way (raised inside a
    library's callback, which only logs it) still stops the run."""
    if _received.is_set():
        raise KeyboardInterrupt("a signal came earlier")


@contextmanager
def signals_ignored():
    """Cleanup must finish (or no p2pd/Ray process would be left behind): a second Ctrl-C or SIGTERM waits for it.
    Outside the main thread (a Ray Tune trial) signals are not this thread's to handle: nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in CLEANUP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
