"""Enter a network namespace from the current thread, and come back: how an emulated peer takes its DHT, averager
and gloo group into its own shaped link (launcher/emulation/links.py makes the namespaces).

Linux namespaces belong to a thread, not a process. After setns(2) this thread, the processes it forks from then on
(hivemind's DHT and averager, which start p2pd) and the sockets it creates live in the namespace; the process's other
threads and its existing connections (a Ray actor's to its raylet) stay where they were. A socket keeps the namespace
it was created in for good, so coming back right after creating things is safe. Python 3.11 has no os.setns: ctypes.
"""

from __future__ import annotations

import ctypes
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from workers.core.config import ExperimentConfig
from workers.core.errors import ConfigError

CLONE_NEWNET = 0x40000000  # linux/sched.h
NETNS_DIR = "/run/netns"  # where `ip netns add` pins a namespace under its name


@dataclass(frozen=True)
class NetnsLink:
    """Where one emulated peer lives: its namespace, its address there (listened on and announced), and its
    interface there (gloo binds to it by name)."""

    namespace: str
    ip: str
    ifname: str


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)} (needs CAP_SYS_ADMIN: root)")


def enter_namespace_fd(fd: int) -> None:
    """This thread into the network namespace of `fd` (an open /proc/.../ns/net), for good: a worker thread's
    initializer, for a pool whose sockets must live where its maker's did (nothing to do, and no privilege needed,
    where the thread already is)."""
    if os.fstat(fd).st_ino != os.stat("/proc/thread-self/ns/net").st_ino:
        _setns(fd)


@contextmanager
def inside(namespace: str) -> Iterator[None]:
    """This thread in network namespace `namespace` (an `ip netns` name) for the body, then back where it was."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(os.path.join(NETNS_DIR, namespace), os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)  # raises if it cannot: a thread left in a shaped namespace must not go on silently
    finally:
        os.close(own)


def socket_in(namespace: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket of `namespace`, usable from any thread: a socket routes in the namespace it was created in."""
    with inside(namespace):
        return socket.socket(family, kind)


def namespace_config(cfg: ExperimentConfig, link: NetnsLink | None) -> ExperimentConfig:
    """`cfg` as the peer in `link` runs it: listening on and announcing its namespace's address. An emulated run's
    peer without a namespace is refused: it would train unshaped."""
    if link is None:
        if cfg.emulation.enabled:
            raise ConfigError("emulation: this peer has no network namespace of its own (the driver, `gossip-launch "
                              "run`, sets the links up); remove the emulation section to run it unshaped")  # fmt: skip
        return cfg
    return cfg.model_copy(update={"network": cfg.network.model_copy(update={"host": link.ip, "announce_host": None})})
