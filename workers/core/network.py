"""Which address a peer listens on and which address it announces to the other peers.

On one machine everything is loopback. On a cluster a peer listens on all interfaces (or a configured one) and
announces its own node's IP, never 127.0.0.1: the other nodes could not dial that.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import psutil

from workers.core.config import NetworkConfig
from workers.core.errors import ConfigError

ANY = "0.0.0.0"
LOOPBACK = "127.0.0.1"


def _ray():
    """The Ray module when this process is a Ray worker or driver; None otherwise (standalone peers never import
    Ray: they need not pay for the import)."""
    ray = sys.modules.get("ray")
    return ray if ray is not None and ray.is_initialized() else None


def ray_node_id() -> str:
    """The Ray node this process runs on ("" outside Ray)."""
    ray = _ray()
    return ray.get_runtime_context().get_node_id() if ray else ""


def node_ip() -> str:
    """This machine's IPv4 address as the other nodes see it: Ray's node IP inside a Ray worker, else the address of
    the interface that routes outward, else the first non-loopback interface address."""
    if ray := _ray():
        return ray.util.get_node_ip_address()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("10.255.255.255", 1))  # UDP: selects the outgoing interface, sends nothing
            address = sock.getsockname()[0]
            if not ipaddress.ip_address(address).is_loopback:
                return address
    except OSError:
        pass  # no route (e.g. a network namespace without a default route)
    for addresses in psutil.net_if_addrs().values():
        for addr in addresses:
            if addr.family == socket.AF_INET and not ipaddress.ip_address(addr.address).is_loopback:
                return addr.address
    return LOOPBACK


def listen_host(network: NetworkConfig) -> str:
    """`network.host` with "auto" (left unresolved, e.g. outside Ray) taken as loopback."""
    return LOOPBACK if network.host == "auto" else network.host


def announce_host(network: NetworkConfig) -> str:
    """The address the other peers dial: `announce_host`, else this node's IP when listening on all interfaces."""
    if network.announce_host:
        return network.announce_host
    host = listen_host(network)
    return node_ip() if host == ANY else host


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def peer_port(network: NetworkConfig, offset: int) -> int:
    """Peer i listens on `port + i`; port 0 means any free port."""
    return network.port + offset if network.port else free_port(listen_host(network))


def dht_maddrs(network: NetworkConfig, offset: int = 0) -> tuple[list[str], list[str]]:
    """(host_maddrs, announce_maddrs) of a hivemind DHT listening on `port + offset` (Ray peer i: offset i). A fixed
    port that is taken raises PortInUseError here, on the peer's own node, naming it (hivemind would say only
    "Daemon failed to start")."""
    port, host = peer_port(network, offset), listen_host(network)
    if network.port and port_in_use(host, port):
        raise PortInUseError(ports_in_use_message(network, host, {port: _listener(offset)}))
    return [f"/ip4/{host}/tcp/{port}"], [f"/ip4/{announce_host(network)}/tcp/{port}"]


class PortInUseError(ConfigError):
    """A fixed port of `network.port`'s range is taken by another process."""


def port_in_use(host: str, port: int) -> bool:
    """Whether another socket holds `port` on `host`. The probe binds with SO_REUSEADDR, as p2pd does, so a port
    whose old connections linger in TIME_WAIT counts as free, as it is for p2pd."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            return err.errno == errno.EADDRINUSE  # other failures (no such address) are the listener's to report
    return False


def run_ports(network: NetworkConfig, peers: int, rendezvous: bool, joins: int = 0) -> dict[int, str]:
    """The fixed ports a run listens on, each with what listens there: peer i on `port + i` (joiners are peers
    `peers`, `peers + 1`, ...), the allreduce rendezvous on `port + peers`; none when `network.port` is 0 (any free)."""
    if not network.port:
        return {}
    ports = {network.port + i: f"peer {i}" for i in range(peers + joins)}
    if rendezvous:
        ports[network.port + peers] = "the allreduce rendezvous (network.port + peers)"
    return ports


def check_ports_free(network: NetworkConfig, host: str, peers: int, rendezvous: bool, joins: int = 0) -> None:
    """Raise PortInUseError naming every port of the run's range that is taken on `host` (of this machine)."""
    ports = run_ports(network, peers, rendezvous, joins)
    busy = {port: user for port, user in ports.items() if port_in_use(host, port)}
    if busy:
        raise PortInUseError(ports_in_use_message(network, host, busy))


def ports_in_use_message(network: NetworkConfig, host: str, busy: dict[int, str]) -> str:
    taken = ", ".join(f"port {port} for {user}" for port, user in sorted(busy.items()))
    return (
        f"network.port={network.port}: {taken} {'is' if len(busy) == 1 else 'are'} in use on {host} (peer i listens "
        "on network.port + i); stop what holds it, or choose another network.port (0: any free ports)"
    )


def _listener(offset: int) -> str:
    """Who listens on `port + offset`, as a peer sees it (a standalone peer listens on `port` itself: offset 0)."""
    return f"peer {offset}" if offset else "this peer"


@contextmanager
def naming_taken_port(network: NetworkConfig, offset: int) -> Iterator[None]:
    """Around starting the DHT: a port taken after `dht_maddrs` checked it (a race) fails in hivemind's p2pd as
    "bind: address already in use"; re-raise that as a PortInUseError naming the port and `network.port`."""
    try:
        yield
    except Exception as err:
        if not network.port or "address already in use" not in str(err):
            raise
        port, host = network.port + offset, listen_host(network)
        raise PortInUseError(f"{ports_in_use_message(network, host, {port: _listener(offset)})} ({err})") from err
